"""The ``spikequant`` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from spikequant.cli_args import add_data_args, add_model_args, add_offload_arg, add_report_args, positive_int
from spikequant.errors import SpikequantError
from spikequant.eval.zeroshot import add_arguments as zeroshot_arguments
from spikequant.models import DEFAULT_MODEL

BACKEND_NAMES = ("float", "bf16", "int8")  # spikequant.backends.BACKENDS, without importing torch here
DEMO_RECIPES = ("fp", "w8a8-tensor", "w8a8-tensor-static", "w8a8-token")
EXPORT_FORMATS = ("compressed-tensors",)
PROMOTE_HELP = ("keep a fused group (q/k/v, gate/up) whose parts the recipe quantizes differently in float "
                "instead of refusing the export (printed per group)")


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
    from spikequant.export.compressed import is_compressed_tensors_dir
    from spikequant.pipeline import run_saved, save_report_files
    from spikequant.recipes import load_recipe
    from spikequant.streaming.offload import should_stream

    session = _session(args)
    streamed = should_stream(args.offload, args.model, args.dtype, "eval")
    if is_quantized_dir(args.model) or is_compressed_tensors_dir(args.model):
        if args.recipe:
            raise SpikequantError(f"{args.model} is a saved quantized model; it carries its recipe, drop --recipe")
        if streamed:
            if args.backend != "float" or is_compressed_tensors_dir(args.model):
                raise SpikequantError(f"--offload disk evaluates spikequant folders on the float fake-quant path; "
                                      f"{args.model} with --backend {args.backend} needs --offload none")
            from spikequant.streaming.evaluate import run_saved_streamed

            report, recipe = run_saved_streamed(session, args.model)
        else:
            report, recipe = run_saved(session, args.model, args.backend)
    elif args.backend != "float":
        raise SpikequantError(f"--backend {args.backend} evaluates a folder written by spikequant quantize; "
                              f"{args.model} is not one")
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
    export_out = _export_output(args)
    if export_out is not None and export_out.exists() and any(export_out.iterdir()) and not args.overwrite:
        raise SpikequantError(f"export directory {export_out} is not empty; pass --overwrite to replace it")
    session = _session(args)
    session.kl = False
    from spikequant.streaming.offload import should_stream

    if should_stream(args.offload, args.model, args.dtype, "quantize"):
        rc = _quantize_streamed(args, recipe, session, out)
        if export_out is not None:
            _export(out, export_out, args)
        return rc
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SpikequantError(f"output directory {out} is not empty; pass --overwrite to replace its files")
    loaded = session.loaded
    qm, findings = quantize(loaded.model, recipe, lambda: session.calibration(recipe), not args.no_progress)
    save_quantized(qm, loaded.tokenizer, recipe, args.model, out, findings)
    print(f"saved {recipe.name} quantization of {args.model} to {out} "
          f"({sum(not m.is_float for m in qm.plan.values())} linears quantized, "
          f"{100 * qm.high_precision_share():.2f}% of linear parameters in high precision)")
    if export_out is not None:
        _export(out, export_out, args)
    return 0


def _export_output(args: argparse.Namespace) -> Path | None:
    """Where ``quantize --export FORMAT`` writes: ``--export-output``, else ``<output>-<format>`` beside
    the spikequant folder (which stays: it is the export's source and the fake-quant reference)."""
    if not args.export:
        return None
    if args.export_output:
        return Path(args.export_output)
    out = Path(args.output)
    return out.with_name(f"{out.name}-{args.export}")


def _export(source: Path, output: Path, args: argparse.Namespace) -> None:
    from spikequant.export.compressed import export_compressed

    res = export_compressed(source, output, promote_fused=args.promote_fused, overwrite=args.overwrite,
                            progress=not args.no_progress)
    kept = ", ".join(res.ignored) if len(res.ignored) <= 8 else f"{len(res.ignored)} modules"
    print(f"exported {source} to {res.output} (compressed-tensors, format {res.formats}: {res.quantized} linears "
          f"quantized, {len(res.ignored)} kept in float: {kept})")


def cmd_export(args: argparse.Namespace) -> int:
    _export(Path(args.model), Path(args.output), args)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from spikequant.backends.generate import generate, load_for_backend

    if not args.prompt:
        raise SpikequantError("--prompt is empty")
    if args.save_int8 and args.backend != "int8":
        raise SpikequantError("--save-int8 needs --backend int8")
    if args.save_int8 and Path(args.save_int8).exists() and any(Path(args.save_int8).iterdir()):
        raise SpikequantError(f"--save-int8 directory {args.save_int8} is not empty")
    prepared = load_for_backend(args.model, args.backend, args.recipe, args.data_dir, args.kernel, args.int8_dtype,
                                not args.no_progress, args.int8_embeddings)
    if args.save_int8:
        from spikequant.backends import save_int8

        save_int8(prepared.model, prepared.tokenizer, args.save_int8, args.model)
    res = generate(prepared, args.prompt, args.max_new_tokens, do_sample=args.sample, use_cache=not args.no_cache,
                   seed=args.seed, compile=args.compile)
    import torch

    emb = prepared.model.get_input_embeddings().weight.dtype
    table = f" (embedding table and lm_head {str(emb).removeprefix('torch.')})" if emb != prepared.dtype else ""
    what = {"float": "float32" + (" fake-quant" if prepared.recipe else ""),
            "bf16": "bfloat16" + (" fake-quant" if prepared.recipe else ""),
            "int8": f"{len(prepared.int8_linears)} int8 linears ({args.kernel}), "
                    f"{str(prepared.dtype).removeprefix('torch.')} elsewhere" + table}[prepared.backend]
    print(res.text)
    print(f"\n[{prepared.backend}: {what}; recipe {prepared.recipe or 'none'}; {torch.get_num_threads()} threads] "
          f"prefill {res.prompt_tokens} tokens: {res.prefill_tps:.1f} tokens/s; "
          f"decode {max(res.new_tokens - 1, 0)} tokens: {res.decode_tps:.1f} tokens/s"
          + (f" (decode compiled; first, untimed run {res.warmup_s:.1f} s)" if res.compiled else ""))
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
    p.add_argument("--backend", default="float", choices=BACKEND_NAMES,
                   help="for a folder written by quantize: float (fake-quant, default), bf16, or int8 (real int8 "
                        "kernels, W8A8 static models)")
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
    p.add_argument("--export", default=None, choices=EXPORT_FORMATS,
                   help="also export the saved model to this format (see `spikequant export`)")
    p.add_argument("--export-output", default=None,
                   help="folder for --export (default: OUTPUT-FORMAT beside --output, e.g. q-compressed-tensors)")
    p.add_argument("--promote-fused", action="store_true", help=PROMOTE_HELP)
    add_offload_arg(p)
    add_data_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="export a `quantize --output` folder to a serving format (compressed-tensors)")
    p.add_argument("--model", required=True, help="a folder written by `spikequant quantize --output`")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--output", required=True, help="folder to write (written to a temporary sibling, then renamed)")
    p.add_argument("--promote-fused", action="store_true", help=PROMOTE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("generate", help="generate text on a backend (float, bf16, int8) and time prefill / decode")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in name, hub id or HF folder (with --recipe), a folder written by quantize, or an "
                        "int8 folder written by --save-int8 (default: %(default)s)")
    p.add_argument("--recipe", default=None, help="quantize --model by this recipe first (needs --data-dir)")
    p.add_argument("--backend", default="float", choices=BACKEND_NAMES,
                   help="float: float32 (a quantized model runs its fake-quant simulation); bf16: the same in "
                        "bfloat16; int8: real int8 kernels (W8A8 static models) (default: %(default)s)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--no-cache", action="store_true", help="rerun the whole sequence at every step (no KV cache)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (static KV cache, torch.compile; an untimed first run compiles, "
                        "minutes on a small CPU)")
    p.add_argument("--kernel", default="auto", choices=["auto", "onednn", "int_mm"],
                   help="int8 kernel (default: %(default)s)")
    p.add_argument("--int8-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="activations and float modules of the int8 backend (default: %(default)s)")
    p.add_argument("--int8-embeddings", default=None, choices=["float32", "bfloat16"],
                   help="store the embedding table and lm_head of the int8 backend in this dtype (default: "
                        "--int8-dtype; an int8 checkpoint: as saved); bfloat16 with --int8-dtype float32 halves "
                        "the table, the rest computes in float32")
    p.add_argument("--save-int8", default=None, help="also write the int8 model to this folder (--backend int8)")
    p.add_argument("--data-dir", default=None, help="calibration text for --recipe (or $SPIKEQUANT_DATA_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)

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
