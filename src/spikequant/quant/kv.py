"""KV-cache quantizers: fake-quantize key/value states (batch, kv_heads, seq, head_dim) before attention.

The scale groups run along the features of one token, viewed as kv_heads·head_dim values: granularity
``group`` with ``group_size = head_dim`` gives one scale per (token, head) — the paper's K-cache setting —
and ``token`` one scale per token over all heads. Dynamic only: a cache entry is quantized once, from its
own values, when it is written.
"""

from __future__ import annotations

import torch

from spikequant.errors import RecipeError
from spikequant.quant.observers import ActivationQuantizer
from spikequant.quant.spec import QuantSpec


def check_kv_spec(spec: QuantSpec, where: str = "kv_cache") -> QuantSpec:
    """Reject settings a KV cache cannot use (static scales, per-channel, FP8 casts)."""
    if spec.format != "int":
        raise RecipeError(f"{where}: only int formats are supported, got {spec.format}")
    if not spec.dynamic:
        raise RecipeError(f"{where}: KV-cache quantization is dynamic only (set dynamic: true)")
    if spec.granularity not in ("token", "group"):
        raise RecipeError(f"{where}: granularity must be token or group (e.g. group_size = head_dim), "
                          f"got {spec.granularity}")
    return spec


class KVQuantizer(ActivationQuantizer):
    """An :class:`ActivationQuantizer` applied to (batch, heads, seq, head_dim) states per token."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(check_kv_spec(spec))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return states
        b, h, t, d = states.shape
        tokens = states.transpose(1, 2).reshape(b, t, h * d)
        return super().forward(tokens).view(b, t, h, d).transpose(1, 2)
