r"""Sparse gradient transport through attention heads (DESIGN.md section 7).

A small causal pre-norm transformer whose attention is written with an
explicit head dimension, and a way to let only a fraction of the heads of
each layer carry gradient. The forward pass is never changed; in the backward
pass the output of a non-carrying head is treated as a constant:

.. math::
    o_{l,h} = \mathrm{softmax}\big(q_{l,h} k_{l,h}^\top / \sqrt{d}
              + \mathrm{causal}\big)\, v_{l,h}                        \qquad (1)

    \tilde o_{l,h} = a_{l,h}\, o_{l,h} + (1 - a_{l,h})\,
                     \mathrm{sg}(o_{l,h})                             \qquad (2)

    y_l = W^{O}_l \, [\tilde o_{l,1}; \dots; \tilde o_{l,N}]          \qquad (3)

with sg the stop-gradient (`detach`) and a_t in {0, 1}^{L x N} the carry mask
of step t: floor(f N + 0.5) ones in every layer's row, N heads, fraction f.
Equation (2) is implemented with `torch.where`, so the values of (2) equal
those of (1) bit for bit and the forward outputs are identical for every f.
f = 1 is dense backpropagation; f = 0 detaches the whole attention output of
a layer, so no gradient reaches its query, key and value projections or the
layer norm in front of them, while the output projection W^O, the MLP, the
residual stream and the readout still learn.

Pieces, from small to large:

- `carrying_head_count(fraction, num_heads)`: floor(f N + 0.5).
- `HeadSelector`: draws a_t (random per step or fixed once; an independent
  draw per layer or one draw shared by all layers; from a seeded generator).
- `mask_head_gradients(head_outputs, carry)`: equation (2) on a
  (B, N, T, d) tensor.
- `SparseHeadGradient`: wraps any module that returns per-head outputs
  (B, N, T, d) and an output projection; this is the way to use the method on
  your own attention. `MultiheadAttentionHeads` reads per-head outputs out of
  a `torch.nn.MultiheadAttention` (which does not return them itself).
- `CausalSelfAttentionHeads`, `TransformerBlock`, `CausalTransformer`: the
  model the benchmark uses (C8).

Cost: the masking adds one `torch.where` per layer to the forward pass and
nothing else; at f = 0 the backward pass through the attention of a layer is
skipped entirely. At 0 < f < 1 the attention backward still runs for every
head (the non-carrying heads receive zeros), so the method saves no compute
here: it is a study of which gradient is needed, not a speed-up.

Limitations: one forward pass with gradients enabled is one step; calling the
model twice per step draws two masks. With a stateful optimizer (Adam,
momentum) a head that carries no gradient on a step still moves by its
optimizer state, as any parameter with a zero gradient does.

References:
    Sparse RTRL and its transformer extension: arXiv 2603.15195 (2026).
"""

import math
import warnings
from typing import Literal

import torch
from torch import nn

from .estimators.base import make_generator


SELECTIONS = ("random", "fixed")
DRAWS = ("per_layer", "shared")

NO_DRAW_YET = (
    "SparseHeadGradient: the shared `selector` has no carry mask yet. A wrapper "
    "built with an external HeadSelector reads the mask that selector drew last: "
    "call `selector.draw()` once per step, before the forward pass."
)


def carrying_head_count(fraction: float, num_heads: int) -> int:
    """The number of heads per layer that carry gradient: floor(f N + 0.5).

    Args:
        fraction: f in [0, 1].
        num_heads: N >= 1.

    Returns:
        An int in [0, N].
    """
    _check_fraction(fraction, "carrying_head_count")
    _check_positive_int(num_heads, "num_heads", "carrying_head_count")
    return math.floor(fraction * num_heads + 0.5)


class HeadSelector:
    """Draws which attention heads carry gradient, one (L, N) mask per step.

    Every layer's row has exactly `num_carrying` = floor(f N + 0.5) True
    entries, chosen uniformly without replacement.

    Args:
        num_heads: N, heads per layer.
        num_layers: L, attention layers that read this selector.
        fraction: f in [0, 1]; 1 is dense backpropagation.
        selection: "random" draws a fresh mask at every `draw()`; "fixed"
            draws one at the first `draw()` and keeps it.
        draws: "per_layer" draws each layer's heads independently; "shared"
            draws one set of head indices and uses it in every layer.
        generator: the source of the draws (a CPU torch.Generator, an int
            seed, or None for a seed drawn from torch's global generator).

    Attributes:
        carry: (L, N) bool, the mask drawn last; None before the first draw.
        step_count: draws since construction or `reset()`.
    """

    def __init__(
        self,
        num_heads: int,
        num_layers: int = 1,
        *,
        fraction: float = 1.0,
        selection: Literal["random", "fixed"] = "random",
        draws: Literal["per_layer", "shared"] = "per_layer",
        generator: torch.Generator | int | None = None,
    ) -> None:
        _check_positive_int(num_heads, "num_heads", "HeadSelector")
        _check_positive_int(num_layers, "num_layers", "HeadSelector")
        _check_choice(selection, "selection", SELECTIONS)
        _check_choice(draws, "draws", DRAWS)
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.fraction = fraction
        self.num_carrying = carrying_head_count(fraction, num_heads)
        self.selection = selection
        self.draws = draws
        self.generator = make_generator(generator, torch.device("cpu"), "HeadSelector")
        self.carry: torch.Tensor | None = None
        self.step_count = 0
        if self.num_carrying == 0 and fraction > 0:
            warnings.warn(
                f"HeadSelector: `fraction`={fraction} of {num_heads} heads rounds to "
                "0 carrying heads: no gradient will reach the attention.",
                UserWarning,
                stacklevel=2,
            )

    def draw(self) -> torch.Tensor:
        """Advance one step and return its carry mask (L, N), bool, on the CPU."""
        if self.carry is None or self.selection == "random":
            self.carry = self._sample()
        self.step_count += 1
        return self.carry

    def reset(self) -> None:
        """Forget the last mask (a fixed selection is drawn again) and the count."""
        self.carry = None
        self.step_count = 0

    def state_dict(self) -> dict:
        """The mask, step count and generator state (enough to resume exactly)."""
        carry = None if self.carry is None else self.carry.clone()
        return {
            "carry": carry,
            "step_count": self.step_count,
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what `state_dict` returned."""
        carry = state_dict["carry"]
        self.carry = None if carry is None else carry.clone()
        self.step_count = int(state_dict["step_count"])
        self.generator.set_state(state_dict["generator_state"])

    def _sample(self) -> torch.Tensor:
        # Uniform subsets: the first `num_carrying` of a random permutation.
        rows = self.num_layers if self.draws == "per_layer" else 1
        scores = torch.rand(rows, self.num_heads, generator=self.generator)
        chosen = scores.argsort(dim=1)[:, : self.num_carrying]
        carry = torch.zeros(rows, self.num_heads, dtype=torch.bool)
        carry.scatter_(1, chosen, True)
        return carry.expand(self.num_layers, -1).clone()

    def __repr__(self) -> str:
        return (
            f"HeadSelector(num_heads={self.num_heads}, num_layers={self.num_layers}, "
            f"fraction={self.fraction}, num_carrying={self.num_carrying}, "
            f"selection={self.selection!r}, draws={self.draws!r})"
        )


def mask_head_gradients(
    head_outputs: torch.Tensor, carry: torch.Tensor
) -> torch.Tensor:
    r"""Equation (2): per-head outputs whose non-carrying heads are detached.

    The values returned equal `head_outputs` bit for bit; in the backward
    pass the heads with `carry[h]` False pass no gradient.

    Args:
        head_outputs: (B, N, T, d), the outputs of N heads before they are
            concatenated and projected.
        carry: (N,) bool, True for the heads that carry gradient.

    Returns:
        (B, N, T, d), the same values.
    """
    if head_outputs.dim() != 4:
        raise ValueError(
            "mask_head_gradients: `head_outputs` expected (B, heads, T, d_head), "
            f"got shape {tuple(head_outputs.shape)}."
        )
    if carry.dtype != torch.bool or carry.shape != head_outputs.shape[1:2]:
        raise ValueError(
            f"mask_head_gradients: `carry` expected a bool tensor of shape "
            f"({head_outputs.shape[1]},), got {carry.dtype} of shape "
            f"{tuple(carry.shape)}."
        )
    if not bool(carry.any()):
        # f = 0: skip the attention's backward pass altogether.
        return head_outputs.detach()
    keep = carry.to(head_outputs.device).view(1, -1, 1, 1)
    return torch.where(keep, head_outputs, head_outputs.detach())


class SparseHeadGradient(nn.Module):
    r"""Wrap attention so that only a fraction of its heads carry gradient.

    Computes equations (2) and (3): `output_projection` applied to the
    concatenated per-head outputs of `heads`, with the non-carrying heads
    detached. The forward values are those of the unwrapped attention.

    Use it on your own attention module by splitting that module at the point
    where the heads are still separate: `heads(*args, **kwargs)` must return
    the per-head outputs, shape (B, N, T, d), and `output_projection` maps
    (B, T, N d) to the attention's output (heads concatenated in head order,
    as `torch.nn.MultiheadAttention` and most implementations do).

    `torch.nn.MultiheadAttention` does not expose per-head outputs: it returns
    the projected sum, and with `need_weights=True` only the attention
    weights. Wrap it through `MultiheadAttentionHeads`, which recomputes the
    per-head outputs from the module's own parameters, and reuse its
    `out_proj`::

        mha = nn.MultiheadAttention(64, 8, batch_first=True)
        attention = SparseHeadGradient(
            MultiheadAttentionHeads(mha, causal=True), mha.out_proj,
            num_heads=8, fraction=0.5, generator=0,
        )
        y = attention(x)   # x (B, T, 64); y equals mha(x, x, x, ...)[0]

    Several wrapped layers can share one `HeadSelector` (pass `selector=` and
    `layer=`); the owner of the selector then calls `selector.draw()` once
    per step before the forward pass (`CausalTransformer` does). A wrapper
    that builds its own selector draws at every forward pass with gradients
    enabled. Without gradients nothing is drawn or masked.

    Args:
        heads: module returning per-head outputs (B, N, T, d).
        output_projection: module mapping (B, T, N d) to the output.
        num_heads: N.
        fraction, selection, generator: as in `HeadSelector` (ignored when
            `selector` is given).
        selector: a shared HeadSelector; None builds a one-layer one.
        layer: this wrapper's row of the shared selector's mask.
    """

    def __init__(
        self,
        heads: nn.Module,
        output_projection: nn.Module,
        *,
        num_heads: int,
        fraction: float = 1.0,
        selection: Literal["random", "fixed"] = "random",
        generator: torch.Generator | int | None = None,
        selector: HeadSelector | None = None,
        layer: int = 0,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.output_projection = output_projection
        self.num_heads = num_heads
        self.owns_selector = selector is None
        if selector is None:
            selector = HeadSelector(
                num_heads, fraction=fraction, selection=selection, generator=generator
            )
        _check_selector(selector, num_heads, layer)
        self.selector = selector
        self.layer = layer

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Per-head outputs, masked as in (2), concatenated and projected (3)."""
        head_outputs = self.heads(*args, **kwargs)
        _check_head_outputs(head_outputs, self.num_heads)
        if torch.is_grad_enabled():
            head_outputs = mask_head_gradients(head_outputs, self.current_carry())

        batch, heads, steps, head_dim = head_outputs.shape
        merged = head_outputs.transpose(1, 2).reshape(batch, steps, heads * head_dim)
        return self.output_projection(merged)

    def current_carry(self) -> torch.Tensor:
        """This step's carry mask of this layer, (N,) bool (draws if owned)."""
        if self.owns_selector:
            self.selector.draw()
        if self.selector.carry is None:
            raise RuntimeError(NO_DRAW_YET)
        return self.selector.carry[self.layer]


class MultiheadAttentionHeads(nn.Module):
    """Per-head outputs (B, N, T, d) of a `torch.nn.MultiheadAttention`.

    Recomputes self-attention with the module's own `in_proj_weight` and
    `in_proj_bias` and stops before `out_proj`, so that
    `out_proj(concat of heads)` equals `mha(x, x, x)[0]` (up to rounding: the
    fused kernel sums in another order). The parameters are shared, not
    copied: training through this module trains `mha`.

    Args:
        mha: a MultiheadAttention with equal query/key/value sizes, no
            `add_bias_kv`, no `add_zero_attn` and no dropout.
        causal: mask future positions (a causal model).

    Shapes:
        input x: (B, T, E) whatever `mha.batch_first` says; output
        (B, N, T, E / N).
    """

    def __init__(self, mha: nn.MultiheadAttention, *, causal: bool = True) -> None:
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(
                "MultiheadAttentionHeads: `mha` expected nn.MultiheadAttention, got "
                f"{type(mha).__name__}; for your own attention module, return the "
                "per-head outputs from it and use SparseHeadGradient directly."
            )
        unsupported = not mha._qkv_same_embed_dim or mha.bias_k is not None
        if unsupported or mha.add_zero_attn or mha.dropout > 0:
            raise NotImplementedError(
                "MultiheadAttentionHeads supports equal query/key/value sizes without "
                "add_bias_kv, add_zero_attn or dropout; got "
                f"kdim={mha.kdim}, vdim={mha.vdim}, add_bias_kv="
                f"{mha.bias_k is not None}, add_zero_attn={mha.add_zero_attn}, "
                f"dropout={mha.dropout}."
            )
        self.mha = mha
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.mha.in_proj_weight, self.mha.in_proj_bias
        qkv = nn.functional.linear(x, weight, bias)
        batch, steps, _ = x.shape
        qkv = qkv.view(batch, steps, 3, self.mha.num_heads, self.mha.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return _attend(query, key, value, causal=self.causal)


class CausalSelfAttentionHeads(nn.Module):
    r"""Causal self-attention with an explicit head dimension, before projection.

    Equation (1) for every head: the queries, keys and values of head h are
    `x @ weight_qkv[i, h].T + bias_qkv[i, h]` (i = 0, 1, 2), so the rows of
    head h's projection are `weight_qkv[:, h]`.

    Args:
        embed_dim: E, divisible by `num_heads`.
        num_heads: N.

    Shapes:
        input x: (B, T, E); output: (B, N, T, E / N).

    Attributes:
        weight_qkv: (3, N, d, E), initialised U(-1/sqrt(E), 1/sqrt(E)) as
            `nn.Linear`; bias_qkv: (3, N, d), zeros.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        _check_positive_int(embed_dim, "embed_dim", "CausalSelfAttentionHeads")
        _check_positive_int(num_heads, "num_heads", "CausalSelfAttentionHeads")
        if embed_dim % num_heads:
            raise ValueError(
                f"CausalSelfAttentionHeads: `embed_dim` must be divisible by "
                f"`num_heads`={num_heads}, got {embed_dim}."
            )
        head_dim = embed_dim // num_heads
        bound = embed_dim**-0.5
        weight = torch.empty(3, num_heads, head_dim, embed_dim).uniform_(-bound, bound)
        self.weight_qkv = nn.Parameter(weight)
        self.bias_qkv = nn.Parameter(torch.zeros(3, num_heads, head_dim))
        self.num_heads = num_heads
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = torch.einsum("bte,inde->ibntd", x, self.weight_qkv)
        qkv = qkv + self.bias_qkv[:, None, :, None, :]
        query, key, value = qkv.unbind(0)
        return _attend(query, key, value, causal=True)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + MLP(norm(x)).

    The attention is a `SparseHeadGradient` around `CausalSelfAttentionHeads`
    and an `nn.Linear` output projection, reading row `layer` of `selector`.

    Args:
        embed_dim: E.
        num_heads: N.
        mlp_dim: the MLP's hidden width (GELU).
        selector: the model's HeadSelector.
        layer: this block's index.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        selector: HeadSelector,
        layer: int,
    ) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(embed_dim)
        self.attention = SparseHeadGradient(
            CausalSelfAttentionHeads(embed_dim, num_heads),
            nn.Linear(embed_dim, embed_dim),
            num_heads=num_heads,
            selector=selector,
            layer=layer,
        )
        self.norm_mlp = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, embed_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_attention(x))
        return x + self.mlp(self.norm_mlp(x))


class CausalTransformer(nn.Module):
    r"""A small causal pre-norm transformer for sequences of real vectors.

    .. math::
        z^0_\tau = W^{E} x_\tau + b^{E} + p_\tau                     \qquad (4)

        z^l = \mathrm{Block}_l(z^{l-1}),\ l = 1..L;\quad
        \hat y_\tau = W^{R}\, \mathrm{LN}(z^L_\tau) + b^{R}           \qquad (5)

    with learned positions p (the first T of `context`) and blocks as in
    `TransformerBlock`. Every forward pass with gradients enabled draws the
    step's head mask from `selector` (equations (2)-(3)); f = 1 (the default)
    is the dense model. In online use, feed the last `context` inputs and take
    the loss at the newest position, `model(window)[:, -1]`.

    Args:
        input_size: I.
        output_size: O.
        context: the longest window T the model accepts.
        embed_dim: E (divisible by `num_heads`).
        num_heads: N heads per layer (12 by default, so that every fraction of
            the C8 sweep selects a different count).
        num_layers: L.
        mlp_dim: the MLP width; None means 4 E.
        fraction, selection, draws, generator: as in `HeadSelector`.

    Shapes:
        input x: (B, T, I), T <= context; output (B, T, O).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        context: int,
        embed_dim: int = 48,
        num_heads: int = 12,
        num_layers: int = 2,
        mlp_dim: int | None = None,
        fraction: float = 1.0,
        selection: Literal["random", "fixed"] = "random",
        draws: Literal["per_layer", "shared"] = "per_layer",
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("output_size", output_size)):
            _check_positive_int(value, name, "CausalTransformer")
        _check_positive_int(context, "context", "CausalTransformer")
        self.context = context
        self.selector = HeadSelector(
            num_heads,
            num_layers,
            fraction=fraction,
            selection=selection,
            draws=draws,
            generator=generator,
        )
        self.embed = nn.Linear(input_size, embed_dim)
        self.position = nn.Parameter(0.02 * torch.randn(context, embed_dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(
                embed_dim,
                num_heads,
                4 * embed_dim if mlp_dim is None else mlp_dim,
                selector=self.selector,
                layer=layer,
            )
            for layer in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.readout = nn.Linear(embed_dim, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or not 1 <= x.shape[1] <= self.context:
            raise ValueError(
                f"CausalTransformer: `x` expected (B, T, I) with 1 <= T <= "
                f"context={self.context}, got shape {tuple(x.shape)}."
            )
        if torch.is_grad_enabled():
            self.selector.draw()

        z = self.embed(x) + self.position[: x.shape[1]]
        for block in self.blocks:
            z = block(z)
        return self.readout(self.norm(z))


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool
) -> torch.Tensor:
    # Equation (1), written out (no fused kernel) so every op is inspectable.
    scores = query @ key.transpose(-2, -1) * query.shape[-1] ** -0.5
    if causal:
        steps = query.shape[-2]
        future = torch.ones(steps, steps, dtype=torch.bool, device=query.device)
        scores = scores.masked_fill(future.triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ value


def _check_fraction(fraction: float, who: str) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(f"{who}: `fraction` must be a number, got {fraction!r}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{who}: `fraction` must be in [0, 1], got {fraction}.")


def _check_positive_int(value: int, name: str, who: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}: `{name}` must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"{who}: `{name}` must be >= 1, got {value}.")


def _check_choice(value: str, name: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(
            f"HeadSelector: `{name}` must be one of {', '.join(options)}; "
            f"got {value!r}."
        )


def _check_selector(selector: HeadSelector, num_heads: int, layer: int) -> None:
    if not isinstance(selector, HeadSelector):
        raise TypeError(
            "SparseHeadGradient: `selector` expected a HeadSelector or None, got "
            f"{type(selector).__name__}."
        )
    if selector.num_heads != num_heads:
        raise ValueError(
            f"SparseHeadGradient: `num_heads`={num_heads} differs from the "
            f"selector's num_heads={selector.num_heads}."
        )
    if isinstance(layer, bool) or not 0 <= layer < selector.num_layers:
        raise ValueError(
            f"SparseHeadGradient: `layer` must be in [0, {selector.num_layers - 1}] "
            f"(the selector's layers), got {layer}."
        )


def _check_head_outputs(head_outputs: torch.Tensor, num_heads: int) -> None:
    if head_outputs.dim() != 4 or head_outputs.shape[1] != num_heads:
        raise ValueError(
            f"SparseHeadGradient: `heads` must return per-head outputs (B, "
            f"heads={num_heads}, T, d_head), got shape {tuple(head_outputs.shape)}."
        )
