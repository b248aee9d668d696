"""Spike-aware mixed precision (arXiv 2504.21553): keep the spike-carrying projections in high precision.

The layers are detected on calibration data at quantize time (no hard-coded lists), and the ablation
exempts as many random layers instead, never the detected ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from spikequant.algorithms.base import Modifier, QuantContext, register, require_positive_int
from spikequant.errors import RecipeError, SpikequantError
from spikequant.models import decoder_linears, linear_role
from spikequant.quant.spec import QuantSpec
from spikequant.stats import SpikeRule, collect_stats

PRECISIONS = ("float", "fp8_e4m3", "fp8_e5m2")


def exemption_slots(precision: str, dynamic: bool = True) -> dict[str, QuantSpec | None]:
    """What a kept layer gets: float (weights, inputs and outputs unquantized: float on every side), FP8
    E4M3 with per-tensor scales for weights and activations, or the unscaled FP8 E5M2 cast."""
    if precision == "float":
        return {"weights": None, "inputs": None, "outputs": None}
    if precision == "fp8_e4m3":
        return {"weights": QuantSpec(format="fp8_e4m3", granularity="tensor"),
                "inputs": QuantSpec(format="fp8_e4m3", granularity="tensor", dynamic=dynamic)}
    if precision == "fp8_e5m2":
        return {"weights": QuantSpec(format="fp8_e5m2"), "inputs": QuantSpec(format="fp8_e5m2")}
    raise RecipeError(f"precision {precision!r} not one of {', '.join(PRECISIONS)}")


@dataclass
class _Detecting(Modifier):
    """Shared by both modifiers: the spike rule's parameters and how many calibration windows it reads."""

    k: float | None = 50.0
    abs_threshold: float | None = None
    max_layers: int | None = None
    num_samples: int = 8

    def __post_init__(self) -> None:
        require_positive_int(self.num_samples, "num_samples")
        try:
            self.rule()
        except SpikequantError as e:
            raise ValueError(str(e).removeprefix("spike rule: ")) from None

    def rule(self) -> SpikeRule:
        return SpikeRule(self.k, self.abs_threshold, self.max_layers)

    def detect(self, ctx: QuantContext) -> tuple[list[str], dict[str, Any]]:
        stats = collect_stats(ctx.model, ctx.calibration_windows()[: self.num_samples], progress=ctx.progress)
        rule = self.rule()
        detected = rule.detect(stats)
        by_name = {s.name: s for s in stats}
        info = {"rule": rule.to_dict(), "threshold": round(rule.threshold(stats), 4),
                "windows": min(self.num_samples, int(ctx.calibration_windows().shape[0])),
                "max_in": {n: round(by_name[n].max_in, 2) for n in detected},
                "position_of_max": {n: by_name[n].position for n in detected}}
        return detected, info


@register
@dataclass
class SpikeExempt(_Detecting):
    """``{type: spike_exempt, k: 50, abs_threshold: null, max_layers: null, num_samples: 8, precision: float}``

    Detect spike layers (max |input| > k x median over all decoder linears, or > abs_threshold) on
    ``num_samples`` calibration windows and keep them at ``precision``: ``float`` (the model's dtype),
    ``fp8_e4m3`` (per-tensor scales for weights and activations; activations dynamic unless
    ``dynamic: false``) or ``fp8_e5m2`` (the paper code's unscaled cast)."""

    type: ClassVar[str] = "spike_exempt"
    precision: str = "float"
    dynamic: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not one of {', '.join(PRECISIONS)}")

    def apply(self, ctx: QuantContext) -> None:
        detected, info = self.detect(ctx)
        if detected:
            ctx.overrides.append((detected, exemption_slots(self.precision, self.dynamic)))
        ctx.findings["spike_layers"] = detected
        ctx.findings["spike_detection"] = {**info, "precision": self.precision}


@register
@dataclass
class RandomExempt(_Detecting):
    """``{type: random_exempt, k: 50, ..., same_roles: true}``: the ablation. As many decoder linears as
    the spike rule detects are kept in float, chosen at random with the recipe seed and never one of the
    detected ones. With ``same_roles`` they are drawn per projection type (a detected down_proj is
    replaced by a random other down_proj), so the kept parameter count matches exactly."""

    type: ClassVar[str] = "random_exempt"
    same_roles: bool = True

    def apply(self, ctx: QuantContext) -> None:
        detected, info = self.detect(ctx)
        rng = random.Random(ctx.seed)
        pool = sorted(set(decoder_linears(ctx.model)) - set(detected))
        if self.same_roles:
            chosen: list[str] = []
            roles = [linear_role(ctx.model, n)[1] for n in detected]  # type: ignore[index]
            for role in sorted(set(roles)):
                cands = [n for n in pool if linear_role(ctx.model, n)[1] == role]  # type: ignore[index]
                chosen += rng.sample(cands, min(len(cands), roles.count(role)))
        else:
            chosen = rng.sample(pool, min(len(pool), len(detected)))
        chosen = sorted(chosen)
        if chosen:
            ctx.overrides.append((chosen, exemption_slots("float")))
        ctx.findings["random_layers"] = chosen
        ctx.findings["excluded_spike_layers"] = detected
        ctx.findings["spike_detection"] = info
