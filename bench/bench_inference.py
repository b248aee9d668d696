"""Inference on CPU: float32, bfloat16 and our int8 model of SmolLM2-135M, in one run.

Per backend, in a fresh subprocess (so peak RSS is its own): prefill tokens/s for 512-token prompts at
batch 1 and 8 (the pass ``generate`` makes over the prompt: KV cache on, logits of the last position
only), decode tokens/s (greedy ``generate`` of --decode-tokens tokens after a 512-token prompt, batch 1),
weight bytes in memory, checkpoint bytes on disk, peak RSS and WikiText-2 perplexity. Timings are the
median of --repeats runs; the load average is recorded before and after each backend.

    python bench/bench_inference.py --data-dir ../shared/data --quantized /tmp/q8 --json results/inference.json

``--quantized`` is a folder written by ``spikequant quantize --recipe spike-w8a8-tensor-static``; without
it the recipe is run first. The int8 rows load the int8 checkpoint this script writes from it (int8
weights in safetensors, see spikequant/backends/int8.py), not the float folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spikequant.cli_args import positive_int

ROWS = {
    # name: (what is loaded, how it runs)
    "fp32": "float model, float32",
    "bf16": "float model, bfloat16",
    "fake-quant": "W8A8 fake-quant (float32 simulation, the reference)",
    "int8": "int8 linears (auto: {prefill} for prefill, _int_mm for decode), float32 elsewhere",
    "int8-bf16": "int8 linears (auto), bfloat16 activations and float modules (stored in bfloat16)",
    "int8-bf16-eager": "as int8-bf16, the input quantization in four eager ops instead of one fused (compiled) loop",
    "int8-onednn": "int8 linears (oneDNN qlinear only), float32 activations and float modules",
    "int8-int_mm": "int8 linears (torch._int_mm), float32 activations and float modules",
    # compiled rows: prefill and PPL through spikequant.backends.compile_model (torch.compile, inductor
    # freezing, one graph per shape), decode through generate(compile=True) (static KV cache, transformers'
    # compiled decode step); compilation is timed apart (compile_s in the JSON), never in the rates
    "fp32-compiled": "fp32, compiled (torch.compile: prefill with freezing, decode with a static KV cache)",
    "bf16-compiled": "bf16, compiled (as fp32-compiled)",
    "int8-compiled": "int8 (float32 elsewhere), compiled: {prefill} for prefill, _int_mm for decode",
    "int8-bf16-compiled": "int8-bf16, compiled: {prefill} for prefill, _int_mm for decode",
    "int8-bf16emb": "int8 linears (auto), float32 activations and float modules, the embedding table and lm_head "
                    "stored (and applied) in bfloat16",
    "int8-bf16emb-compiled": "int8-bf16emb, compiled: {prefill} for prefill, _int_mm for decode",
}
# "-flex" rows: the same, with prefill and PPL through flex_attention (compiled rows: inductor's fused kernel;
# decode keeps SDPA: transformers' compiled decode step does not compile flex_attention on the CPU); the
# fake-quant row with flex_attention is the PPL reference for them (attention is float in every row)
FLEX = {"fake-quant-flex": "W8A8 fake-quant with flex_attention (the PPL reference of the -flex rows)"}
FLEX.update({f"{k}-flex": v + "; prefill and PPL with flex_attention"
             for k, v in ROWS.items() if k.endswith("-compiled")})
ROWS.update(FLEX)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix == ".safetensors")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (oneDNN primitive creation, weight packing)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), samples


# -- worker: one backend in its own process ------------------------------------------------------------
def worker(args: argparse.Namespace) -> dict:
    from spikequant.backends import PreparedModel, load_int8, weight_bytes
    from spikequant.backends.generate import generate
    from spikequant.data import eval_windows, load_text, tokenize
    from spikequant.eval.perplexity import evaluate

    torch.set_flush_denormal(True)  # every backend alike (the fake-quant path needs it, see eval/perplexity.py)
    flex = args.worker.endswith("-flex")
    compiled = args.worker.removesuffix("-flex").endswith("-compiled")
    name = args.worker.removesuffix("-flex").removesuffix("-compiled")
    t = time.perf_counter()
    if name in ("fp32", "bf16"):
        from spikequant.models import load_model

        loaded = load_model(args.model, "float32" if name == "fp32" else "bfloat16", "cpu")
        model, tok = loaded.model, loaded.tokenizer
    elif name == "fake-quant":
        from spikequant.export import load_quantized

        loaded, _, _, _ = load_quantized(args.quantized, "float32", "cpu")
        model, tok = loaded.model, loaded.tokenizer
    else:
        kernel = {"int8-int_mm": "int_mm", "int8-onednn": "onednn"}.get(name, "auto")
        path = Path(args.int8_dir)
        bf16 = name.startswith("int8-bf16") and name != "int8-bf16emb"
        if name.startswith("int8-bf16"):  # the float modules (-bf16) or the table (-bf16emb) stored in bfloat16
            path = path.parent / name.removesuffix("-eager")
        model, tok, _ = load_int8(path, kernel, torch.bfloat16 if bf16 else torch.float32,
                                  quant="eager" if name.endswith("-eager") else "auto")
    load_s = time.perf_counter() - t
    out: dict = {"backend": args.worker, "load_s": round(load_s, 2), "weight_bytes": weight_bytes(model),
                 "load_before": load_avg()}
    if name.startswith("int8"):  # which kernel `auto` runs for prefill on this CPU (backends.int8.onednn_usable)
        from spikequant.backends.int8 import onednn_input, onednn_usable

        out["prefill_kernel"] = f"oneDNN qlinear ({onednn_input()} input)" if onednn_usable() else "torch._int_mm"
    run = model
    if flex and not compiled:
        model.set_attn_implementation("flex_attention")
    if compiled:
        from spikequant.backends import compile_model

        run = compile_model(model, attention="flex_attention" if flex else None)
        out["compile_s"] = {}

    def first_call(key: str, fn) -> None:  # compiled rows: the call that compiles, timed apart
        if compiled:
            t = time.perf_counter()
            fn()
            out["compile_s"][key] = round(time.perf_counter() - t, 1)
    text = load_text("wikitext2", "test", args.data_dir)
    ids = tokenize(tok, text)
    g = torch.Generator().manual_seed(0)
    if not args.skip_speed:
        with torch.inference_mode():
            for batch in args.batches:
                starts = torch.randint(0, ids.numel() - args.prompt_len, (batch,), generator=g)
                x = torch.stack([ids[s:s + args.prompt_len] for s in starts.tolist()])
                first_call(f"prefill_b{batch}", lambda x=x: run(x, use_cache=True, logits_to_keep=1))
                med, samples = timed(lambda x=x: run(x, use_cache=True, logits_to_keep=1), args.repeats)
                out[f"prefill_b{batch}_tps"] = batch * args.prompt_len / med
                out[f"prefill_b{batch}_s"] = [round(s, 4) for s in samples]
                out[f"prefill_b{batch}_best_tps"] = batch * args.prompt_len / min(samples)
        prompt = tok.decode(ids[:args.prompt_len])
        prepared = PreparedModel(model, tok, "int8" if name.startswith("int8") else "float", args.model)
        decode = []
        for _ in range(args.repeats):
            r = generate(prepared, prompt, args.decode_tokens, ignore_eos=True, compile=compiled)
            decode.append(r.decode_tps)
            if compiled:
                out["compile_s"].setdefault("decode_first_generate", round(r.warmup_s, 1))
        out["decode_prompt_tokens"] = r.prompt_tokens
        out["decode_tps"] = statistics.median(decode)
        out["decode_tps_samples"] = [round(d, 2) for d in decode]
    windows = eval_windows(ids, args.seqlen, args.max_windows, text.max_windows)
    first_call("ppl", lambda: evaluate(run, windows[:1], progress=False))
    res = evaluate(run, windows, progress=False)
    out.update(ppl=res.ppl, ppl_windows=res.windows, ppl_tokens=res.tokens, ppl_s=round(res.seconds, 1))
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["load_after"] = load_avg()
    out["threads"] = torch.get_num_threads()
    return out


# -- parent: prepare checkpoints, run the workers, write the table --------------------------------------
def ensure_checkpoints(args: argparse.Namespace, work: Path) -> dict[str, int]:
    """The int8 checkpoint (and a bf16 one, for its size) written from the quantized folder; sizes on disk."""
    from spikequant.backends import load_int8, prepare, save_int8
    from spikequant.export import load_quantized
    from spikequant.models import load_model
    from spikequant.models.loading import resolve_model_path

    sizes = {}
    fp_dir = Path(resolve_model_path(args.model)[0])
    sizes["fp32"] = dir_bytes(fp_dir)
    bf_dir = work / "bf16"
    if not bf_dir.exists():
        lm = load_model(args.model, "bfloat16", "cpu")
        lm.model.save_pretrained(bf_dir)
        del lm
    sizes["bf16"] = dir_bytes(bf_dir)
    sizes["fake-quant"] = dir_bytes(Path(args.quantized))
    if not Path(args.int8_dir).exists():
        loaded, _, recipe, _ = load_quantized(args.quantized, "float32", "cpu")
        prepared = prepare(loaded.model, loaded.tokenizer, "int8", args.quantized, recipe.name)
        save_int8(prepared.model, prepared.tokenizer, args.int8_dir, args.quantized)
        del loaded, prepared
    for kind, how in (("int8-bf16", {"dtype": torch.bfloat16}), ("int8-bf16emb", {"embedding_dtype": torch.bfloat16})):
        if not (Path(args.int8_dir).parent / kind).exists():
            model, tok, _ = load_int8(args.int8_dir, **how)
            save_int8(model, tok, Path(args.int8_dir).parent / kind, args.quantized)
            del model
        sizes[kind] = dir_bytes(Path(args.int8_dir).parent / kind)
    for k in ("int8", "int8-int_mm", "int8-onednn"):
        sizes[k] = dir_bytes(Path(args.int8_dir))
    sizes["int8-bf16-eager"] = sizes["int8-bf16"]
    for k in list(sizes):
        sizes[f"{k}-compiled"] = sizes[f"{k}-compiled-flex"] = sizes[f"{k}-flex"] = sizes[k]
    return sizes


def markdown(results: list[dict], meta: dict) -> str:
    fp = next((r for r in results if r["backend"] == "fp32"), None)
    floats = [r for r in results if r["backend"].removesuffix("-flex").removesuffix("-compiled") in ("fp32", "bf16")
              and "prefill_b1_tps" in r]
    mib = 1 << 20
    head = ("| backend | what runs | prefill b1 tok/s | prefill b8 tok/s | decode tok/s | weights in memory MiB | "
            "checkpoint on disk MiB | peak RSS MiB | PPL |")
    lines = [head, "| " + " | ".join(["---"] * 9) + " |"]

    def f(v, d=1):
        return "–" if v is None else f"{v:.{d}f}"

    for r in results:
        what = ROWS[r["backend"]].format(prefill=r.get("prefill_kernel", "oneDNN qlinear"))
        lines.append(f"| {r['backend']} | {what} | {f(r.get('prefill_b1_tps'))} | "
                     f"{f(r.get('prefill_b8_tps'))} | {f(r.get('decode_tps'))} | {r['weight_bytes'] / mib:.1f} | "
                     f"{meta['disk'][r['backend']] / mib:.1f} | {r['peak_rss_bytes'] / mib:.0f} | {r['ppl']:.3f} |")
    out = ["\n".join(lines), ""]
    if fp and floats:
        best = {k: max(floats, key=lambda r: r[k]) for k in ("prefill_b1_tps", "prefill_b8_tps", "decode_tps")}
        fakes = {r["backend"]: r for r in results if r["backend"].startswith("fake-quant")}
        for r in results:
            if not r["backend"].startswith("int8") or "prefill_b1_tps" not in r:
                continue
            parts = []
            for k, label in (("prefill_b1_tps", "prefill b1"), ("prefill_b8_tps", "prefill b8"),
                             ("decode_tps", "decode")):
                parts.append(f"{label} {r[k] / best[k][k]:.2f}x the faster float ({best[k]['backend']}), "
                             f"{r[k] / fp[k]:.2f}x fp32")
            parts.append(f"weights in memory {r['weight_bytes'] / fp['weight_bytes']:.3f} of fp32, on disk "
                         f"{meta['disk'][r['backend']] / meta['disk']['fp32']:.3f} of fp32")
            same = "fake-quant-flex" if r["backend"].endswith("-flex") else "fake-quant"
            for k in sorted(fakes, key=lambda k: k != same):  # the same attention first
                parts.append(f"PPL {100 * (r['ppl'] / fakes[k]['ppl'] - 1):+.2f} % vs {k}")
            out.append(f"- **{r['backend']}**: " + "; ".join(parts))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="spike-w8a8-tensor-static")
    ap.add_argument("--quantized", default=None, help="folder written by spikequant quantize with --recipe")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work-dir", default=None, help="where the int8 / bf16 checkpoints go (default: a temp dir)")
    ap.add_argument("--backends", nargs="+", default=["fp32", "bf16", "fake-quant", "int8", "int8-bf16"],
                    choices=list(ROWS))
    ap.add_argument("--prompt-len", type=positive_int, default=512)
    ap.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8])
    ap.add_argument("--decode-tokens", type=positive_int, default=32)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--seqlen", type=positive_int, default=512)
    ap.add_argument("--max-windows", type=positive_int, default=8)
    ap.add_argument("--speed-skip", nargs="*", default=["fake-quant", "fake-quant-flex"],
                    help="backends measured for PPL only (default: %(default)s)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--int8-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-speed", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from spikequant.reports import cpu_info, environment

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="spikequant-inference-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quantized is None:
        args.quantized = str(work / "quantized")
        if not Path(args.quantized).exists():
            cmd = [sys.executable, "-m", "spikequant.cli", "quantize", "--model", args.model, "--recipe",
                   args.recipe, "--output", args.quantized, "--no-progress"]
            subprocess.run(cmd + (["--data-dir", args.data_dir] if args.data_dir else []), check=True)
    args.int8_dir = str(work / "int8")
    disk = ensure_checkpoints(args, work)
    results = []
    for name in args.backends:
        cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--quantized", args.quantized,
               "--int8-dir", args.int8_dir, "--prompt-len", str(args.prompt_len), "--decode-tokens",
               str(args.decode_tokens), "--repeats", str(args.repeats), "--seqlen", str(args.seqlen),
               "--max-windows", str(args.max_windows), "--batches", *map(str, args.batches)]
        cmd += ["--data-dir", args.data_dir] if args.data_dir else []
        cmd += ["--skip-speed"] if name in args.speed_skip else []
        print(f"[{time.strftime('%H:%M:%S')}] {name} (load {load_avg()})", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"worker {name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import torch as _torch

    try:
        from importlib.metadata import version

        ao = version("torchao")
    except Exception:
        ao = "not installed (not used)"
    meta = {"disk": disk, "cpu": cpu_info(), "torch": _torch.__version__, "torchao": ao,
            "environment": environment(), "args": {k: v for k, v in vars(args).items() if k != "worker"},
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    table = markdown(results, meta)
    c = meta["cpu"]
    header = (f"CPU: {c['model']} ({', '.join(c['features'])}), torch {meta['torch']} (capability "
              f"{c['torch_capability']}), torchao {ao}, {c['threads']} threads; load average per backend in "
              f"the JSON; PPL on {results[-1]['ppl_windows']} x {args.seqlen} WikiText-2 test tokens")
    print(header + "\n\n" + table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
