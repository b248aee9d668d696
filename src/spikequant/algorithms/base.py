"""Modifiers: self-contained algorithms that a recipe lists and the pipeline runs, each at its stage.

The pipeline (:func:`spikequant.pipeline.quantize`) runs a recipe in this order; a modifier declares in
``stage`` where it belongs, and modifiers of one stage run in the order the recipe lists them:

1. ``transform``: change the float model and/or add per-module overrides to the plan (rotations,
   SmoothQuant folding, spike-aware exemptions). Then the plan is resolved (``ctx.plan``).
2. ``weights``: quantize weights from the resolved plan, recording their parameters on the modules
   (GPTQ); the pipeline's RTN skips those.
3. *attach*: the quantization state goes onto the modules (RTN weights, activation quantizers).
4. ``attach``: install further quantizers on the attached model (the KV cache). ``ctx.qm`` is set.
5. *calibrate*: static activation quantizers observe calibration windows and freeze.
6. ``quantized``: algorithms that need the quantized, calibrated model (clip ratios, a clip search).

A modifier gets everything through a :class:`QuantContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from spikequant.errors import RecipeError, check_keys
from spikequant.quant.spec import QuantSpec


@dataclass
class QuantContext:
    model: nn.Module
    calibration_windows: Callable[[], torch.Tensor]
    seed: int = 0
    progress: bool = True
    # Overrides added by modifiers: (patterns, slot -> spec or None), applied after the recipe's own.
    overrides: list[tuple[list[str], dict[str, QuantSpec | None]]] = field(default_factory=list)
    # What modifiers found, for the report (e.g. the detected spike layers).
    findings: dict[str, Any] = field(default_factory=dict)
    # Set by the pipeline after the transform stage: the resolved plan (module name -> ModuleQuant).
    plan: dict[str, Any] | None = None
    # Set by the pipeline after attaching: the quantized model (the ``attach`` and ``quantized`` stages).
    qm: Any = None


STAGES = ("transform", "weights", "attach", "quantized")


class Modifier:
    """Base class; subclasses are dataclasses registered in :data:`MODIFIERS` under ``type``, running at
    ``stage`` (one of :data:`STAGES`, see the module docstring)."""

    type: ClassVar[str]
    stage: ClassVar[str] = "transform"

    def apply(self, ctx: QuantContext) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Modifier:
        check_keys(data, {f.name for f in fields(cls)}, where)  # type: ignore[arg-type]
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{where}: {e}") from None


MODIFIERS: dict[str, type[Modifier]] = {}


def require_positive_int(value: Any, name: str) -> None:
    """Modifier parameter check (a ValueError becomes a one-line RecipeError naming the modifier)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def register(cls: type[Modifier]) -> type[Modifier]:
    MODIFIERS[cls.type] = cls
    return cls


def modifier_from_dict(data: Any, where: str) -> Modifier:
    if not isinstance(data, dict) or "type" not in data:
        raise RecipeError(f"{where}: a modifier is a mapping with a 'type' key")
    data = dict(data)
    kind = data.pop("type")
    if kind not in MODIFIERS:
        raise RecipeError(f"{where}: unknown modifier type {kind!r} (known: {', '.join(sorted(MODIFIERS))})")
    return MODIFIERS[kind].from_dict(data, f"{where} ({kind})")
