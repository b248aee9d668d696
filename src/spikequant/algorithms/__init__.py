"""Algorithms (modifiers) that recipes can list."""

from spikequant.algorithms.base import MODIFIERS, Modifier, QuantContext, modifier_from_dict, register

__all__ = ["MODIFIERS", "Modifier", "QuantContext", "modifier_from_dict", "register"]
