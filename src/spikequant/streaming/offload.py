"""``--offload auto|none|disk``: whether a command streams the model from disk or loads it whole."""

from __future__ import annotations

from pathlib import Path

import psutil

from spikequant.errors import ModelLoadError
from spikequant.models.loading import DTYPES, resolve_model_path
from spikequant.streaming.checkpoint import CheckpointReader

OFFLOAD_CHOICES = ("auto", "none", "disk")
# In memory, quantize holds the model plus working copies of a layer's tensors and activations, and
# eval with a recipe holds the model twice (the FP reference and the quantized copy): ``auto`` streams
# when this many times the model's size in the compute dtype exceeds the available memory.
HEADROOM = {"quantize": 1.5, "eval": 2.5}


def model_bytes(source: str, dtype: str) -> int | None:
    """Size of the model's tensors in ``dtype`` (None when it is not a local safetensors checkpoint)."""
    try:
        path, _ = resolve_model_path(source)
        if not Path(path).is_dir():
            return None
        return CheckpointReader(path).size_bytes(DTYPES.get(dtype))
    except ModelLoadError:
        return None


def should_stream(offload: str, source: str, dtype: str, command: str = "quantize",
                  available: int | None = None) -> bool:
    """``disk``: always; ``none``: never; ``auto``: when the model (times :data:`HEADROOM`) does not fit
    in the memory available now (``available`` overrides psutil's reading, for tests)."""
    if offload not in OFFLOAD_CHOICES:
        raise ModelLoadError(f"--offload {offload!r} not one of {', '.join(OFFLOAD_CHOICES)}")
    if offload != "auto":
        return offload == "disk"
    size = model_bytes(source, dtype)
    if size is None:
        return False
    free = psutil.virtual_memory().available if available is None else available
    return size * HEADROOM[command] > free
