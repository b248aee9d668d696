"""The ``spikequant`` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from spikequant.cli_args import add_data_args, add_model_args, add_offload_arg, add_report_args
from spikequant.errors import SpikequantError
from spikequant.eval.zeroshot import add_arguments as zeroshot_arguments

DEMO_RECIPES = ("fp", "w8a8-tensor", "w8a8-tensor-static", "w8a8-token")


def _session(args: argparse.Namespace):
    from spikequant.eval.zeroshot import from_arguments
    from spikequant.pipeline import Session

    return Session(model_source=args.model, data_dir=args.data_dir, dataset=args.dataset, seqlen=args.seqlen,
                   max_windows=args.max_windows, dtype=args.dtype, device=args.device, kl=not args.no_kl,
                   progress=not args.no_progress, evaluators=from_arguments(args))


def _print_table(reports: list[dict]) -> None:
    from spikequant.reports import markdown_table, result_row, table_columns

    print(markdown_table([result_row(r) for r in reports], table_columns(reports)))


def cmd_eval(args: argparse.Namespace) -> int:
    from spikequant.export import is_quantized_dir
    from spikequant.pipeline import run_saved, save_report_files
    from spikequant.recipes import load_recipe
    from spikequant.streaming.offload import should_stream

    session = _session(args)
    streamed = should_stream(args.offload, args.model, args.dtype, "eval")
    if is_quantized_dir(args.model):
        if args.recipe:
            raise SpikequantError(f"{args.model} is a saved quantized model; it carries its recipe, drop --recipe")
        if streamed:
            from spikequant.streaming.evaluate import run_saved_streamed

            report, recipe = run_saved_streamed(session, args.model)
        else:
            report, recipe = run_saved(session, args.model)
    else:
        recipe = load_recipe(args.recipe or "fp")
        if streamed and not recipe.is_float:
            raise SpikequantError(f"--offload disk evaluates saved models: run `spikequant quantize --model "
                                  f"{args.model} --recipe {recipe.name} --output DIR` first, then eval DIR")
        if streamed:
            from spikequant.streaming.evaluate import run_float_streamed

            report, _ = run_float_streamed(session)
        else:
            report, _ = session.run(recipe)
    _print_table([report])
    save_report_files([report], args.json, args.markdown, f"spikequant eval: {recipe.name}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from spikequant.export import save_quantized
    from spikequant.pipeline import quantize
    from spikequant.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.output)
    session = _session(args)
    session.kl = False
    from spikequant.streaming.offload import should_stream

    if should_stream(args.offload, args.model, args.dtype, "quantize"):
        return _quantize_streamed(args, recipe, session, out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SpikequantError(f"output directory {out} is not empty; pass --overwrite to replace its files")
    loaded = session.loaded
    qm, findings = quantize(loaded.model, recipe, lambda: session.calibration(recipe), not args.no_progress)
    save_quantized(qm, loaded.tokenizer, recipe, args.model, out, findings)
    print(f"saved {recipe.name} quantization of {args.model} to {out} "
          f"({sum(not m.is_float for m in qm.plan.values())} linears quantized, "
          f"{100 * qm.high_precision_share():.2f}% of linear parameters in high precision)")
    return 0


def _quantize_streamed(args: argparse.Namespace, recipe, session, out: Path) -> int:
    """``quantize`` one decoder layer at a time (``--offload disk``, or ``auto`` on a model too large);
    the same command on a partly written output resumes at the next layer."""
    import json
    import shutil

    from spikequant.streaming import StreamedModel, check_streamable, peak_rss_bytes, quantize_streamed
    from spikequant.streaming.quantize import STATE, STATE_DIR

    check_streamable(recipe)
    partial = out / STATE_DIR / STATE
    if args.overwrite:
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    elif partial.is_file():
        done = json.loads(partial.read_text(encoding="utf-8")).get("done", 0)
        print(f"resuming the streamed run in {out}: {done} layer(s) done, continuing at layer {done}")
    elif out.exists() and any(out.iterdir()):
        raise SpikequantError(f"output directory {out} is not empty; pass --overwrite to replace its files")
    sm = StreamedModel(args.model, args.dtype, args.device)
    qm, _ = quantize_streamed(sm, recipe, lambda: session.calibration(recipe, sm.tokenizer), out, args.model,
                              progress=not args.no_progress)
    print(f"saved {recipe.name} quantization of {args.model} to {out}, streamed one layer at a time "
          f"({sum(not m.is_float for m in qm.plan.values())} linears quantized, "
          f"{100 * qm.high_precision_share():.2f}% of linear parameters in high precision; "
          f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from spikequant.pipeline import save_report_files
    from spikequant.recipes import load_recipe

    recipes = [load_recipe(r) for r in DEMO_RECIPES]
    session = _session(args)
    reports = [session.run(r)[0] for r in recipes]
    print(f"\n{args.model} on {reports[0]['data']['name']}: {reports[0]['data']['windows']} windows x "
          f"{args.seqlen} tokens\n")
    _print_table(reports)
    out = Path(args.output)
    save_report_files(reports, out / "demo.json", out / "demo.md", f"spikequant demo: {args.model}")
    print(f"\nreports: {out / 'demo.json'}, {out / 'demo.md'}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from spikequant.recipes import list_presets, load_recipe

    for name in list_presets():
        print(f"{name:28s} {load_recipe(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spikequant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="evaluate a model (optionally quantized by a recipe): PPL, KL, top-1")
    add_model_args(p)
    p.add_argument("--recipe", default=None, help="preset name or .yaml/.json file (default: fp)")
    add_data_args(p)
    add_report_args(p)
    add_offload_arg(p)
    zeroshot_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a model by a recipe and save it")
    add_model_args(p)
    p.add_argument("--recipe", required=True, help="preset name or .yaml/.json file")
    p.add_argument("--output", required=True, help="directory to write the quantized model to")
    p.add_argument("--overwrite", action="store_true")
    add_offload_arg(p)
    add_data_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("demo", help="the main job: FP vs W8A8 per-tensor (dynamic, static) and per-token")
    add_model_args(p)
    add_data_args(p, seqlen=512)
    p.set_defaults(max_windows=16)
    p.add_argument("--output", default="results", help="folder for demo.json and demo.md (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("recipes", help="list the built-in recipe presets")
    p.set_defaults(func=cmd_recipes)

    for module in ("spikequant.hadamard.cli", "spikequant.analysis.cli", "spikequant.algorithms.gbs_cli"):
        try:
            __import__(module, fromlist=["register"]).register(sub)
        except ModuleNotFoundError as e:
            if not module.startswith(e.name or "?"):
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    from spikequant import reports

    args = build_parser().parse_args(argv)
    previous = reports.ENTRY_COMMAND
    reports.set_entry_command(shlex.join(["spikequant", *(sys.argv[1:] if argv is None else argv)]))
    try:
        return int(args.func(args) or 0)
    except SpikequantError as e:
        print(f"spikequant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spikequant: interrupted", file=sys.stderr)
        return 130
    finally:
        reports.set_entry_command(previous)


if __name__ == "__main__":
    sys.exit(main())
