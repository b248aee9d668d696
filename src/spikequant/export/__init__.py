"""Saving and reloading quantized models."""

from spikequant.export.saving import is_quantized_dir, load_quantized, save_quantized

__all__ = ["is_quantized_dir", "load_quantized", "save_quantized"]
