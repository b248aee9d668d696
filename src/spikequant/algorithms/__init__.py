"""Algorithms (modifiers) that recipes can list."""

from spikequant.algorithms.base import MODIFIERS, Modifier, QuantContext, modifier_from_dict, register

# Importing the modules registers their modifiers.
from spikequant.algorithms import smoothquant, spike_exempt  # noqa: E402, F401

__all__ = ["MODIFIERS", "Modifier", "QuantContext", "modifier_from_dict", "register"]
