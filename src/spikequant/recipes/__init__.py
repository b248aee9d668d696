"""Recipes: validated descriptions of a run, and the built-in presets."""

from spikequant.recipes.schema import (
    DECODER_LINEARS,
    Calibration,
    Override,
    Recipe,
    list_presets,
    load_recipe,
    save_recipe,
)

__all__ = ["DECODER_LINEARS", "Calibration", "Override", "Recipe", "list_presets", "load_recipe", "save_recipe"]
