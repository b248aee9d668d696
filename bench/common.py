"""Arguments every benchmark on the default model shares (imported by the scripts in this folder)."""

from __future__ import annotations

import argparse


def model_data_args(ap: argparse.ArgumentParser) -> None:
    """--model, --data-dir, --seqlen, --max-windows with the defaults of the documented runs."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None, help="folder holding wikitext-2/ (or $SPIKEQUANT_DATA_DIR)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
