"""Inference backends: run a (quantized) model as ``float`` (float32; a quantized model runs its fake-quant
simulation, the reference), ``bf16`` (the same in bfloat16) or ``int8`` (real int8 kernels for W8A8
static models, :mod:`spikequant.backends.int8`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spikequant.backends.int8 import (
    DEFAULT_KERNEL,
    KERNELS,
    CompiledModel,
    Int8BackendError,
    Int8Linear,
    cast_float_parts,
    check_int8_model,
    compile_model,
    convert_to_int8,
    is_int8_dir,
    load_int8,
    prepare_traced,
    save_int8,
    store_embeddings,
    weight_bytes,
)
from spikequant.errors import SpikequantError

BACKENDS = ("float", "bf16", "int8")


@dataclass
class PreparedModel:
    """A model ready for inference on one backend, and what was done to get there."""

    model: nn.Module
    tokenizer: Any
    backend: str
    source: str
    recipe: str | None = None
    int8_linears: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    # generate(compile=True): the (batch, prompt tokens, new tokens) whose compiled decode step has run once
    # (the untimed warm-up); a later call with the same shapes reuses the compiled code and skips it
    compiled_shapes: set[tuple[int, int, int]] = field(default_factory=set)


def cached_decoding_problem(model: nn.Module) -> str | None:
    """Why decoding with a KV cache would not compute what the evaluated model computes (None: it would).

    A cached step sees only the new token. Static and per-token quantizers are unaffected; a dynamic
    per-tensor scale would be taken over one token instead of the whole sequence, and rules about token
    positions (``keep_first_tokens``, ``outlier_tokens``) would see positions 0..k of every step."""
    from spikequant.quant.apply import INPUT_QUANTIZER, OUTPUT_QUANTIZER

    for name, m in model.named_modules():
        for attr in (INPUT_QUANTIZER, OUTPUT_QUANTIZER):
            q = getattr(m, attr, None)
            if q is None or not hasattr(q, "spec"):
                continue
            s = q.spec
            if s.keep_first_tokens or s.outlier_tokens:
                return f"{name}.{attr} ({s.label}) keeps tokens out of its scale by position"
            if s.dynamic and s.granularity in ("tensor", "channel") and not s.is_float_cast:
                return f"{name}.{attr} ({s.label}) takes a dynamic per-tensor scale over the whole sequence"
    return None


def prepare(model: nn.Module, tokenizer: Any, backend: str, source: str, recipe: str | None = None,
            kernel: str = DEFAULT_KERNEL, int8_dtype: torch.dtype = torch.float32,
            embedding_dtype: torch.dtype | None = None) -> PreparedModel:
    """Turn a loaded float32 model (plain, or quantized by spikequant with its state on the modules) into
    the ``backend``'s model, in place. ``int8_dtype`` is the dtype of the int8 model's activations and
    float modules (embeddings, norms, attention, ``lm_head``, spike-exempt linears); ``embedding_dtype``
    (int8 only; default ``int8_dtype``) stores the embedding table and ``lm_head`` apart
    (:func:`~spikequant.backends.int8.store_embeddings`)."""
    if backend not in BACKENDS:
        raise SpikequantError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "float":
        return PreparedModel(model, tokenizer, backend, source, recipe, dtype=torch.float32)
    if backend == "bf16":
        model.to(torch.bfloat16)
        return PreparedModel(model, tokenizer, backend, source, recipe, dtype=torch.bfloat16)
    names = convert_to_int8(model, kernel, int8_dtype)
    if embedding_dtype is not None and embedding_dtype != int8_dtype:
        store_embeddings(model, embedding_dtype, int8_dtype)
    return PreparedModel(model, tokenizer, backend, source, recipe, names, dtype=int8_dtype)


__all__ = [
    "BACKENDS", "DEFAULT_KERNEL", "KERNELS", "CompiledModel", "compile_model", "prepare_traced",
    "Int8BackendError", "Int8Linear", "PreparedModel",
    "cached_decoding_problem", "cast_float_parts", "check_int8_model", "convert_to_int8", "is_int8_dir",
    "load_int8", "prepare", "save_int8", "store_embeddings", "weight_bytes",
]
