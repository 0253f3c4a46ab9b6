"""How fast can eager PyTorch run one exact-RTRL online step at n = 64?

Times, alternated in one process, the library's step as `sparse-rtrl bench`
runs it (`RTRL` on a tanh `RNNCell`, input size 1, a linear readout, MSE loss,
fused Adam, `zero_grad`) against the least eager torch work of the same step:
no input checks, no estimator layer, the Jacobian, product, immediate entries
and gradient written inline. The bare step runs with the influence stored
row-major, (S, P), and column-major, (P, S), whose product MKL runs faster at
this shape (the library's order here; see `sparse_rtrl.kernels`). Prints
microseconds per step (best and median block). With the optimizer's step
taken out, the bare steps' gradients equal `RTRL`'s (bit for bit in the
library's order).

    python docs/bench/minimal_exact_step.py --blocks 15
"""

import argparse
import time

import torch
from torch import nn

from sparse_rtrl import RTRL
from sparse_rtrl.experiments import bench


SIZE = 64
STEPS_PER_BLOCK = 250


def bare_step(transposed: bool):
    """One online step of exact RTRL in plain torch ops, as a closure."""
    torch.manual_seed(0)
    cell, readout = nn.RNNCell(1, SIZE), nn.Linear(SIZE, 1)
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    optimizer = torch.optim.Adam([*params, *readout.parameters()], lr=1e-4, fused=True)
    num_params = sum(p.numel() for p in params)
    # Unit of every parameter entry, in the order weight_ih, weight_hh, biases.
    units = torch.arange(SIZE)
    unit = torch.cat([units, units.repeat_interleave(SIZE), units, units])
    column = torch.arange(num_params)
    index = column * SIZE + unit if transposed else unit * num_params + column
    shape = (num_params, SIZE) if transposed else (SIZE, num_params)
    buffers = [torch.zeros(shape), torch.zeros(shape)]
    hidden = [torch.zeros(1, SIZE)]
    inputs, targets = torch.randn(64, 1, 1), torch.randn(64, 1, 1)
    ones = torch.ones(1, 2)
    clock = [0]

    def step() -> None:
        t = clock[0] % 64
        clock[0] += 1
        influence, spare = buffers
        with torch.no_grad():
            h = torch.rnn_tanh_cell(inputs[t], hidden[0], *params)
            slope = (1 - h * h).view(SIZE, 1)
            jacobian = slope * cell.weight_hh
            if transposed:
                torch.mm(influence, jacobian.t(), out=spare)
            else:
                torch.mm(jacobian, influence, out=spare)
            row = slope * torch.cat((inputs[t], hidden[0], ones), 1)  # [x, h, 1, 1]
            entries = torch.cat(
                (row[:, 0], row[:, 1 : SIZE + 1].reshape(-1), row[:, -2], row[:, -1])
            )
            spare.view(-1).index_add_(0, index, entries)
            buffers.reverse()
            hidden[0] = h
        leaf = h.detach().requires_grad_(True)
        nn.functional.mse_loss(readout(leaf), targets[t]).backward()
        with torch.no_grad():
            credit = leaf.grad
            grad = (
                torch.mv(spare, credit[0]) if transposed else torch.mm(credit, spare)[0]
            )
            start = 0
            for p in params:
                p.grad = grad[start : start + p.numel()].view_as(p)
                start += p.numel()
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=15)
    args = parser.parse_args()
    config = bench.BenchConfig(sizes=(SIZE,))
    cell = bench._make_cell(config, SIZE, torch.float32, torch.device("cpu"))
    steps = {
        "library (RTRL)": bench._online_step(config, cell, RTRL(cell)),
        "bare, (S, P)": bare_step(transposed=False),
        "bare, (P, S)": bare_step(transposed=True),
    }
    for step in steps.values():
        for _ in range(50):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.blocks):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(STEPS_PER_BLOCK):
                step()
            times[name].append((time.perf_counter() - start) / STEPS_PER_BLOCK * 1e6)
    for name, values in times.items():
        values.sort()
        best, median = values[0], values[len(values) // 2]
        rate = 1e6 / best
        print(
            f"{name:16s} best {best:5.0f} us  median {median:5.0f} us  ({rate:.0f}/s)"
        )


if __name__ == "__main__":
    main()
