"""``spikequant search``: Gradual Binary Search of clip ratios on a model quantized by a recipe.

Writes ``ratios.json`` (loadable by the ``clip_ratios`` modifier), ``report.json`` / ``report.md``,
``heatmap.png`` and ``state.json`` (the resumable search state, rewritten after every probe). A folder
written by ``spikequant quantize`` is searched streamed (``--offload disk``, or ``auto`` when it does not
fit): its decoder layers are read from the shards when a probe needs them (docs/scale.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from spikequant.errors import DataError, SpikequantError


def cmd_search(args: argparse.Namespace) -> int:
    from spikequant.algorithms.clip_ratios import save_ratio_file
    from spikequant.algorithms.gbs import (
        GBSConfig,
        calibration_ppl,
        fingerprint,
        gbs_search,
        plot_heatmap,
        report_markdown,
    )
    from spikequant.data import eval_windows, load_text, recipe_calibration_windows, tokenize
    from spikequant.eval import evaluate, reference_logprobs
    from spikequant.export import is_quantized_dir, load_quantized, save_quantized
    from spikequant.models import decoder_layers, load_model
    from spikequant.pipeline import quantize
    from spikequant.recipes import load_recipe
    from spikequant.reports import environment, write_json, write_text
    from spikequant.streaming.offload import should_stream

    out = Path(args.output)
    state = out / "state.json"
    if args.resume and not state.is_file():
        raise SpikequantError(f"--resume: no search state in {out} (expected {state})")
    if not args.resume and out.exists() and any(out.iterdir()):
        raise SpikequantError(f"output directory {out} is not empty; pass --resume to continue its search, "
                              "or choose a new directory")
    if args.calib_split == "test":
        raise DataError("--calib-split test: the search never calibrates on the evaluation text; use "
                        "validation or train")
    try:
        config = GBSConfig(args.mode, args.objective, args.iterations, args.epsilon, args.reverse, args.layers,
                           args.batch_size, args.horizon, args.reference, args.race, args.race_min,
                           args.race_max, args.precision)
    except ValueError as e:
        raise SpikequantError(f"search: {e}") from None
    saved = is_quantized_dir(args.model)
    if saved and args.recipe:
        raise SpikequantError(f"{args.model} is a saved quantized model; it carries its recipe, drop --recipe")
    if not saved and not args.recipe:
        raise SpikequantError("--recipe is required (or pass a directory written by `spikequant quantize`)")
    # In memory the search holds the quantized model, and with --eval-windows the FP reference beside it.
    streamed = should_stream(args.offload, args.model, args.dtype, "eval" if args.eval_windows else "quantize")
    if streamed and not saved:
        raise SpikequantError(f"a streamed search (--offload {args.offload}) runs on a saved model: run `spikequant "
                              f"quantize --model {args.model} --recipe {args.recipe} --output DIR` first (it streams "
                              "too), then search --model DIR; or --offload none to load the model whole")
    if streamed and args.save and Path(args.save).resolve() == Path(args.model).resolve():
        raise SpikequantError(f"--save {args.save}: a streamed search reads its layers from that folder; save "
                              "to another one")
    gtext = load_text(args.dataset, args.calib_split, args.data_dir)  # data first: a bad path fails fast
    progress = not args.no_progress
    t = time.perf_counter()
    sm = None
    if streamed:
        from spikequant.export.saving import MANIFEST
        from spikequant.recipes import Recipe
        from spikequant.streaming import open_saved

        sm, qm, manifest = open_saved(args.model, args.dtype, args.device)
        recipe = Recipe.from_dict(manifest["recipe"], str(Path(args.model) / MANIFEST))
        base_model, findings = manifest["base_model"], manifest.get("findings", {})
        model, tokenizer = sm.model, sm.tokenizer
    elif saved:
        loaded, qm, recipe, manifest = load_quantized(args.model, args.dtype, args.device)
        base_model, findings = manifest["base_model"], manifest.get("findings", {})
    else:
        recipe = load_recipe(args.recipe)
        # The command line holds the search settings: a gbs modifier in the recipe is not run a second time.
        recipe = dataclasses.replace(recipe, modifiers=[m for m in recipe.modifiers if m.type != "gbs"])
        if recipe.is_float:
            raise SpikequantError(f"recipe {recipe.name!r} quantizes nothing; there is no clip ratio to search")
        base_model = args.model
        loaded = load_model(args.model, args.dtype, args.device)
    if sm is None:
        model, tokenizer = loaded.model, loaded.tokenizer
    windows = eval_windows(tokenize(tokenizer, gtext), args.seqlen, args.calib_windows)
    if len(windows) < args.calib_windows:
        raise DataError(f"{gtext.name} holds only {len(windows)} windows of {args.seqlen} tokens, "
                        f"fewer than --calib-windows {args.calib_windows}")

    def recipe_calibration():
        return recipe_calibration_windows(recipe, tokenizer, args.data_dir)

    base_sm = None
    if streamed and args.eval_windows:  # the FP reference streamed as well (a local checkpoint; checked now)
        from spikequant.streaming import StreamedModel

        base_sm = StreamedModel(base_model, args.dtype, args.device)
    out.mkdir(parents=True, exist_ok=True)
    if not saved:
        qm, findings = quantize(model, recipe, recipe_calibration, progress)
    quantize_s = time.perf_counter() - t
    # All in inference mode, as the evaluations are: buffers a transform caches during one of them are
    # inference tensors, which may not be written outside inference mode afterwards.
    with torch.inference_mode():
        test, reference = None, None
        if args.eval_windows:
            ttext = load_text(args.dataset, "test", args.data_dir)
            test = eval_windows(tokenize(tokenizer, ttext), args.eval_seqlen, args.eval_windows)
            if base_sm is not None:
                from spikequant.streaming import logprobs_streamed

                reference = logprobs_streamed(base_sm, test, progress)
                base_sm = None
            else:
                reference = reference_logprobs(load_model(base_model, args.dtype, args.device).model, test, progress)

        def run_eval(desc: str) -> dict:
            if sm is not None:
                from spikequant.streaming import evaluate_streamed

                return evaluate_streamed(sm, test, reference, progress, desc).to_dict()
            return evaluate(model, test, reference, progress, desc).to_dict()

        evals = {}
        if test is not None and not args.resume:  # a resumed run reads the clip-1.0 row from the first run
            evals["clip1"] = run_eval("eval clip 1.0")
            write_json({"test": evals}, out / "eval_clip1.json")
        elif test is not None and (out / "eval_clip1.json").is_file():
            evals["clip1"] = json.loads((out / "eval_clip1.json").read_text())["test"]["clip1"]
        clip1 = calibration_ppl(model, windows, args.batch_size)
        res = gbs_search(qm, windows, config, state_path=state, progress=progress)
        if test is not None:
            evals["gbs"] = run_eval("eval GBS")
            evals["windows"], evals["seqlen"], evals["text_sha256"] = len(test), args.eval_seqlen, ttext.sha256
    if args.save:
        gbs_findings = {**findings, "gbs": {"ratios": {str(i): e for i, e in res.ratios.items()}}}
        if sm is not None:
            from spikequant.streaming import save_streamed

            save_streamed(sm, qm, recipe, base_model, args.save, gbs_findings, progress)
        else:
            save_quantized(qm, tokenizer, recipe, base_model, args.save, gbs_findings)
    n_layers = len(decoder_layers(model))
    res.extra["calib_ppl_clip1"] = clip1
    save_ratio_file(res.ratios, out / "ratios.json")
    report = {
        "model": args.model,
        "recipe": recipe.to_dict(),
        "calibration": {"name": gtext.name, "source": gtext.source, "text_sha256": gtext.sha256,
                        "windows": len(windows), "seqlen": args.seqlen, "windows_sha256": fingerprint(windows),
                        "layout": "contiguous windows from the start of the text"},
        "result": res.to_dict(),
        "findings": findings,
        "test": evals or None,
        "offload": "disk" if streamed else "none",
        "timings": {"quantize_s": round(quantize_s, 3), "search_s": round(res.search_seconds, 3)},
        "environment": environment(),
    }
    write_json(report, out / "report.json")
    write_text(report_markdown(report), out / "report.md")
    plot_heatmap(res.ratios, n_layers, out / "heatmap.png",
                 f"GBS {config.mode} ratios: {recipe.name}")
    for k, v in ((k, evals.get(k)) for k in ("clip1", "gbs")):
        if v:
            print(f"test ({len(test)} x {args.eval_seqlen}) {k}: PPL {v['ppl']:.3f}, KL {v['kl']:.4f}, "
                  f"top-1 {v['top1']:.4f}")
    print(f"searched {len(res.slots)} slots in {res.search_seconds:.1f} s ({res.probes} probes, "
          f"{res.layer_forwards} decoder-layer forwards); calibration PPL {clip1:.3f} at clip 1.0 -> "
          f"{res.calib_ppl:.3f}; wrote {out / 'ratios.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from spikequant.cli_args import add_model_args, add_offload_arg, positive_int

    p = sub.add_parser("search", help="Gradual Binary Search of per-layer activation clip ratios (GBS)")
    add_model_args(p)
    add_offload_arg(p)
    p.add_argument("--recipe", default=None,
                   help="preset name or .yaml/.json file to quantize by first (not with a saved --model)")
    p.add_argument("--data-dir", default=None, help="folder holding wikitext-2/ (or $SPIKEQUANT_DATA_DIR)")
    p.add_argument("--dataset", default="wikitext2", help="calibration text: wikitext2 or a text file")
    p.add_argument("--calib-split", default="validation",
                   help="split the calibration windows come from (default: %(default)s; never test)")
    p.add_argument("--calib-windows", type=positive_int, default=8,
                   help="contiguous windows from the start of the split (default: %(default)s)")
    p.add_argument("--seqlen", type=positive_int, default=512, help="window length (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=10, help="bisection iterations per slot (default: 10)")
    p.add_argument("--epsilon", type=float, default=1e-3, help="stop a slot when b - a <= epsilon")
    p.add_argument("--mode", choices=["exact", "fast"], default="fast")
    p.add_argument("--objective", choices=["layer", "ppl"], default=None,
                   help="fast mode's objective (default layer; exact mode: ppl)")
    p.add_argument("--horizon", type=positive_int, default=1,
                   help="fast mode, objective layer: measure the error this many layers on (default: 1)")
    p.add_argument("--reference", choices=["float", "slot"], default="float",
                   help="fast mode, objective layer: compare a probe with the never-quantized stream (float, "
                        "default) or with the same computation with the searched slot passing through (slot)")
    p.add_argument("--race", type=float, default=0.0, metavar="Z",
                   help="fast mode, objective ppl: decide each probe batch by batch and stop once the mean NLL "
                        "difference is more than Z standard errors from 0 (ours; 0: off, every batch)")
    p.add_argument("--race-min", type=positive_int, default=2,
                   help="racing: batches seen before a decision may stop early (default: %(default)s)")
    p.add_argument("--race-max", type=positive_int, default=None,
                   help="racing: after this many batches decide by the sign of the mean difference alone "
                        "(default: every batch, then the exact rule)")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="fast mode, objective ppl: run the probes under torch.autocast(bfloat16) (ours)")
    p.add_argument("--reverse", action="store_true", help="visit layers (and slots) from last to first")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="search only the first K layers of the visiting order; the rest pass through")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward")
    p.add_argument("--output", required=True, help="folder for ratios.json, report.json/.md, heatmap.png")
    p.add_argument("--resume", action="store_true", help="continue the search saved in --output")
    p.add_argument("--eval-windows", type=positive_int, default=None,
                   help="also evaluate (PPL, KL, top-1) on the first N test windows, at clip 1.0 and after GBS")
    p.add_argument("--eval-seqlen", type=positive_int, default=512, help="test window length (default: 512)")
    p.add_argument("--save", default=None, help="save the quantized model with the searched ratios here "
                   "(streamed: written one layer shard at a time)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_search)
