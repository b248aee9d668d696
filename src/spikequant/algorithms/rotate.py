"""Modifiers for the rotation method (arXiv 2504.13989, QuaRot layout): ``rotate`` and ``kv_cache``.

``rotate`` fuses norms, (expands,) and applies R1–R4 so that the full-precision model is unchanged;
``kv_cache`` quantizes K (after RoPE and R3) and V inside the attention wrapper. Listed in that order,
before ``gptq`` (which calibrates on the rotated model, with float activations, as QuaRot does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spikequant.algorithms.base import Modifier, QuantContext, register
from spikequant.errors import RecipeError
from spikequant.hadamard import is_constructible
from spikequant.models import decoder_layers, get_arch, model_dims
from spikequant.quant.spec import QuantSpec
from spikequant.transforms import RotationConfig, install_kv_quantizers, rotate_model
from spikequant.transforms.rotation import ROTATION_KINDS


@register
@dataclass
class Rotate(Modifier):
    """R1 (``hadamard``: randomized Hadamard, ``random``: Haar, ``none``), R2 per head, online R3 and R4;
    ``o_online``: also an online Hadamard on the o_proj input across all heads (QuaRot's cross-head step,
    ``spcl/QuaRot`` ``fake_quant/main.py``: ``online_partial_had`` on every o_proj). ``true`` needs a
    Hadamard of heads x head_dim and fails without one; ``auto`` turns it on where that Hadamard exists
    and off (reported in the findings) where it does not.

    ``seed`` (default: the recipe's) seeds R1/R2. ``expand``: ``{hidden: d, mlp: d'}`` extra widths; a
    dimension with no Hadamard construction is expanded automatically to the next constructible size.
    """

    type = "rotate"
    r1: str = "hadamard"
    r2: bool = True
    r3: bool = True
    r4: bool = True
    o_online: bool | str = False
    seed: int | None = None
    expand: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r1 not in ROTATION_KINDS:
            raise ValueError(f"r1 {self.r1!r} not one of {', '.join(ROTATION_KINDS)}")
        if not isinstance(self.expand, dict):
            raise ValueError(f"expand must be a mapping like {{hidden: 64, mlp: 0}}, got {self.expand!r}")
        if self.o_online not in (True, False, "auto"):
            raise ValueError(f"o_online must be true, false or auto, got {self.o_online!r}")
        RotationConfig(self.r1, self.r2, self.r3, self.r4, 0, dict(self.expand))  # validates the keys

    def config(self, ctx: QuantContext) -> RotationConfig:
        """The rotation this modifier applies to ``ctx.model`` (``o_online: auto`` resolved)."""
        seed = ctx.seed if self.seed is None else self.seed
        o_online = self.o_online
        if o_online == "auto":
            o_online = is_constructible(decoder_layers(ctx.model)[0].get_submodule(get_arch(ctx.model).o_proj)
                                        .in_features)
        return RotationConfig(self.r1, self.r2, self.r3, self.r4, seed, dict(self.expand), bool(o_online))

    def apply(self, ctx: QuantContext) -> None:
        self.record(ctx, rotate_model(ctx.model, self.config(ctx)))

    def record(self, ctx: QuantContext, report: dict) -> None:
        ctx.findings["rotation"] = report
        if self.o_online == "auto":
            ctx.findings["rotation"]["o_online_auto"] = report["o_online"]


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

    def specs(self, ctx: QuantContext) -> tuple[QuantSpec, QuantSpec] | None:
        """The K and V quantizer specs for ``ctx.model`` (None: the cache stays in float)."""
        if self.bits is None:
            return None
        dims = model_dims(ctx.model)
        hd, width = dims.head_dim, dims.num_kv_heads * dims.head_dim
        for name, g in (("k_group", self.k_group), ("v_group", self.v_group)):
            if isinstance(g, int) and width % g:
                raise RecipeError(f"kv_cache: {name} {g} does not divide the {width} values per token of the "
                                  f"K/V cache ({dims.num_kv_heads} KV heads x head_dim {hd}) in every layer")
        k = kv_spec(self.bits, self.symmetric, self.k_group, self.k_clip, hd)
        v = kv_spec(self.bits, self.symmetric, self.v_group, self.v_clip, hd)
        return k, v

    def apply(self, ctx: QuantContext) -> None:
        specs = self.specs(ctx)
        if specs is None:
            return
        install_kv_quantizers(ctx.model, *specs)
        self.record(ctx, specs)

    def record(self, ctx: QuantContext, specs: tuple[QuantSpec, QuantSpec]) -> None:
        ctx.findings["kv_cache"] = {"k": specs[0].label, "v": specs[1].label}
