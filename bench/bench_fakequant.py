"""Fake-quantization overhead: time of the W8A8 per-tensor evaluation / time of the FP evaluation.

Both run on the default model over the same windows in one process, interleaved (FP, W8A8, FP, ...)
so that machine noise hits both alike; the ratio of medians is reported. KL is off: this measures the
quantized forward pass, not the reference comparison.

    python bench/bench_fakequant.py --data-dir ../shared/data [--repeats 3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import re
import statistics
import sys
from pathlib import Path

import torch

from common import model_data_args
from spikequant.eval import evaluate
from spikequant.pipeline import Session, quantize
from spikequant.recipes import load_recipe
from spikequant.reports import versions

MARK = "bench:fakequant"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_data_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recipe", default="w8a8-tensor")
    ap.add_argument("--write", default="docs/benchmarks.md", help="markdown file to update ('' to skip)")
    args = ap.parse_args()

    session = Session(model_source=args.model, data_dir=args.data_dir, seqlen=args.seqlen,
                      max_windows=args.max_windows, kl=False, progress=False)
    fp = session.loaded.model
    qmodel = copy.deepcopy(fp)
    quantize(qmodel, load_recipe(args.recipe), progress=False)
    windows = session.windows
    evaluate(fp, windows[:1], progress=False)  # warm-up
    evaluate(qmodel, windows[:1], progress=False)
    t_fp, t_q = [], []
    for _ in range(args.repeats):
        r_fp = evaluate(fp, windows, progress=False)
        r_q = evaluate(qmodel, windows, progress=False)
        t_fp.append(r_fp.seconds)
        t_q.append(r_q.seconds)
    ratio = statistics.median(t_q) / statistics.median(t_fp)
    cmd = "python bench/bench_fakequant.py " + " ".join(sys.argv[1:])
    table = "\n".join([
        f"| model | windows x seqlen | FP eval s (median of {args.repeats}) | {args.recipe} eval s | ratio |",
        "| --- | --- | --- | --- | --- |",
        f"| {args.model} | {len(windows)} x {args.seqlen} | {statistics.median(t_fp):.2f} | "
        f"{statistics.median(t_q):.2f} | **{ratio:.3f}x** |",
    ])
    print(table)
    print(f"PPL FP {r_fp.ppl:.3f}, {args.recipe} {r_q.ppl:.3f}; all FP times {t_fp}, all quantized times {t_q}")
    if args.write:
        block = (
            f"<!-- {MARK} -->\n## Fake-quantization overhead\n\n"
            f"Goal: W8A8 per-tensor evaluation <= 1.3x the FP evaluation (same windows, one run).\n\n"
            f"Command: `{cmd}`  \nMeasured {dt.date.today()} on {torch.get_num_threads()} CPU threads, "
            f"torch {versions()['torch']}, runs interleaved.\n\n{table}\n<!-- /{MARK} -->"
        )
        path = Path(args.write)
        header = "# Benchmarks\n\nEach section names the command that produced it.\n"
        text = path.read_text() if path.exists() else header
        pattern = re.compile(f"<!-- {MARK} -->.*?<!-- /{MARK} -->", re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
