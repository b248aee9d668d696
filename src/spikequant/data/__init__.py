"""Text data for evaluation and calibration."""

from spikequant.data.text import (
    DATA_ENV,
    Text,
    calibration_windows,
    eval_windows,
    load_text,
    tokenize,
)

__all__ = ["DATA_ENV", "Text", "calibration_windows", "eval_windows", "load_text", "tokenize"]
