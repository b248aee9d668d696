"""Text data for evaluation and calibration."""

from spikequant.data.text import (
    DATA_ENV,
    Text,
    calibration_windows,
    eval_windows,
    hub_join,
    load_text,
    recipe_calibration_windows,
    tokenize,
    wikitext_rows,
)

__all__ = ["DATA_ENV", "Text", "calibration_windows", "eval_windows", "hub_join", "load_text",
           "recipe_calibration_windows", "tokenize",
           "wikitext_rows"]
