"""Dimension Expansion (METHODS §B.5): widen the residual stream n → n + d and/or the MLP m → m + d′
with zero rows/columns, so that a Hadamard rotation of the wider size exists (or spreads spikes thinner).

Residual: embedding columns, o_proj/down_proj output rows and q/k/v/gate/up/lm_head input columns gain
zeros; the extra residual channels are zero, and stay so through every layer. The weightless RMSNorms keep
dividing sum(x²) by the original n, so after any rotation of the wider stream the full-precision model is
unchanged. MLP: gate/up output rows and down_proj input columns gain zeros (silu(0)·0 = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spikequant.errors import SpikequantError
from spikequant.hadamard import is_constructible, next_constructible
from spikequant.hadamard.constructions import FAST_FACTOR
from spikequant.models.arch import decoder_layers, get_arch, model_dims
from spikequant.transforms.norms import RMSNorm, residual_norm_paths


class ExpansionError(SpikequantError, ValueError):
    """An expansion request that cannot be honoured (negative, or onto a size with no Hadamard)."""


@torch.no_grad()
def _pad(param: nn.Parameter, dim: int, extra: int) -> None:
    shape = list(param.shape)
    shape[dim] = extra
    param.data = torch.cat([param.data, param.data.new_zeros(shape)], dim=dim)


def _pad_linear(lin: nn.Linear, extra_in: int = 0, extra_out: int = 0) -> None:
    if extra_in:
        _pad(lin.weight, 1, extra_in)
        lin.in_features += extra_in
    if extra_out:
        _pad(lin.weight, 0, extra_out)
        if lin.bias is not None:
            _pad(lin.bias, 0, extra_out)
        lin.out_features += extra_out


EXPANSION_KEY = "spikequant_expansion"


def _record(model: nn.Module, key: str, old: int, new: int) -> None:
    # Kept on the config (saved with it): original and expanded size, so a reload can rebuild the shapes.
    rec = dict(getattr(model.config, EXPANSION_KEY, None) or {})
    rec[key] = [rec.get(key, [old])[0], new]
    setattr(model.config, EXPANSION_KEY, rec)


def _pin_head_dim(model: nn.Module) -> None:
    # Some configs (Qwen2) derive head_dim from hidden_size // heads; pin it before hidden_size changes.
    model.config.head_dim = model_dims(model).head_dim


def expand_hidden(model: nn.Module, extra: int) -> None:
    """Residual stream n → n + extra (needs weightless :class:`RMSNorm` norms, i.e. after fuse_norms)."""
    if extra < 0:
        raise ExpansionError(f"hidden expansion must be >= 0, got {extra}")
    if extra == 0:
        return
    arch = get_arch(model)
    dims = model_dims(model)
    for path in residual_norm_paths(model):
        norm = model.get_submodule(path)
        if not isinstance(norm, RMSNorm) or not torch.all(norm.weight == 1):
            raise ExpansionError(f"hidden expansion needs weightless norms ({path} is not): call fuse_norms first")
    _pin_head_dim(model)
    embed = model.get_submodule(arch.embed)
    _pad(embed.weight, 1, extra)
    embed.embedding_dim += extra
    _pad_linear(model.get_submodule(arch.lm_head), extra_in=extra)  # type: ignore[arg-type]
    for layer in decoder_layers(model):
        for p in arch.residual_readers:
            _pad_linear(layer.get_submodule(p), extra_in=extra)  # type: ignore[arg-type]
        for p in arch.residual_writers:
            _pad_linear(layer.get_submodule(p), extra_out=extra)  # type: ignore[arg-type]
    for path in residual_norm_paths(model):
        norm = model.get_submodule(path)
        _pad(norm.weight, 0, extra)
        norm.weight.data[-extra:] = 1.0  # weightless: every channel scaled by 1
    model.config.hidden_size = dims.hidden + extra
    _record(model, "hidden_size", dims.hidden, dims.hidden + extra)


def expand_mlp(model: nn.Module, extra: int) -> None:
    """MLP width m → m + extra (zero gate/up rows, zero down_proj columns)."""
    if extra < 0:
        raise ExpansionError(f"mlp expansion must be >= 0, got {extra}")
    if extra == 0:
        return
    arch = get_arch(model)
    for layer in decoder_layers(model):
        for p in (arch.gate_proj, arch.up_proj):
            _pad_linear(layer.get_submodule(p), extra_out=extra)  # type: ignore[arg-type]
        _pad_linear(layer.get_submodule(arch.down_proj), extra_in=extra)  # type: ignore[arg-type]
        mlp = layer.get_submodule(arch.down_proj.rpartition(".")[0]) if "." in arch.down_proj else layer
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size += extra
    m = model_dims(model).intermediate
    model.config.intermediate_size = m + extra
    _record(model, "intermediate_size", m, m + extra)


def hadamard_target(n: int) -> int:
    """n itself when a Hadamard of order n exists, else the smallest constructible order above it with a
    fast dense factor."""
    if is_constructible(n):
        return n
    return next_constructible(n, count=1, max_factor=FAST_FACTOR)[0]


def resolve_extra(n: int, requested: int | None, needs_hadamard: bool, what: str) -> int:
    """The expansion to apply to a dimension of size n: ``requested`` (checked to land on a constructible
    size when a Hadamard is needed), or the automatic minimum (0 when n is constructible)."""
    if requested is None:
        return hadamard_target(n) - n if needs_hadamard else 0
    if not isinstance(requested, int) or requested < 0:
        raise ExpansionError(f"expand.{what} must be a non-negative integer, got {requested!r}")
    if needs_hadamard and not is_constructible(n + requested):
        above = next_constructible(n + requested - 1)
        raise ExpansionError(
            f"expand.{what}: {n} + {requested} = {n + requested} has no Hadamard construction; "
            f"constructible sizes from there: {', '.join(str(s) for s in above)} "
            f"(expand.{what}: {above[0] - n})"
        )
    return requested


@dataclass(frozen=True)
class ExpansionCost:
    """Extra linear compute of an expansion, and the paper's break-even bound."""

    hidden: int
    extra_hidden: int
    mlp: int
    extra_mlp: int
    linear_macs: int  # per token, decoder linears + lm_head, before expansion
    expanded_macs: int

    @property
    def extra_fraction(self) -> float:
        return self.expanded_macs / self.linear_macs - 1

    def break_even(self, bits: int, expanded_bits: int) -> int:
        """Largest d for which (n + d) columns at ``expanded_bits`` cost no more than n at ``bits``:
        d ≤ n(b − b′)/b′ (METHODS §B.5)."""
        return self.hidden * (bits - expanded_bits) // expanded_bits

    def to_dict(self) -> dict[str, float | int]:
        return {"hidden": self.hidden, "extra_hidden": self.extra_hidden, "mlp": self.mlp,
                "extra_mlp": self.extra_mlp, "extra_linear_macs": round(self.extra_fraction, 5),
                "break_even_d_4to3_bits": self.break_even(4, 3)}


def expansion_cost(model: nn.Module, extra_hidden: int, extra_mlp: int) -> ExpansionCost:
    """Per-token multiply-adds of the decoder linears and lm_head, before and after the expansion
    (``model`` unexpanded)."""
    d = model_dims(model)
    attn_out = d.num_heads * d.head_dim
    kv_out = d.num_kv_heads * d.head_dim

    def macs(n: int, m: int) -> int:
        per_layer = n * (attn_out + 2 * kv_out) + attn_out * n + 3 * n * m
        return d.num_layers * per_layer + n * d.vocab

    return ExpansionCost(d.hidden, extra_hidden, d.intermediate, extra_mlp,
                         macs(d.hidden, d.intermediate), macs(d.hidden + extra_hidden, d.intermediate + extra_mlp))
