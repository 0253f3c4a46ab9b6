"""Train a leaky RNN online with sparse RTRL (k = 4 paths per unit) and Adam.

Run: python examples/quickstart.py
"""

import math

import torch
from torch import nn

import sparse_rtrl


torch.manual_seed(0)
cell = sparse_rtrl.LeakyRNNCell(input_size=1, hidden_size=64, alpha=0.2)
readout = nn.Linear(64, 1)
learner = sparse_rtrl.SparseRTRL(cell, num_paths=4, generator=0)
opt = torch.optim.Adam([*cell.parameters(), *readout.parameters()], lr=3e-3)

# One stream: predict the next value of a sum of two sines.
t = torch.arange(3001, dtype=torch.float32)
wave = torch.sin(2 * math.pi * t / 25) + 0.5 * torch.sin(2 * math.pi * t / 7)
running = None
for step in range(3000):
    x, y = wave[step].view(1, 1), wave[step + 1].view(1, 1)
    h = learner.step(x)  # (1, 64), a leaf that requires grad
    loss = nn.functional.mse_loss(readout(h), y)
    learner.backward(loss)  # readout grads by autograd, cell grads by sparse RTRL
    opt.step()
    opt.zero_grad()
    running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
    if step % 500 == 499:
        print(f"step {step + 1:5d}  loss (running mean) {running:.4f}")
