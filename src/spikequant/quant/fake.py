"""Simulated (fake) quantization: quantize then dequantize, in the tensor's own dtype.

Weights are (out_features, in_features); activations are (..., features). ``role`` tells which, since
"channel" means an output row for a weight and an input feature for an activation.
"""

from __future__ import annotations

import torch

from spikequant.quant.spec import QuantSpec

FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0


def reduce_dims(x: torch.Tensor, spec: QuantSpec, role: str) -> tuple[int, ...] | None:
    """Dims reduced to get one statistic per scale (None: all dims). Group views are handled by callers."""
    g = spec.granularity
    if g == "tensor":
        return None
    if g in ("token", "group") or (g == "channel" and role == "weight"):
        return (-1,)
    return tuple(range(x.dim() - 1))  # activation channel: one statistic per feature


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    g = spec.group_size
    assert g is not None
    if x.shape[-1] % g:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by group_size {g}")
    return x.unflatten(-1, (x.shape[-1] // g, g))


def _amax(x: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    a = x.abs()
    return a.amax() if dims is None else a.amax(dim=dims, keepdim=True)


def _minmax(x: torch.Tensor, dims: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if dims is None:
        return x.amin(), x.amax()
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def int_qparams(
    spec: QuantSpec, amax: torch.Tensor | None = None, xmin: torch.Tensor | None = None,
    xmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point for asymmetric) from statistics, with the clip ratio applied."""
    c = spec.clip_ratio
    if spec.symmetric:
        assert amax is not None
        scale = amax * (c / (2 ** (spec.bits - 1) - 1))
        zero = None
    else:
        assert xmin is not None and xmax is not None
        lo = xmin.clamp(max=0) * c
        hi = xmax.clamp(min=0) * c
        scale = (hi - lo) / (2**spec.bits - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
        return scale, zero
    # An all-zero slice gets scale 1: any scale reproduces zeros exactly, and it avoids 0/0.
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero


def int_qdq(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
    qmax = 2**spec.bits - 1
    assert zero is not None
    return (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale


def fp8_scale(spec: QuantSpec, amax: torch.Tensor) -> torch.Tensor:
    scale = amax * (spec.clip_ratio / FP8_E4M3_MAX)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_qdq(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None) -> torch.Tensor:
    if spec.format == "fp8_e5m2":
        # The spike-aware paper's cast: no scale; saturate instead of overflowing to inf.
        return x.clamp(-FP8_E5M2_MAX, FP8_E5M2_MAX).to(torch.float8_e5m2).to(x.dtype)
    assert scale is not None
    y = (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return y.to(torch.float8_e4m3fn).to(x.dtype) * scale


def compute_qparams(
    x: torch.Tensor, spec: QuantSpec, role: str = "act"
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Scale and zero point of ``x`` itself (dynamic quantization, and weights)."""
    if spec.is_float_cast:
        return None, None
    xv = _grouped(x, spec) if spec.granularity == "group" else x
    dims = reduce_dims(xv, spec, role)
    if spec.format == "fp8_e4m3":
        return fp8_scale(spec, _amax(xv, dims)), None
    if spec.symmetric:
        return int_qparams(spec, amax=_amax(xv, dims))
    lo, hi = _minmax(xv, dims)
    return int_qparams(spec, xmin=lo, xmax=hi)


def quantize_dequantize(
    x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize ``x`` with given parameters (shaped for ``x``, or for its group view)."""
    grouped = spec.granularity == "group"
    xv = _grouped(x, spec) if grouped else x
    if spec.format == "int":
        assert scale is not None
        y = int_qdq(xv, spec, scale.to(xv.dtype), None if zero is None else zero.to(xv.dtype))
    else:
        y = fp8_qdq(xv, spec, None if scale is None else scale.to(xv.dtype))
    return y.flatten(-2) if grouped else y


def fake_quantize(x: torch.Tensor, spec: QuantSpec, role: str = "act") -> torch.Tensor:
    """Dynamic fake quantization: parameters from ``x`` itself."""
    scale, zero = compute_qparams(x, spec, role)
    return quantize_dequantize(x, spec, scale, zero)
