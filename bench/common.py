"""Arguments every benchmark on the default model shares (imported by the scripts in this folder): the
CLI's own argument sets (``spikequant.cli_args``) with the defaults of the documented runs."""

from __future__ import annotations

import argparse

from spikequant.cli_args import add_data_args


def model_data_args(ap: argparse.ArgumentParser) -> None:
    """--model, --data-dir, --seqlen, --max-windows (512 x 16 windows, as in the docs)."""
    ap.add_argument("--model", default="smollm2-135m")
    add_data_args(ap, seqlen=512, max_windows=16, kl=False)
