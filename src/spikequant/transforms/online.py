"""Online transforms: R4 (Hadamard on the down_proj input, a forward pre-hook), the optional Hadamard on
the o_proj input across all heads, and the attention wrapper
that applies R3 (Hadamard on Q and K after RoPE) and quantizes the KV cache.

The attention wrapper goes through transformers' attention-function interface rather than copies of the
model classes: it is registered in ``AttentionInterface`` as ``spikequant_<base>`` (with ``<base>``'s mask
function), rotates / quantizes, then calls ``<base>`` (sdpa, eager, ...). Per-layer state lives on each
attention module as an :class:`AttentionTransform`, so two models in one process do not interfere.

With ``use_cache=True`` the HF cache stores the un-rotated, un-quantized states and the wrapper
re-applies R3 and the quantizer to the whole cache each step; quantization is per token and
deterministic, so this equals quantizing each entry once when it is written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from spikequant.errors import SpikequantError
from spikequant.hadamard import hadamard_transform
from spikequant.models.arch import decoder_layers, get_arch
from spikequant.quant.kv import KVQuantizer

ATTN_ATTR = "spikequant_attention"
R4_ATTR = "spikequant_r4_handle"
PREFIX = "spikequant_"

# This module relies on transformers internals with no stability promise: ``AttentionInterface._global_mapping``,
# ``AttentionMaskInterface._global_mapping`` and each modeling file's module-level ``eager_attention_forward``.
# The versions its tests passed on, [low, high): outside them it stops with one line instead of failing deep
# inside a forward pass. Widen only after `pytest tests/transforms tests/export` passes on the new version.
TESTED_TRANSFORMERS = ("4.57.6", "5.25")


class TransformersVersionError(SpikequantError):
    pass


def _installed_transformers() -> str:
    import transformers

    return transformers.__version__


def check_transformers(version: str | None = None) -> None:
    """Raise a one-line error when ``version`` (default: the installed transformers) is outside the tested range."""
    from packaging.version import Version

    version = version or _installed_transformers()
    low, high = TESTED_TRANSFORMERS
    if not Version(low) <= Version(version) < Version(high):
        raise TransformersVersionError(
            f"transformers {version} is outside the range the online rotations / KV quantization are tested on "
            f"(>={low},<{high}; they use its private attention registry); install one in it, e.g. "
            f"pip install -c constraints.txt transformers")


@dataclass
class AttentionTransform:
    """What the wrapper does in one attention layer: R3 on Q/K, then K/V quantizers (None: float)."""

    base: str
    r3: bool = False
    k_quantizer: KVQuantizer | None = None
    v_quantizer: KVQuantizer | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.r3:
            q, k = hadamard_transform(q), hadamard_transform(k)
        if self.k_quantizer is not None:
            k = self.k_quantizer(k)
        if self.v_quantizer is not None:
            v = self.v_quantizer(v)
        return q, k, v


def _eager_of(module: nn.Module) -> Callable:
    # Each modeling file defines its own eager_attention_forward (e.g. Qwen3 the same maths, its own copy).
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward to fall back to")
    return fn


def _make_wrapper(base: str) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        from transformers import AttentionInterface

        t = getattr(module, ATTN_ATTR, None)
        if t is not None:
            query, key, value = t(query, key, value)
        fn = _eager_of(module) if base == "eager" else AttentionInterface._global_mapping[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


def register_wrapper(base: str) -> str:
    """Register ``spikequant_<base>`` (attention and mask functions) once; return its name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    check_transformers()
    name = base if base.startswith(PREFIX) else PREFIX + base
    base = name.removeprefix(PREFIX)
    if name not in AttentionInterface._global_mapping:
        if base != "eager" and base not in AttentionInterface._global_mapping:
            raise ValueError(f"attention implementation {base!r} is not registered in transformers")
        AttentionInterface.register(name, _make_wrapper(base))
        masks = AttentionMaskInterface._global_mapping
        if base in masks:
            AttentionMaskInterface.register(name, masks[base])
    return name


def attention_modules(model: nn.Module) -> list[nn.Module]:
    arch = get_arch(model)
    return [layer.get_submodule(arch.attn) for layer in decoder_layers(model)]


def attention_transforms(model: nn.Module) -> list[AttentionTransform]:
    """The per-layer wrapper state, installing the wrapper first if needed."""
    impl = model.config._attn_implementation or "eager"
    name = register_wrapper(impl)
    base = name.removeprefix(PREFIX)
    if impl != name:
        model.config._attn_implementation = name
    out = []
    for attn in attention_modules(model):
        t = getattr(attn, ATTN_ATTR, None)
        if t is None:
            t = AttentionTransform(base=base)
            setattr(attn, ATTN_ATTR, t)
        out.append(t)
    return out


def installed_attention_transforms(model: nn.Module) -> list[AttentionTransform] | None:
    """The per-layer wrapper state if the wrapper is installed, else None (installs nothing)."""
    ts = [getattr(a, ATTN_ATTR, None) for a in attention_modules(model)]
    return None if any(t is None for t in ts) else ts  # type: ignore[return-value]


def install_r3(model: nn.Module) -> None:
    """R3: Hadamard of size head_dim on Q and K after RoPE (q kᵀ unchanged since H is orthogonal)."""
    for t in attention_transforms(model):
        t.r3 = True


ONLINE_PROJS = ("down_proj", "o_proj")


def _online_attr(proj: str) -> str:
    if proj not in ONLINE_PROJS:
        raise ValueError(f"online Hadamard input of {proj!r}: only {', '.join(ONLINE_PROJS)}")
    return R4_ATTR if proj == "down_proj" else f"spikequant_online_{proj}_handle"


def install_online_hadamard(model: nn.Module, proj: str) -> None:
    """Online half of an input Hadamard on ``proj`` (``down_proj``: R4, ``o_proj``: across all heads) in
    every layer: its input z ↦ z Mᵀ, pairing with :func:`~spikequant.transforms.rotation.fuse_input_hadamard`."""
    arch = get_arch(model)
    attr = _online_attr(proj)
    for layer in decoder_layers(model):
        lin = layer.get_submodule(getattr(arch, proj))
        if getattr(lin, attr, None) is not None:
            continue

        def pre_hook(_m, args):
            return (hadamard_transform(args[0]),) + tuple(args[1:])

        # prepend: the rotation must run before any input quantizer hooked on the same linear.
        setattr(lin, attr, lin.register_forward_pre_hook(pre_hook, prepend=True))


def has_online_hadamard(model: nn.Module, proj: str) -> bool:
    arch = get_arch(model)
    attr = _online_attr(proj)
    return all(getattr(layer.get_submodule(getattr(arch, proj)), attr, None) is not None
               for layer in decoder_layers(model))


def install_r4(model: nn.Module) -> None:
    """Online half of R4: down_proj input z ↦ z Mᵀ (pairs with :func:`fuse_down_hadamard`)."""
    install_online_hadamard(model, "down_proj")


def has_r4(model: nn.Module) -> bool:
    return has_online_hadamard(model, "down_proj")
