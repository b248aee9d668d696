"""Algorithms (modifiers) that recipes can list."""

# Importing the modules registers their modifiers.
from spikequant.algorithms import clip_ratios, gbs, gptq, rotate, smoothquant, spike_exempt  # noqa: E402, F401
from spikequant.algorithms.base import MODIFIERS, Modifier, QuantContext, modifier_from_dict, register

__all__ = ["MODIFIERS", "Modifier", "QuantContext", "modifier_from_dict", "register"]
