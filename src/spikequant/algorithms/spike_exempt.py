"""Spike-aware mixed precision (arXiv 2504.21553): keep the spike-carrying projections in high precision.

The layers are detected on calibration data at quantize time (no hard-coded lists), and the ablation
exempts as many random layers instead, never the detected ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from spikequant.algorithms.base import Modifier, QuantContext, register
from spikequant.analysis.spikes import SpikeRule, collect_stats
from spikequant.models import decoder_linears
from spikequant.quant.spec import QuantSpec

PRECISIONS = ("float", "fp8_e4m3", "fp8_e5m2")


def _slots(precision: str) -> dict[str, QuantSpec | None]:
    if precision == "float":
        return {"weights": None, "inputs": None, "outputs": None}
    if precision == "fp8_e4m3":  # per-channel weight scales, per-tensor activation scales, as engines run it
        return {"weights": QuantSpec(format="fp8_e4m3", granularity="channel"),
                "inputs": QuantSpec(format="fp8_e4m3", granularity="tensor")}
    # The paper code's variant: a plain E5M2 cast of the activations (and weights), no scale.
    return {"weights": QuantSpec(format="fp8_e5m2"), "inputs": QuantSpec(format="fp8_e5m2")}


def _detect(ctx: QuantContext, k: float, abs_threshold: float | None, num_samples: int) -> tuple[list[str], dict]:
    cache = ctx.findings.setdefault("_spike_stats", {})
    key = (num_samples,)
    if key not in cache:
        cache[key] = collect_stats(ctx.model, ctx.calibration_windows()[:num_samples], progress=ctx.progress)
    stats = cache[key]
    rule = SpikeRule(k, abs_threshold)
    detected = rule.detect(stats)
    info = {"rule": {"k": k, "abs_threshold": abs_threshold}, "threshold": rule.threshold(stats),
            "max_in": {s.name: round(s.max_in, 2) for s in stats if s.name in detected}}
    return detected, info


@register
@dataclass
class SpikeExempt(Modifier):
    """Detect spike layers (max |input| > k x median of all linears, or > abs_threshold) on
    ``num_samples`` calibration windows and keep them at ``precision`` (float, fp8_e4m3, fp8_e5m2)."""

    type = "spike_exempt"
    k: float = 50.0
    abs_threshold: float | None = None
    num_samples: int = 8
    precision: str = "float"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not one of {', '.join(PRECISIONS)}")
        if self.k <= 0 or self.num_samples < 1:
            raise ValueError("k must be > 0 and num_samples >= 1")

    def apply(self, ctx: QuantContext) -> None:
        detected, info = _detect(ctx, self.k, self.abs_threshold, self.num_samples)
        if detected:
            ctx.overrides.append((detected, _slots(self.precision)))
        ctx.findings["spike_layers"] = detected
        ctx.findings["spike_detection"] = info
        ctx.findings.pop("_spike_stats", None)


@register
@dataclass
class RandomExempt(Modifier):
    """Ablation: exempt as many randomly chosen decoder linears as the spike rule detects (never one of
    the detected ones), chosen with the recipe seed."""

    type = "random_exempt"
    k: float = 50.0
    abs_threshold: float | None = None
    num_samples: int = 8

    def apply(self, ctx: QuantContext) -> None:
        detected, _ = _detect(ctx, self.k, self.abs_threshold, self.num_samples)
        pool = sorted(set(decoder_linears(ctx.model)) - set(detected))
        chosen = sorted(random.Random(ctx.seed).sample(pool, len(detected)))
        ctx.overrides.append((chosen, _slots("float")))
        ctx.findings["random_layers"] = chosen
        ctx.findings["excluded_spike_layers"] = detected
        ctx.findings.pop("_spike_stats", None)
