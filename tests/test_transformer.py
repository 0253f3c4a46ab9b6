"""Sparse gradient transport through attention heads (DESIGN.md section 7).

The reference in these tests is built by hand from the model's own submodules:
the per-head outputs are split, the non-carrying heads detached one by one with
`Tensor.detach` and stacked again. Same ops on the same values, so forward
outputs and gradients are compared bit for bit (`torch.equal`).
"""

import math

import pytest
import torch
from torch import nn

from sparse_rtrl.experiments.config import set_dotted
from sparse_rtrl.transformer import (
    CausalSelfAttentionHeads,
    CausalTransformer,
    HeadSelector,
    MultiheadAttentionHeads,
    SparseHeadGradient,
    carrying_head_count,
    mask_head_gradients,
)


FRACTIONS = (1.0, 0.75, 0.5, 0.33, 0.25, 0.0)
HEADS = 12
LAYERS = 2
CONTEXT = 6

# Tolerances (float64): the attention maths against torch's fused kernels,
# which sum in another order.
TOL_KERNEL = 1e-12


def make_model(fraction: float = 1.0, **options) -> CausalTransformer:
    torch.manual_seed(0)
    model = CausalTransformer(
        2,
        1,
        context=CONTEXT,
        embed_dim=24,
        num_heads=HEADS,
        num_layers=LAYERS,
        fraction=fraction,
        generator=options.pop("generator", 7),
        **options,
    )
    return model.double()


def make_window(seed: int = 1, batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CONTEXT, 2, generator=generator, dtype=torch.float64)


def reference_forward(model: CausalTransformer, x, carry=None) -> torch.Tensor:
    """The model's maths with the heads of `carry` (L, N) detached by hand."""
    z = model.embed(x) + model.position[: x.shape[1]]
    for layer, block in enumerate(model.blocks):
        heads = block.attention.heads(block.norm_attention(z))
        if carry is not None:
            split = [
                heads[:, h] if carry[layer, h] else heads[:, h].detach()
                for h in range(heads.shape[1])
            ]
            heads = torch.stack(split, dim=1)
        batch, num_heads, steps, head_dim = heads.shape
        merged = heads.transpose(1, 2).reshape(batch, steps, num_heads * head_dim)
        z = z + block.attention.output_projection(merged)
        z = z + block.mlp(block.norm_mlp(z))
    return model.readout(model.norm(z))


def newest_loss(output: torch.Tensor) -> torch.Tensor:
    return (output[:, -1] - 0.5).pow(2).sum()


def gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: param.grad for name, param in model.named_parameters()}


def as_dense(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def carrying_heads(model: CausalTransformer) -> torch.Tensor:
    """(L, N) bool: heads whose query/key/value rows received any gradient."""
    rows = []
    for block in model.blocks:
        weight = block.attention.heads.weight_qkv
        grad = as_dense(weight.grad, weight)
        rows.append(grad.abs().sum(dim=(0, 2, 3)) > 0)
    return torch.stack(rows)


# 1. Exactness ---------------------------------------------------------------


def test_fraction_one_equals_plain_backpropagation_exactly():
    model, x = make_model(1.0), make_window()
    masked = gradients(model, newest_loss(model(x)))
    assert model.selector.carry.all()

    plain = gradients(model, newest_loss(reference_forward(model, x)))
    for name, grad in plain.items():
        assert torch.equal(masked[name], grad), name


@pytest.mark.parametrize("fraction", [0.75, 0.5, 0.33, 0.25, 0.0])
@pytest.mark.parametrize("draws", ["per_layer", "shared"])
def test_masked_gradients_equal_hand_detached_heads(fraction, draws):
    model, x = make_model(fraction, draws=draws), make_window()
    for _ in range(2):  # two steps, two different masks
        masked = gradients(model, newest_loss(model(x)))
        carry = model.selector.carry.clone()
        by_hand = gradients(model, newest_loss(reference_forward(model, x, carry)))
        for name, grad in by_hand.items():
            param = dict(model.named_parameters())[name]
            assert torch.equal(as_dense(masked[name], param), as_dense(grad, param))


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_forward_outputs_are_bitwise_those_of_the_dense_model(fraction):
    dense, model, x = make_model(1.0), make_model(fraction), make_window()
    model.load_state_dict(dense.state_dict())
    expected = dense(x)
    assert torch.equal(model(x), expected)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert torch.equal(reference_forward(model, x), expected)


def test_attention_heads_compute_softmax_attention():
    torch.manual_seed(3)
    heads = CausalSelfAttentionHeads(12, 4).double()
    with torch.no_grad():
        heads.bias_qkv.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    query, key, value = (
        torch.einsum("bte,nde->bntd", x, heads.weight_qkv[i])
        + heads.bias_qkv[i][None, :, None]
        for i in range(3)
    )
    expected = nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True
    )
    assert (heads(x) - expected).abs().max() <= TOL_KERNEL * expected.abs().max()


# 2. Head counts and reproducibility -------------------------------------------


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_carrying_heads_per_layer_per_step(fraction):
    model, x = make_model(fraction), make_window()
    count = math.floor(HEADS * fraction + 0.5)
    assert carrying_head_count(fraction, HEADS) == count

    masks = []
    for _ in range(4):
        gradients(model, newest_loss(model(x)))
        carried = carrying_heads(model)
        assert carried.sum(dim=1).tolist() == [count] * LAYERS
        assert torch.equal(carried, model.selector.carry)
        masks.append(carried)
    if 0 < count < HEADS:  # random per step: the masks move
        assert any(not torch.equal(masks[0], mask) for mask in masks[1:])
        assert any(not torch.equal(mask[0], mask[1]) for mask in masks)


def test_counts_of_the_sweep_are_all_different():
    counts = [carrying_head_count(f, HEADS) for f in FRACTIONS]
    assert counts == [12, 9, 6, 4, 3, 0]


def test_selection_is_reproducible_from_a_seed():
    def sequence(seed, **options):
        selector = HeadSelector(HEADS, LAYERS, fraction=0.5, generator=seed, **options)
        return torch.stack([selector.draw() for _ in range(5)])

    assert torch.equal(sequence(3), sequence(3))
    assert not torch.equal(sequence(3), sequence(4))

    fixed = sequence(3, selection="fixed")
    assert torch.equal(fixed, fixed[:1].expand_as(fixed))
    shared = sequence(3, draws="shared")
    assert torch.equal(shared[:, 0], shared[:, 1])


def test_selector_state_dict_resumes_the_draws():
    selector = HeadSelector(HEADS, LAYERS, fraction=0.25, generator=0)
    selector.draw()
    saved = selector.state_dict()
    expected = [selector.draw() for _ in range(3)]

    other = HeadSelector(HEADS, LAYERS, fraction=0.25, generator=99)
    other.load_state_dict(saved)
    assert all(torch.equal(other.draw(), mask) for mask in expected)
    assert other.step_count == 4


# 3. Fraction 0 --------------------------------------------------------------


def test_fraction_zero_stops_gradient_into_attention_only():
    model, x = make_model(0.0), make_window()
    grads = gradients(model, newest_loss(model(x)))
    for name, param in model.named_parameters():
        grad = as_dense(grads[name], param)
        attention_input = ".attention.heads." in name or ".norm_attention." in name
        assert attention_input == (grad.abs().max() == 0), name

    # Trained by plain SGD, the attention's input side stays put; the rest learns.
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(20):
        loss = newest_loss(model(x))
        losses.append(loss.item())
        for param in model.parameters():
            param.grad = None
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param.sub_(0.003 * param.grad)
    for name, param in model.named_parameters():
        moved = not torch.equal(param, frozen[name])
        assert moved != (".attention.heads." in name or "norm_attention" in name)
    assert losses[-1] < 0.5 * losses[0]


# The wrapper on other attention modules ------------------------------------------


def test_wrapper_on_torch_multihead_attention():
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(24, HEADS, batch_first=True).double()
    wrapped = SparseHeadGradient(
        MultiheadAttentionHeads(mha),
        mha.out_proj,
        num_heads=HEADS,
        fraction=0.5,
        generator=2,
    )
    x = make_window(batch=2).repeat(1, 1, 12)
    causal = torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).triu(1)
    expected = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    output = wrapped(x)
    assert (output - expected).abs().max() <= TOL_KERNEL * expected.abs().max()

    mha.zero_grad()
    output[:, -1].sum().backward()
    per_head = mha.in_proj_weight.grad.view(3, HEADS, -1, 24).abs().sum((0, 2, 3))
    assert torch.equal(per_head > 0, wrapped.selector.carry[0])
    assert wrapped.selector.carry[0].sum() == 6


def test_mask_head_gradients_passes_values_and_blocks_gradients():
    head_outputs = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    carry = torch.tensor([True, False, True, False])
    masked = mask_head_gradients(head_outputs, carry)
    assert torch.equal(masked, head_outputs)
    masked.sum().backward()
    assert torch.equal(head_outputs.grad[:, carry], torch.ones(2, 2, 3, 5).double())
    assert head_outputs.grad[:, ~carry].abs().max() == 0


# Misuse ---------------------------------------------------------------------


def test_errors_and_warnings():
    with pytest.raises(ValueError, match=r"`fraction` must be in \[0, 1\], got 1.5"):
        HeadSelector(HEADS, fraction=1.5)
    with pytest.raises(ValueError, match="`selection` must be one of random, fixed"):
        HeadSelector(HEADS, selection="topk")
    with pytest.raises(ValueError, match="`draws` must be one of"):
        HeadSelector(HEADS, draws="global")
    with pytest.raises(ValueError, match="divisible by `num_heads`=12, got 20"):
        CausalSelfAttentionHeads(20, 12)
    with pytest.warns(UserWarning, match="rounds to 0 carrying heads"):
        HeadSelector(HEADS, fraction=0.01)
    with pytest.raises(ValueError, match="1 <= T <= context=6"):
        make_model()(torch.zeros(1, 7, 2, dtype=torch.float64))

    selector = HeadSelector(4, 2, fraction=0.5, generator=0)
    wrapped = SparseHeadGradient(
        CausalSelfAttentionHeads(8, 4),
        nn.Linear(8, 8),
        num_heads=4,
        selector=selector,
        layer=1,
    )
    with pytest.raises(RuntimeError, match=r"call `selector.draw\(\)` once per step"):
        wrapped(torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match=r"`layer` must be in \[0, 1\]"):
        SparseHeadGradient(
            nn.Identity(), nn.Identity(), num_heads=4, selector=selector, layer=2
        )
    with pytest.raises(ValueError, match="per-head outputs"):
        SparseHeadGradient(nn.Identity(), nn.Identity(), num_heads=4)(
            torch.zeros(1, 3, 8)
        )


# The C8 study at a tiny size -----------------------------------------------------


TINY = {
    "model.context": 8,
    "model.embed_dim": 24,
    "model.num_layers": 1,
    "pretrain.steps": 3,
    "pretrain.batch": 4,
    "run.adapt_steps": 24,
    "run.pre_shift_steps": 6,
    "run.log_every": 10,
}


def test_study_smoke_run_at_tiny_size(tmp_path):
    from sparse_rtrl.experiments import runio
    from sparse_rtrl.experiments.runner import run_one
    from sparse_rtrl.experiments.studies import STUDIES
    from sparse_rtrl.experiments.sweep import RunSpec
    from sparse_rtrl.experiments.transformer_study import (
        resolve_transformer,
        study_configs,
    )

    configs = study_configs(quick=True)
    labels = [label for label, _, seed in configs if seed == 0]
    assert labels == ["frozen", "f=1", "f=0.75", "f=0.5", "f=0.33", "f=0.25", "f=0.0"]
    specs, summaries = [], {}
    for label, config, seed in configs:
        if seed > 1 or label not in ("frozen", "f=1", "f=0.5"):
            continue
        for key, value in TINY.items():
            set_dotted(config, key, value)
        spec = RunSpec(resolve_transformer(config), seed)
        run_dir = tmp_path / "runs" / spec.folder_name
        run_dir.mkdir(parents=True)
        summaries[spec.run_id] = run_one(spec.config, seed, run_dir)
        specs.append(spec)
        assert runio.read_jsonl(run_dir / "metrics.jsonl")

    by_seed = {}
    for spec in specs:
        summary = summaries[spec.run_id]
        assert math.isfinite(summary["loss_final"]) and not summary["diverged"]
        by_seed.setdefault(spec.seed, set()).add(
            (summary["pretrained_hash"], summary["stream_hash"])
        )
    assert all(len(pairs) == 1 for pairs in by_seed.values())  # shared net, stream

    study = STUDIES["transformer"]
    [row] = study.rows(summaries, specs)
    assert row.claim == "C8" and row.n_seeds == 2
    assert "f=0.5" in row.losses and "frozen" in row.losses
    assert study.figures(summaries, specs, tmp_path / "figures")[0].exists()
