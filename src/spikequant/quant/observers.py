"""Activation quantizers: dynamic, or static with statistics gathered during calibration."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from spikequant.quant.fake import (
    _grouped,
    compute_qparams,
    fake_quantize,
    fp8_scale,
    int_qparams,
    quantize_dequantize,
    reduce_dims,
)
from spikequant.quant.spec import QuantSpec


class ActivationQuantizer:
    """Fake-quantizes the tensors passed through it.

    A static quantizer first *observes* calibration batches (``observing = True``), then
    :meth:`finalize` turns the statistics into a scale. The percentile observer averages the per-batch
    percentile of |x|; absmax keeps the running max (and min, when asymmetric).
    """

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.enabled = True
        self.observing = False
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self._pct: list[float] = []

    @property
    def needs_calibration(self) -> bool:
        return not self.spec.dynamic and not self.spec.is_float_cast

    def observe(self, x: torch.Tensor) -> None:
        spec = self.spec
        x = x.detach().float()
        if spec.observer == "percentile":
            a = x.abs().flatten()
            k = max(1, min(a.numel(), math.ceil(spec.percentile / 100.0 * a.numel())))
            self._pct.append(float(a.kthvalue(k).values))
            return
        xv = _grouped(x, spec) if spec.granularity == "group" else x
        dims = reduce_dims(xv, spec, "act")
        if spec.symmetric or spec.format != "int":
            lo = None
            hi = xv.abs().amax() if dims is None else xv.abs().amax(dim=dims, keepdim=True)
        else:
            lo = xv.amin() if dims is None else xv.amin(dim=dims, keepdim=True)
            hi = xv.amax() if dims is None else xv.amax(dim=dims, keepdim=True)
            self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)

    def finalize(self) -> None:
        spec = self.spec
        if spec.observer == "percentile":
            if not self._pct:
                raise RuntimeError("static quantizer finalized before it observed any calibration data")
            amax = torch.tensor(sum(self._pct) / len(self._pct))
        else:
            if self._hi is None:
                raise RuntimeError("static quantizer finalized before it observed any calibration data")
            amax = self._hi
        if spec.format == "fp8_e4m3":
            self.scale, self.zero = fp8_scale(spec, amax), None
        elif spec.symmetric or spec.observer == "percentile":
            self.scale, self.zero = int_qparams(spec, amax=amax) if spec.symmetric else int_qparams(
                spec, xmin=-amax, xmax=amax)
        else:
            self.scale, self.zero = int_qparams(spec, xmin=self._lo, xmax=self._hi)
        self._lo = self._hi = None
        self._pct = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        k = self.spec.keep_first_tokens
        if k and x.dim() >= 3:  # (batch, seq, features): the first k positions stay as they are
            if x.shape[1] <= k:
                return x
            return torch.cat((x[:, :k], self._quantize(x[:, k:])), dim=1)
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        k = self.spec.outlier_tokens
        if k and x.dim() >= 2 and x.shape[-2] > k:
            return self._quantize_with_outliers(x, k)
        if self.observing:
            self.observe(x)
            return x
        if self.spec.dynamic or self.spec.is_float_cast:
            scale, zero = compute_qparams(x, self.spec, "act")
        else:
            if self.scale is None:
                raise RuntimeError("static activation quantizer used before calibration")
            scale, zero = self.scale.to(x.device), None if self.zero is None else self.zero.to(x.device)
        return quantize_dequantize(x, self.spec, scale, zero)

    def _quantize_with_outliers(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The k largest tokens of each sequence get their own scales; the rest share the usual one."""
        token_max = x.detach().abs().amax(-1)  # (..., tokens)
        top = token_max.topk(k, dim=-1).indices
        outlier = torch.zeros_like(token_max, dtype=torch.bool).scatter_(-1, top, True).unsqueeze(-1)
        # Zeros never widen a symmetric range (and an affine range always contains zero anyway).
        bulk = x.masked_fill(outlier, 0.0)
        if self.observing:
            self.observe(bulk)
            return x
        if self.spec.dynamic:
            scale, zero = compute_qparams(bulk, self.spec, "act")
        else:
            if self.scale is None:
                raise RuntimeError("static activation quantizer used before calibration")
            scale, zero = self.scale.to(x.device), None if self.zero is None else self.zero.to(x.device)
        out = quantize_dequantize(x, self.spec, scale, zero)
        rows = top.unsqueeze(-1).expand(*top.shape, x.shape[-1])
        own = replace(self.spec, granularity="token", dynamic=True, observer="absmax", clip_ratio=1.0,
                      outlier_tokens=0)
        return out.scatter(-2, rows, fake_quantize(x.gather(-2, rows), own))

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.scale is not None:
            out["scale"] = self.scale.detach().cpu()
        if self.zero is not None:
            out["zero"] = self.zero.detach().cpu()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.scale = state.get("scale")
        self.zero = state.get("zero")
