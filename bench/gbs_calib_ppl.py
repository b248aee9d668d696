"""Calibration perplexity of several GBS searches' ``ratios.json``, all measured in one process under the
same settings (docs/gbs.md).

The final calibration PPL a search reports is measured with that run's own torch thread count and batch
size; on a fully quantized W4A4 model those alone move it by several percent (rounding at 4 bits amplifies
float-summation order). To compare exact and fast runs, this script quantizes the recipe once, then for
each run sets its ratios on the same quantized model and measures the perplexity of the same windows with
the same batch size and threads.

Usage::

    python bench/gbs_calib_ppl.py --recipe quarot-rtn-w4a4kv4 --data-dir ../shared/data \\
        --calib-windows 12 --seqlen 128 --batch-size 12 --threads 2 --runs RUN_DIR ...

``--model DIR`` (a folder written by ``spikequant quantize``, no ``--recipe``) measures on that saved model,
e.g. GPTQ weights quantized once for every search; ``--calib-split test --other-windows`` measures the same
ratio files on test windows instead (no check that they are the searched windows). ``--layers K`` measures
the state a ``--layers K`` search ends in (only the first K layers' activation and K-cache quantizers on,
the V caches quantized everywhere); ``--dtype float64`` runs the same fake-quantized model in float64, a
referee that float32 summation order does not move.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="a model to quantize by --recipe, or a folder written by `spikequant quantize` (no --recipe)")
    p.add_argument("--recipe", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--calib-split", default="validation")
    p.add_argument("--calib-windows", type=int, required=True)
    p.add_argument("--seqlen", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--runs", nargs="+", required=True, help="search output folders (each with ratios.json)")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--layers", type=int, default=None,
                   help="as the searches' --layers K: only the first K layers' activation / K-cache quantizers on")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="run the model in this dtype (float64: no float32 summation-order rounding flips)")
    p.add_argument("--other-windows", action="store_true",
                   help="measure on windows the searches did not use (e.g. --calib-split test): no check that they "
                        "are the searched windows")
    args = p.parse_args()

    from spikequant.algorithms.clip_ratios import activation_quantizers, apply_clip_ratios, clip_ratios, load_ratio_file
    from spikequant.algorithms.gbs import calibration_ppl, fingerprint, gradual_start
    from spikequant.data import eval_windows, load_text, recipe_calibration_windows, tokenize
    from spikequant.export import is_quantized_dir, load_quantized
    from spikequant.models import load_model
    from spikequant.pipeline import quantize
    from spikequant.recipes import load_recipe
    from spikequant.reports import environment

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as gbs_search does
    if is_quantized_dir(args.model):
        if args.recipe:
            raise SystemExit(f"{args.model} is a saved quantized model; it carries its recipe, drop --recipe")
        loaded, qm, _, _ = load_quantized(args.model, args.dtype, "cpu")
        tok = loaded.tokenizer
    else:
        if not args.recipe:
            raise SystemExit("--recipe is needed to quantize --model (or pass a folder written by spikequant quantize)")
        loaded = load_model(args.model, "float32", "cpu")
        recipe = load_recipe(args.recipe)
        tok = loaded.tokenizer
        qm, _ = quantize(loaded.model, recipe, lambda: recipe_calibration_windows(recipe, tok, args.data_dir), False)
        qm.model.to(getattr(torch, args.dtype))
    if args.layers is not None:  # the state a --layers K search ends in: its slots on, the rest as before it
        index = activation_quantizers(qm)
        gradual_start(index)
        for (layer, _), qs in index.items():
            for q in qs:
                q.enabled = q.enabled or layer < args.layers
    windows = eval_windows(tokenize(tok, load_text("wikitext2", args.calib_split, args.data_dir)), args.seqlen,
                           args.calib_windows)
    rows = []
    with torch.inference_mode():
        base = calibration_ppl(qm.model, windows, args.batch_size)
        start = clip_ratios(qm)  # each run's ratios on top of these, not of the previous run's
        for run in args.runs:
            report = json.loads((Path(run) / "report.json").read_text(encoding="utf-8"))
            if not args.other_windows and report["calibration"]["windows_sha256"] != fingerprint(windows):
                raise SystemExit(f"{run} searched other calibration windows than --calib-windows/--seqlen give")
            apply_clip_ratios(qm, start)
            apply_clip_ratios(qm, load_ratio_file(Path(run) / "ratios.json"))
            rows.append({"run": Path(run).name, "calib_ppl": calibration_ppl(qm.model, windows, args.batch_size),
                         "reported": report["result"]["calib_ppl"],
                         "reported_threads": report["environment"].get("torch_threads")})
    print(f"threads {torch.get_num_threads()}, {args.dtype}, batch {args.batch_size}, {len(windows)} x {args.seqlen} "
          f"{args.calib_split} tokens{'' if args.layers is None else f', first {args.layers} layers quantized'}; "
          f"clip 1.0: {base:.3f}")
    print("| run | calib PPL (here) | vs first run | as the search reported it (its threads) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        rel = 100 * (r["calib_ppl"] / rows[0]["calib_ppl"] - 1)
        print(f"| {r['run']} | {r['calib_ppl']:.3f} | {rel:+.2f} % | {r['reported']:.3f} ({r['reported_threads']}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"clip1": base, "rows": rows, "dtype": args.dtype, "layers": args.layers,
                                               "threads": torch.get_num_threads(), "environment": environment()},
                                              indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
