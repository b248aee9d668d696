"""Modifiers for the rotation method (arXiv 2504.13989, QuaRot layout): ``rotate`` and ``kv_cache``.

``rotate`` fuses norms, (expands,) and applies R1–R4 so that the full-precision model is unchanged;
``kv_cache`` quantizes K (after RoPE and R3) and V inside the attention wrapper. Listed in that order,
before ``gptq`` (which calibrates on the rotated model, with float activations, as QuaRot does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spikequant.algorithms.base import Modifier, QuantContext, register
from spikequant.models import model_dims
from spikequant.quant.spec import QuantSpec
from spikequant.transforms import RotationConfig, install_kv_quantizers, rotate_model
from spikequant.transforms.rotation import ROTATION_KINDS


@register
@dataclass
class Rotate(Modifier):
    """R1 (``hadamard``: randomized Hadamard, ``random``: Haar, ``none``), R2 per head, online R3 and R4;
    ``o_online``: also an online Hadamard on the o_proj input across all heads (QuaRot's cross-head step).

    ``seed`` (default: the recipe's) seeds R1/R2. ``expand``: ``{hidden: d, mlp: d'}`` extra widths; a
    dimension with no Hadamard construction is expanded automatically to the next constructible size.
    """

    type = "rotate"
    r1: str = "hadamard"
    r2: bool = True
    r3: bool = True
    r4: bool = True
    o_online: bool = False
    seed: int | None = None
    expand: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r1 not in ROTATION_KINDS:
            raise ValueError(f"r1 {self.r1!r} not one of {', '.join(ROTATION_KINDS)}")
        if not isinstance(self.expand, dict):
            raise ValueError(f"expand must be a mapping like {{hidden: 64, mlp: 0}}, got {self.expand!r}")
        RotationConfig(self.r1, self.r2, self.r3, self.r4, 0, dict(self.expand), self.o_online)  # validates the keys

    def apply(self, ctx: QuantContext) -> None:
        seed = ctx.seed if self.seed is None else self.seed
        cfg = RotationConfig(self.r1, self.r2, self.r3, self.r4, seed, dict(self.expand), self.o_online)
        ctx.findings["rotation"] = rotate_model(ctx.model, cfg)


GROUPINGS = ("head", "token")


def kv_spec(bits: int, symmetric: bool, grouping: str | int, clip_ratio: float, head_dim: int) -> QuantSpec:
    """``head``: one scale per (token, head) (group = head_dim); ``token``: one per token over all
    heads; an integer: that group size along each token's head_dim·heads values."""
    if grouping == "token":
        return QuantSpec(bits=bits, symmetric=symmetric, granularity="token", clip_ratio=clip_ratio)
    size = head_dim if grouping == "head" else grouping
    return QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=size, clip_ratio=clip_ratio)


@register
@dataclass
class KVCache(Modifier):
    """Fake-quantize the KV cache: K after RoPE (and R3), V as v_proj writes it; dynamic, per token.

    ``k_group``/``v_group``: ``head`` (one scale per token and head, the paper's group = head_dim),
    ``token`` or an integer group size. Asymmetric by default, as the paper states. ``bits: null``
    leaves the cache in float (an ablation).
    """

    type = "kv_cache"
    stage = "attach"
    bits: int | None = 4
    symmetric: bool = False
    k_group: str | int = "head"
    v_group: str | int = "head"
    k_clip: float = 1.0
    v_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("k_group", "v_group"):
            g = getattr(self, name)
            if not (g in GROUPINGS or (isinstance(g, int) and g > 0)):
                raise ValueError(f"{name} must be head, token or a positive group size, got {g!r}")
        if self.bits is not None:
            kv_spec(self.bits, self.symmetric, "token", self.k_clip, 1)  # validates bits and clip
            kv_spec(self.bits, self.symmetric, "token", self.v_clip, 1)

    def apply(self, ctx: QuantContext) -> None:
        if self.bits is None:
            return
        hd = model_dims(ctx.model).head_dim
        k = kv_spec(self.bits, self.symmetric, self.k_group, self.k_clip, hd)
        v = kv_spec(self.bits, self.symmetric, self.v_group, self.v_clip, hd)
        install_kv_quantizers(ctx.model, k, v)
        ctx.findings["kv_cache"] = {"k": k.label, "v": v.label}
