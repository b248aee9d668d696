"""The command-line arguments every entry point shares (``spikequant`` subcommands and ``bench/``), once."""

from __future__ import annotations

import argparse

from spikequant.models import DEFAULT_MODEL

DTYPES = ["float32", "float16", "bfloat16", "float64"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse then names the flag in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name ({DEFAULT_MODEL}), .gguf file, local HF directory, saved spikequant "
                        "directory or hub id (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def add_data_args(p: argparse.ArgumentParser, seqlen: int = 2048, max_windows: int | None = None,
                  split: str | None = None, kl: bool = True) -> None:
    """--data-dir, --dataset, [--split], --seqlen, --max-windows, [--no-kl], --no-progress."""
    p.add_argument("--data-dir", default=None,
                   help="folder holding wikitext-2/ (or $SPIKEQUANT_DATA_DIR); without it the hub copy is used")
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, c4 or a path to a text file")
    if split is not None:
        p.add_argument("--split", default=split, help="text split (default: %(default)s)")
    p.add_argument("--seqlen", type=positive_int, default=seqlen, help="window length in tokens (default: %(default)s)")
    p.add_argument("--max-windows", type=positive_int, default=max_windows,
                   help="evaluate only the first N windows (default: %(default)s = all)")
    if kl:
        p.add_argument("--no-kl", action="store_true", help="skip the KL / top-1 comparison with the FP model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="write the machine-readable report here")
    p.add_argument("--markdown", default=None, help="write a markdown report here")


def add_offload_arg(p: argparse.ArgumentParser) -> None:
    """--offload auto|none|disk (see spikequant.streaming.offload)."""
    p.add_argument("--offload", default="auto", choices=["auto", "none", "disk"],
                   help="disk: stream the model one decoder layer at a time from its safetensors shards; none: "
                        "load it whole; auto: stream only when it does not fit in the available memory "
                        "(default: %(default)s)")
