"""The whole rotation layout in one call, and the serializable state that restores its online parts.

Order (METHODS §B.1): untie embeddings → fuse RMSNorm scales → (expand) → R1 → R2 → R4 (fused + online)
→ R3 (online). The saved weights hold every fused rotation; :func:`transform_state` describes what must be
re-installed on a reloaded model (weightless norms and their divisor, R3, R4, KV quantizers) and
:func:`restore_transforms` does it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from spikequant.models.arch import get_arch, model_dims
from spikequant.quant.kv import KVQuantizer
from spikequant.quant.spec import QuantSpec
from spikequant.transforms.expand import (
    EXPANSION_KEY,
    expand_hidden,
    expand_mlp,
    expansion_cost,
    resolve_extra,
)
from spikequant.transforms.norms import (
    RMSNorm,
    fuse_final_norm,
    fuse_layer_norms,
    fuse_norms,
    replace_norm,
    residual_norm_paths,
)
from spikequant.transforms.online import (
    attention_transforms,
    has_online_hadamard,
    has_r4,
    install_online_hadamard,
    install_r3,
    install_r4,
    installed_attention_transforms,
)
from spikequant.transforms.rotation import (
    ROTATION_KINDS,
    Rotation,
    RotationError,
    fuse_down_hadamard,
    fuse_input_hadamard,
    fuse_input_hadamard_layer,
    require_input_hadamard,
    rotate_heads,
    rotate_heads_layer,
    rotate_residual,
    rotate_residual_ends,
    rotate_residual_layer,
)

STATE_VERSION = 1


@dataclass
class RotationConfig:
    """What :func:`rotate_model` does.

    ``r1``: ``hadamard`` (randomized Hadamard, seeded signs), ``random`` (Haar orthogonal) or ``none``;
    ``r2``: per-head Hadamard-kind rotation on V→O (randomized Hadamard unless r1 is ``random``, then Haar);
    ``r3``/``r4``: online Hadamards on Q/K after RoPE and on the down_proj input; ``o_online``: an online
    Hadamard on the o_proj input across all heads (QuaRot's cross-head step; off by default, needs
    heads x head_dim constructible), with its fused half in o_proj. ``expand``: extra
    ``hidden``/``mlp`` width; a dimension whose Hadamard is needed but missing is expanded automatically
    to the smallest constructible size above it. ``fuse_norms`` runs whenever any rotation does.
    """

    r1: str = "hadamard"
    r2: bool = True
    r3: bool = True
    r4: bool = True
    seed: int = 0
    expand: dict[str, int] = field(default_factory=dict)
    o_online: bool = False

    def __post_init__(self) -> None:
        if self.r1 not in ROTATION_KINDS:
            raise RotationError(f"r1 {self.r1!r} not one of {', '.join(ROTATION_KINDS)}")
        for k in self.expand:
            if k not in ("hidden", "mlp"):
                raise RotationError(f"expand key {k!r} not one of hidden, mlp")

    @property
    def any(self) -> bool:
        return self.r1 != "none" or self.r2 or self.r3 or self.r4 or self.o_online or bool(self.expand)


def rotate_model(model: nn.Module, config: RotationConfig) -> dict[str, Any]:
    """Apply ``config`` to ``model`` in place (full-precision output unchanged); returns a report."""
    dims = model_dims(model)
    report: dict[str, Any] = {"r1": config.r1, "r2": config.r2, "r3": config.r3, "r4": config.r4,
                              "o_online": config.o_online, "seed": config.seed}
    if not config.any:
        return report
    head_kind = "random" if config.r1 == "random" else "hadamard"
    # Fail on sizes before touching the model.
    extra_h = resolve_extra(dims.hidden, config.expand.get("hidden"), config.r1 == "hadamard", "hidden")
    extra_m = resolve_extra(dims.intermediate, config.expand.get("mlp"), config.r4, "mlp")
    r1 = Rotation(dims.hidden + extra_h, config.r1, config.seed) if config.r1 != "none" else None
    r2 = Rotation(dims.head_dim, head_kind, config.seed + 1) if config.r2 else None
    if config.r3:
        Rotation(dims.head_dim, "hadamard")  # R3 is a plain Hadamard of head_dim: check it exists
    if config.o_online:
        require_input_hadamard(model, "o_proj")
    cost = expansion_cost(model, extra_h, extra_m)
    fuse_norms(model)
    if extra_h:
        expand_hidden(model, extra_h)
    if extra_m:
        expand_mlp(model, extra_m)
    if r1 is not None:
        rotate_residual(model, r1)
    if r2 is not None:
        rotate_heads(model, r2)
    if config.r4:
        fuse_down_hadamard(model)
        install_r4(model)
    if config.o_online:
        fuse_input_hadamard(model, "o_proj")
        install_online_hadamard(model, "o_proj")
    if config.r3:
        install_r3(model)
    new = model_dims(model)
    report.update({"hidden": [dims.hidden, new.hidden], "mlp": [dims.intermediate, new.intermediate],
                   "head_dim": dims.head_dim})
    if extra_h or extra_m:
        report["expansion"] = cost.to_dict()
    return report


@dataclass
class LayerwiseRotation:
    """:func:`rotate_model` split into the part at the ends and each decoder layer's share, for a model
    streamed one layer at a time (``spikequant.streaming``). R1 is one matrix for the whole residual
    stream, but every weight it touches is rotated on its own, so the ends (final norm into lm_head, R1 on
    the embedding and lm_head, the online hooks, R3) and each layer (its norms, its R1 readers/writers,
    R2, the fused halves of R4 and the o_proj Hadamard) can run at different times with the results of
    :func:`rotate_model` bit for bit (``tests/streaming``). Dimension Expansion widens every layer and
    the ends together and is not split: :meth:`prepare` refuses a config that needs it."""

    config: RotationConfig
    r1: Rotation | None
    r2: Rotation | None
    head_dim: int

    @classmethod
    def prepare(cls, model: nn.Module, config: RotationConfig) -> LayerwiseRotation:
        """Check every size and build the rotations (the model is not changed)."""
        dims = model_dims(model)
        extra_h = resolve_extra(dims.hidden, config.expand.get("hidden"), config.r1 == "hadamard", "hidden")
        extra_m = resolve_extra(dims.intermediate, config.expand.get("mlp"), config.r4, "mlp")
        if extra_h or extra_m:
            raise RotationError(f"dimension expansion (hidden +{extra_h}, mlp +{extra_m}) is not supported on a "
                                "streamed model; run it in memory (--offload none)")
        head_kind = "random" if config.r1 == "random" else "hadamard"
        r1 = Rotation(dims.hidden, config.r1, config.seed) if config.r1 != "none" else None
        r2 = Rotation(dims.head_dim, head_kind, config.seed + 1) if config.r2 else None
        if config.r3:
            Rotation(dims.head_dim, "hadamard")
        if config.o_online:
            require_input_hadamard(model, "o_proj")
        if config.r4:
            require_input_hadamard(model, "down_proj")
        return cls(config, r1, r2, dims.head_dim)

    def apply_ends(self, model: nn.Module) -> None:
        """Embedding, final norm and lm_head, and the online transforms on every layer (hooks and the
        attention wrapper hold no weights, so they go on the whole skeleton at once)."""
        if not self.config.any:
            return
        fuse_final_norm(model)
        if self.r1 is not None:
            rotate_residual_ends(model, self.r1)
        if self.config.r4:
            install_r4(model)
        if self.config.o_online:
            install_online_hadamard(model, "o_proj")
        if self.config.r3:
            install_r3(model)

    def apply_layer(self, model: nn.Module, i: int) -> None:
        """Decoder layer ``i``'s weights (only its tensors are touched)."""
        if not self.config.any:
            return
        arch = get_arch(model)
        fuse_layer_norms(model, i)
        if self.r1 is not None:
            rotate_residual_layer(model, i, self.r1)
        layer = model.get_submodule(arch.layer_path(i))
        if self.r2 is not None:
            rotate_heads_layer(layer, arch, self.head_dim, self.r2)
        if self.config.r4:
            fuse_input_hadamard_layer(layer, arch, "down_proj")
        if self.config.o_online:
            fuse_input_hadamard_layer(layer, arch, "o_proj")

    def report(self, model: nn.Module) -> dict[str, Any]:
        """What :func:`rotate_model` reports for the same config."""
        c, dims = self.config, model_dims(model)
        out: dict[str, Any] = {"r1": c.r1, "r2": c.r2, "r3": c.r3, "r4": c.r4, "o_online": c.o_online,
                               "seed": c.seed}
        if c.any:
            out.update({"hidden": [dims.hidden, dims.hidden], "mlp": [dims.intermediate, dims.intermediate],
                        "head_dim": dims.head_dim})
        return out


def install_kv_quantizers(model: nn.Module, k: QuantSpec | None, v: QuantSpec | None) -> None:
    """Quantize K (after RoPE and R3) and V in every attention layer through the attention wrapper."""
    for t in attention_transforms(model):
        t.k_quantizer = None if k is None else KVQuantizer(k)
        t.v_quantizer = None if v is None else KVQuantizer(v)


def transform_state(model: nn.Module) -> dict[str, Any] | None:
    """What a reloaded model needs re-installed (None when nothing was transformed)."""
    arch = get_arch(model)
    final = model.get_submodule(arch.final_norm)
    fused = isinstance(final, RMSNorm)
    attn = installed_attention_transforms(model)
    r4 = has_r4(model)
    o_online = has_online_hadamard(model, "o_proj")
    if not fused and attn is None and not r4 and not o_online:
        return None
    state: dict[str, Any] = {"version": STATE_VERSION, "norms": None, "r4": r4, "o_online": o_online,
                             "r3": False, "kv": None,
                             "expansion": getattr(model.config, EXPANSION_KEY, None)}
    if fused:
        state["norms"] = {"dim": final.dim}
    if attn is not None:
        state["r3"] = all(t.r3 for t in attn)
        state["kv"] = [{"k": None if t.k_quantizer is None else t.k_quantizer.spec.to_dict(),
                        "v": None if t.v_quantizer is None else t.v_quantizer.spec.to_dict()} for t in attn]
    return state


@contextmanager
def original_sizes(model: nn.Module) -> Iterator[None]:
    """Temporarily give an expanded model's config its original sizes: transformers validates configs
    (e.g. hidden_size % heads) on save, and the expanded width need not pass. :func:`expanded_config`
    gives the sizes to load it back with."""
    rec = getattr(model.config, EXPANSION_KEY, None) or {}
    current = {k: getattr(model.config, k) for k in rec}
    try:
        for k, (orig, _) in rec.items():
            setattr(model.config, k, orig)
        yield
    finally:
        for k, v in current.items():
            setattr(model.config, k, v)


def expanded_config(state: dict[str, Any] | None) -> dict[str, int]:
    """Config values a saved expanded model must be built with (empty when it was not expanded)."""
    rec = (state or {}).get("expansion") or {}
    return {k: new for k, (_, new) in rec.items()}


def restore_transforms(model: nn.Module, state: dict[str, Any] | None) -> None:
    """Re-install the online parts described by :func:`transform_state` on a model loaded from saved
    weights (which already hold the fused rotations). Call before attaching activation quantizers."""
    if not state:
        return
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported transform state version {state.get('version')!r}")
    for k, v in expanded_config(state).items():
        if getattr(model.config, k) != v:
            raise ValueError(f"model config {k}={getattr(model.config, k)}, the saved expansion needs {v}; "
                             "load it with config_overrides=expanded_config(state)")
    if state.get("norms"):
        for path in residual_norm_paths(model):
            replace_norm(model, path, dim=state["norms"]["dim"])
    if state.get("r4"):
        install_r4(model)
    if state.get("o_online"):
        install_online_hadamard(model, "o_proj")
    if state.get("r3"):
        install_r3(model)
    kv = state.get("kv")
    if kv:
        for t, layer in zip(attention_transforms(model), kv, strict=True):
            t.k_quantizer = None if layer["k"] is None else KVQuantizer(QuantSpec.from_dict(layer["k"]))
            t.v_quantizer = None if layer["v"] is None else KVQuantizer(QuantSpec.from_dict(layer["v"]))
