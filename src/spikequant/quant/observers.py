"""Activation quantizers: typed state on the module they quantize, with a lifecycle.

An :class:`ActivationQuantizer` is an ``nn.Module`` registered on the linear it serves (as
``input_quantizer`` / ``output_quantizer``, see :mod:`spikequant.quant.apply`); its scales and the
calibration statistics behind them are buffers, so ``.to(device)``, ``deepcopy``, saving, export and a
real-kernel backend all read the same state. Lifecycle (:class:`QuantStatus`):

- ``initialized``: a static quantizer that has not seen calibration data (using it is an error);
- ``calibrating``: observing calibration batches, passing them through unquantized;
- ``frozen``: quantizing. Dynamic quantizers are frozen from the start (their scales come from the live
  tensor). A frozen static quantizer keeps its observed range (``observed_lo``/``observed_hi``), so
  changing its spec (e.g. the clip ratio) recomputes its scale from the same statistics.
"""

from __future__ import annotations

import enum
import math
from dataclasses import replace

import torch
from torch import nn

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


class QuantStatus(str, enum.Enum):
    INITIALIZED = "initialized"
    CALIBRATING = "calibrating"
    FROZEN = "frozen"


STATE_KEYS = ("scale", "zero", "observed_lo", "observed_hi")


class ActivationQuantizer(nn.Module):
    """Fake-quantizes the tensors passed through it (see the module docstring for the lifecycle).

    The percentile observer averages the per-batch percentile of |x|; absmax keeps the running max (and
    min, when asymmetric). ``enabled = False`` passes tensors through (e.g. a layer a search has not
    reached yet).
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self._spec = spec
        self.enabled = True
        self.status = QuantStatus.INITIALIZED if self.needs_calibration else QuantStatus.FROZEN
        for key in STATE_KEYS:  # not persistent: the model's own state_dict stays a plain HF checkpoint
            self.register_buffer(key, None, persistent=False)
        self._pct: list[float] = []

    # -- spec -----------------------------------------------------------------------------------------
    @property
    def spec(self) -> QuantSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: QuantSpec) -> None:
        self._spec = spec
        if self.status is QuantStatus.FROZEN and self.observed_hi is not None:
            self._qparams_from_observed()

    @property
    def needs_calibration(self) -> bool:
        return not self._spec.dynamic and not self._spec.is_float_cast

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def observing(self) -> bool:
        return self.status is QuantStatus.CALIBRATING

    @observing.setter
    def observing(self, flag: bool) -> None:
        if flag:
            self.start_calibration()
        elif self.status is QuantStatus.CALIBRATING:
            self.status = QuantStatus.INITIALIZED

    def start_calibration(self) -> None:
        """Observe from now on; statistics start afresh."""
        self.observed_lo = self.observed_hi = None
        self._pct = []
        self.status = QuantStatus.CALIBRATING

    def observe(self, x: torch.Tensor) -> None:
        spec = self._spec
        x = x.detach().float()
        if spec.observer == "percentile":
            a = x.abs().flatten()
            k = max(1, min(a.numel(), math.ceil(spec.percentile / 100.0 * a.numel())))
            self._pct.append(float(a.kthvalue(k).values))
            return
        xv = _grouped(x, spec) if spec.granularity == "group" else x
        dims = reduce_dims(xv, spec, "act")
        if spec.symmetric or spec.format != "int":
            hi = xv.abs().amax() if dims is None else xv.abs().amax(dim=dims, keepdim=True)
        else:
            lo = xv.amin() if dims is None else xv.amin(dim=dims, keepdim=True)
            hi = xv.amax() if dims is None else xv.amax(dim=dims, keepdim=True)
            self.observed_lo = lo if self.observed_lo is None else torch.minimum(self.observed_lo, lo)
        self.observed_hi = hi if self.observed_hi is None else torch.maximum(self.observed_hi, hi)

    def freeze(self) -> None:
        """Turn the observed statistics into scales and start quantizing (a no-op for dynamic ones)."""
        if not self.needs_calibration:
            self.status = QuantStatus.FROZEN
            return
        if self._spec.observer == "percentile":
            if not self._pct:
                raise RuntimeError("static quantizer finalized before it observed any calibration data")
            self.observed_hi = torch.tensor(sum(self._pct) / len(self._pct))
            self._pct = []
        elif self.observed_hi is None:
            raise RuntimeError("static quantizer finalized before it observed any calibration data")
        self._qparams_from_observed()
        self.status = QuantStatus.FROZEN

    finalize = freeze  # the name calibration code used before the lifecycle existed

    def _qparams_from_observed(self) -> None:
        spec, amax = self._spec, self.observed_hi
        if spec.format == "fp8_e4m3":
            self.scale, self.zero = fp8_scale(spec, amax), None
        elif spec.symmetric:
            self.scale, self.zero = int_qparams(spec, amax=amax)
        elif spec.observer == "percentile":
            self.scale, self.zero = int_qparams(spec, xmin=-amax, xmax=amax)
        else:
            self.scale, self.zero = int_qparams(spec, xmin=self.observed_lo, xmax=amax)

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        k = self._spec.keep_first_tokens
        if k and x.dim() >= 3:  # (batch, seq, features): the first k positions stay as they are
            if x.shape[1] <= k:
                return x
            return torch.cat((x[:, :k], self._quantize(x[:, k:])), dim=1)
        return self._quantize(x)

    def _static_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.scale is None:
            raise RuntimeError("static activation quantizer used before calibration")
        return self.scale.to(x.device), None if self.zero is None else self.zero.to(x.device)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        k = self._spec.outlier_tokens
        if k and x.dim() >= 2 and x.shape[-2] > k:
            return self._quantize_with_outliers(x, k)
        if self.observing:
            self.observe(x)
            return x
        if self._spec.dynamic or self._spec.is_float_cast:
            scale, zero = compute_qparams(x, self._spec, "act")
        else:
            scale, zero = self._static_qparams(x)
        return quantize_dequantize(x, self._spec, scale, zero)

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
        if self._spec.dynamic:
            scale, zero = compute_qparams(bulk, self._spec, "act")
        else:
            scale, zero = self._static_qparams(x)
        out = quantize_dequantize(x, self._spec, scale, zero)
        rows = top.unsqueeze(-1).expand(*top.shape, x.shape[-1])
        own = replace(self._spec, granularity="token", dynamic=True, observer="absmax", clip_ratio=1.0,
                      outlier_tokens=0)
        return out.scatter(-2, rows, fake_quantize(x.gather(-2, rows), own))

    # -- persistence ----------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Scales and the statistics behind them (what saving and export read)."""
        return {k: getattr(self, k).detach().cpu() for k in STATE_KEYS if getattr(self, k) is not None}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in STATE_KEYS:
            setattr(self, k, state.get(k))
        if self.scale is not None or not self.needs_calibration:
            self.status = QuantStatus.FROZEN

    def extra_repr(self) -> str:
        return f"{self._spec.label}, status={self.status.value}" + ("" if self.enabled else ", disabled")
