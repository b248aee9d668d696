"""``spikequant analyze`` (where the spikes are, and a recipe that keeps them) and ``spikequant compare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from spikequant.cli_args import add_data_args, add_model_args
from spikequant.errors import SpikequantError

DEFAULT_COMPARE = ("fp", "w8a8-tensor", "spike-w8a8-tensor", "random-exempt")


def _positive(value: float | int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise SpikequantError(f"{flag} must be positive, got {value}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from spikequant.algorithms.spike_exempt import PRECISIONS
    from spikequant.analysis.analyze import FILES, analyze, write_analysis
    from spikequant.analysis.report import spike_recipe
    from spikequant.data import eval_windows, load_text, tokenize
    from spikequant.models import load_model
    from spikequant.recipes import load_recipe
    from spikequant.stats import SpikeRule

    # Everything the user typed is checked before the model loads and before any file is written.
    for value, flag in ((args.k, "--k"), (args.abs_threshold, "--abs-threshold"),
                        (args.top_tokens, "--top-tokens")):
        _positive(value, flag)
    if args.outliers < 0:
        raise SpikequantError(f"--outliers must be >= 0, got {args.outliers}")
    if not 0 < args.percentile <= 100:
        raise SpikequantError(f"--percentile must be in (0, 100], got {args.percentile}")
    if args.precision not in PRECISIONS:
        raise SpikequantError(f"--precision {args.precision!r} not one of {', '.join(PRECISIONS)}")
    rule = SpikeRule(k=args.k, abs_threshold=args.abs_threshold, max_layers=args.max_layers)
    base = load_recipe(args.base_recipe)
    spike_recipe(base, [], args.precision)  # validates the combination
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise SpikequantError(f"--output {out} is a file; give a folder for the analysis files")
    clash = [f for f in FILES.values() if (out / f).exists()]
    if clash and not args.overwrite:
        raise SpikequantError(f"{out / clash[0]} exists; pass --overwrite or choose another --output")
    text = load_text(args.dataset, args.split, args.data_dir)
    loaded = load_model(args.model, args.dtype, args.device)
    windows = eval_windows(tokenize(loaded.tokenizer, text), args.seqlen, args.max_windows)
    result = analyze(loaded.model, windows, loaded.tokenizer, rule, args.percentile, args.top_tokens,
                     not args.no_progress, args.outliers)
    prov = {"model": args.model, "data": {"name": text.name, "source": text.source, "sha256": text.sha256,
                                          "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}}
    paths = write_analysis(result, out, base, args.precision, prov, title=f"Activation spikes of {args.model}")
    print(f"median max |input| over {len(result.stats)} decoder linears: {result.median:.4g}; "
          f"threshold {result.threshold:.4g}")
    by_name = {s.name: s for s in result.stats}
    for name in result.detected:
        s = by_name[name]
        print(f"  spike: {name:40s} max |in| {s.max_in:10.4g} ({s.max_in / result.median:6.1f}x median) at "
              f"position {s.position} token {s.token!r} channel {s.channel}")
    if not result.detected:
        print("  no spike layer detected")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from spikequant.compare import FILES, fp_ppl, resolve_recipes, run_compare
    from spikequant.pipeline import Session
    from spikequant.reports import markdown_table, result_row, table_columns

    recipes = resolve_recipes(args.recipes)
    session = Session(model_source=args.model, data_dir=args.data_dir, dataset=args.dataset, split=args.split,
                      seqlen=args.seqlen, max_windows=args.max_windows, dtype=args.dtype, device=args.device,
                      progress=not args.no_progress)

    def show(rep: dict) -> None:
        r = result_row(rep)
        hp = "" if r["hp_share"] is None else f", {100 * r['hp_share']:.2f}% high precision"
        kl = "" if r["kl"] is None else f", KL {r['kl']:.4f}, top-1 {r['top1']:.4f}"
        print(f"{r['recipe']:34s} PPL {r['ppl']:9.4g}{kl}{hp} ({r['wall_s']:.0f} s)", flush=True)

    reports = run_compare(session, recipes, args.output, args.resume, args.overwrite, show)
    fp = fp_ppl(reports)
    print()
    print(markdown_table([result_row(r, fp) for r in reports], table_columns(reports, compare=True)))
    print("\nwrote " + ", ".join(str(Path(args.output) / f) for f in FILES.values()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="max |activation| of every decoder linear, spike detection, plot and "
                                       "a recipe keeping the spike layers")
    add_model_args(p)
    add_data_args(p, seqlen=512, max_windows=8, split="validation", kl=False)
    p.add_argument("--output", required=True, help="folder for spikes.json/.md/.png and spike-recipe.yaml")
    p.add_argument("--overwrite", action="store_true", help="replace existing analysis files in --output")
    p.add_argument("--k", type=float, default=50.0,
                   help="spike when max |input| > k x median of all linears' max |input| (default: %(default)s)")
    p.add_argument("--abs-threshold", type=float, default=None,
                   help="also a spike when max |input| exceeds this value")
    p.add_argument("--max-layers", type=int, default=None, help="keep at most this many (the largest)")
    p.add_argument("--percentile", type=float, default=99.9, help="percentile of |input| to report "
                                                                  "(default: %(default)s)")
    p.add_argument("--top-tokens", type=int, default=8, help="tokens recorded per linear (default: %(default)s)")
    p.add_argument("--outliers", type=int, default=4,
                   help="also report max |input| without the N largest tokens of each window (default: %(default)s)")
    p.add_argument("--base-recipe", default="w8a8-tensor",
                   help="recipe the written recipe starts from (default: %(default)s)")
    p.add_argument("--precision", default="float", help="what the spike layers keep: float, fp8_e4m3 or fp8_e5m2")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compare", help="several recipes on one model and text: one table, JSON and bar chart")
    add_model_args(p)
    add_data_args(p, seqlen=512, max_windows=16, split="test", kl=False)
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_COMPARE),
                   help="preset names or .yaml/.json files (default: %(default)s)")
    p.add_argument("--output", required=True, help="folder for compare.json, compare.md and compare.png")
    p.add_argument("--resume", action="store_true", help="skip recipes already in output/compare.json")
    p.add_argument("--overwrite", action="store_true", help="start over even if output/compare.json exists")
    p.set_defaults(func=cmd_compare)
