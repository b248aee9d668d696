"""Modifiers: self-contained algorithms that a recipe lists and the pipeline runs before quantization.

A modifier may change the model (e.g. SmoothQuant folds scales into weights) and may add per-module
overrides to the plan (e.g. spike-aware exemptions). It gets everything through a :class:`QuantContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from spikequant.errors import RecipeError
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
    # Set by the pipeline: resolves the plan as it stands (recipe + overrides added so far), so a modifier
    # can quantize weights itself (GPTQ) from the recipe's weight spec.
    plan: Callable[[], dict[str, Any]] | None = None
    # Weights a modifier already quantized (module name -> its qparams); the pipeline skips RTN for them.
    quantized_weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Modifier:
    """Base class; subclasses are dataclasses registered in :data:`MODIFIERS` under ``type``."""

    type: ClassVar[str]

    def apply(self, ctx: QuantContext) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Modifier:
        allowed = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if key not in allowed:
                raise RecipeError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
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
