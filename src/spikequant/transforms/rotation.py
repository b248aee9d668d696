"""Offline rotations fused into weights: R1 (residual stream), R2 (per head, V→O) and the fused half of
R4 (down_proj input). The online halves (R3 on Q/K, R4 on the down_proj input) live in ``online.py``.

Convention: activations are row vectors, a rotation R acts as x ↦ x R. A linear y = x Wᵀ that *reads*
the rotated stream gets W ← W R; one that *writes* it gets W ← Rᵀ W (bias b ← b R).
All fusions are computed in float64 and cast back to the weight dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spikequant.errors import SpikequantError
from spikequant.hadamard import (
    RandomizedHadamard,
    hadamard_transform,
    is_constructible,
    next_constructible,
    random_orthogonal_matrix,
)
from spikequant.models.arch import decoder_layers, get_arch, model_dims
from spikequant.transforms.norms import RMSNorm

ROTATION_KINDS = ("hadamard", "random", "none")


class RotationError(SpikequantError, ValueError):
    """A rotation cannot be built for this size (the message names the size and the fix)."""


@dataclass
class Rotation:
    """An orthogonal n x n matrix R, applied as x ↦ x R on the last dim.

    ``kind`` ``hadamard``: R = diag(s)·Hᵀ/√n with seeded random signs s (randomized Hadamard), applied by
    the fast transform; ``random``: a Haar-random orthogonal matrix (dense).
    """

    n: int
    kind: str = "hadamard"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("hadamard", "random"):
            raise RotationError(f"rotation kind {self.kind!r} not one of hadamard, random")
        if self.kind == "hadamard" and not is_constructible(self.n):
            raise RotationError(
                f"size {self.n} has no Hadamard construction; nearest constructible sizes above: "
                f"{', '.join(map(str, next_constructible(self.n)))} (use expansion, or r1: random)"
            )
        self._dense: torch.Tensor | None = None
        self._rh = RandomizedHadamard(self.n, self.seed) if self.kind == "hadamard" else None

    def matrix(self) -> torch.Tensor:
        """The dense float64 R."""
        if self._rh is not None:
            return self._rh.matrix()
        if self._dense is None:
            self._dense = random_orthogonal_matrix(self.n, self.seed)
        return self._dense

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R over the last dim, in x's dtype (callers pass float64)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"last dim {x.shape[-1]} != rotation size {self.n}")
        if self._rh is not None:
            return self._rh.apply(x)
        return x @ self.matrix().to(x.device, x.dtype)

    def left_t(self, w: torch.Tensor) -> torch.Tensor:
        """Rᵀ @ w over the first dim (for weights that write the rotated space)."""
        return self.right(w.transpose(0, -1)).transpose(0, -1)


def _set_weight(module: nn.Module, w: torch.Tensor, name: str = "weight") -> None:
    old = getattr(module, name)
    old.data = w.to(old.dtype).contiguous()


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _check_weightless(model: nn.Module) -> None:
    arch = get_arch(model)
    norm = model.get_submodule(arch.final_norm)
    if not isinstance(norm, RMSNorm) or not torch.all(norm.weight == 1):
        raise RotationError("R1 needs weightless norms: call fuse_norms(model) first")


def _check_r1(model: nn.Module, rot: Rotation) -> None:
    _check_weightless(model)
    dims = model_dims(model)
    if rot.n != dims.hidden:
        raise RotationError(f"R1 size {rot.n} != hidden_size {dims.hidden}")


@torch.no_grad()
def rotate_residual_ends(model: nn.Module, rot: Rotation) -> None:
    """The ends' share of R1: the embedding and lm_head W ← W R."""
    _check_r1(model, rot)
    arch = get_arch(model)
    embed = model.get_submodule(arch.embed)
    _set_weight(embed, rot.right(_f64(embed.weight)))
    lin = model.get_submodule(arch.lm_head)
    _set_weight(lin, rot.right(_f64(lin.weight)))


@torch.no_grad()
def rotate_residual_layer(model: nn.Module, i: int, rot: Rotation) -> None:
    """Layer ``i``'s share of R1: its residual readers W ← W R, its writers (o_proj/down_proj) W ← Rᵀ W."""
    arch = get_arch(model)
    base = arch.layer_path(i) + "."
    for p in arch.residual_readers:
        lin = model.get_submodule(base + p)
        _set_weight(lin, rot.right(_f64(lin.weight)))
    for p in arch.residual_writers:
        lin = model.get_submodule(base + p)
        _set_weight(lin, rot.left_t(_f64(lin.weight)))
        if lin.bias is not None:
            _set_weight(lin, rot.right(_f64(lin.bias)), "bias")


@torch.no_grad()
def rotate_residual(model: nn.Module, rot: Rotation) -> None:
    """R1: embedding and every reader of the residual stream W ← W R; o_proj/down_proj W ← Rᵀ W. Every
    weight is rotated on its own: :func:`rotate_residual_ends` plus :func:`rotate_residual_layer` of
    every layer."""
    _check_r1(model, rot)
    rotate_residual_ends(model, rot)
    for i in range(model_dims(model).num_layers):
        rotate_residual_layer(model, i, rot)


@torch.no_grad()
def rotate_heads_layer(layer: nn.Module, arch, hd: int, rot: Rotation) -> None:
    """One decoder layer's share of :func:`rotate_heads`."""
    v, o = layer.get_submodule(arch.v_proj), layer.get_submodule(arch.o_proj)
    wv = _f64(v.weight).view(-1, hd, v.in_features)  # (kv_heads, hd, hidden)
    _set_weight(v, rot.right(wv.transpose(1, 2)).transpose(1, 2).reshape(v.weight.shape))
    if v.bias is not None:
        _set_weight(v, rot.right(_f64(v.bias).view(-1, hd)).flatten(), "bias")
    wo = _f64(o.weight).view(o.out_features, -1, hd)  # (hidden, heads, hd)
    _set_weight(o, rot.right(wo).reshape(o.weight.shape))


@torch.no_grad()
def rotate_heads(model: nn.Module, rot: Rotation) -> None:
    """R2: per head, V ↦ V R (v_proj rows and bias, per KV head) and o_proj input columns ↦ · R (per query
    head). Attention mixes V rows with weights that sum to 1, so each head's output is rotated by R as
    well, and o_proj undoes it; GQA needs nothing special because R is the same for every head."""
    arch = get_arch(model)
    dims = model_dims(model)
    if rot.n != dims.head_dim:
        raise RotationError(f"R2 size {rot.n} != head_dim {dims.head_dim}")
    for layer in decoder_layers(model):
        rotate_heads_layer(layer, arch, dims.head_dim, rot)


def require_input_hadamard(model: nn.Module, proj: str) -> int:
    """The input size of ``proj`` (same in every layer), or a :class:`RotationError` naming the sizes that
    work when it has no Hadamard construction; lets callers fail before touching the model."""
    arch = get_arch(model)
    m = decoder_layers(model)[0].get_submodule(getattr(arch, proj)).in_features
    if not is_constructible(m):
        what = "intermediate_size" if proj == "down_proj" else f"{proj} input size (heads x head_dim)"
        fix = f"use expansion: {{mlp: {next_constructible(m)[0] - m}}}" if proj == "down_proj" else "turn it off"
        raise RotationError(
            f"{what} {m} has no Hadamard construction for the online {proj} rotation; nearest constructible "
            f"sizes above: {', '.join(map(str, next_constructible(m)))} ({fix})"
        )
    return m


@torch.no_grad()
def fuse_input_hadamard_layer(layer: nn.Module, arch, proj: str) -> None:
    """One decoder layer's share of :func:`fuse_input_hadamard` (sizes checked by the caller)."""
    lin = layer.get_submodule(getattr(arch, proj))
    _set_weight(lin, hadamard_transform(_f64(lin.weight)))


@torch.no_grad()
def fuse_input_hadamard(model: nn.Module, proj: str) -> None:
    """Fused half of an online input Hadamard on ``proj`` (``down_proj``: R4; ``o_proj``: across all
    heads) in every layer: W ← W Mᵀ, where the online half maps the input z ↦ z Mᵀ
    (``hadamard_transform``), M the normalized Hadamard of the linear's input size."""
    require_input_hadamard(model, proj)
    arch = get_arch(model)
    for layer in decoder_layers(model):
        fuse_input_hadamard_layer(layer, arch, proj)


def fuse_down_hadamard(model: nn.Module) -> None:
    """Fused half of R4: down_proj W ← W Mᵀ, M the normalized Hadamard of size intermediate_size."""
    fuse_input_hadamard(model, "down_proj")


def spike_shrink(n: int) -> dict[str, float]:
    """Expected max |entry| of a rotated unit spike (B.4): Hadamard 1/√n, Haar about √(2 ln n / n)."""
    return {"hadamard": 1 / math.sqrt(n), "random": math.sqrt(2 * math.log(n) / n)}
