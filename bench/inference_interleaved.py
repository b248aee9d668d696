"""Prefill speed of fp32, bf16 and int8 backends interleaved in one process, and where the time goes.

`bench_inference.py` runs each backend in its own process, one after the other: on a shared, noisy
machine a slow minute lands on one backend only. Here every repeat times each backend once, in turn, so
they share the same conditions; with ``--profile``, one batch's forward per backend under
``torch.profiler`` shows which operators take the CPU time (the int8 linears against the float GEMMs,
and what is neither).

    spikequant generate --model /tmp/q8 --backend int8 --int8-dtype bfloat16 --prompt Hi --save-int8 /tmp/q8-int8-bf16
    python bench/inference_interleaved.py --int8-dir /tmp/q8-int8-bf16 --batches 8 1 --threads 2 1 --profile 8
    python bench/inference_interleaved.py --int8-dir /tmp/q8-int8-bf16 --batches 8 1 --compiled
    python bench/inference_interleaved.py --int8-dir /tmp/q8-int8 --int8-dtype float32 --int8-embeddings bfloat16 \
        --batches 8 1 --compiled --flex
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--int8-dir", required=True, help="an int8 checkpoint (spikequant generate --save-int8)")
    ap.add_argument("--int8-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="activations and float modules of the int8 model (default: %(default)s)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compiled", action="store_true",
                    help="also each model through spikequant.backends.compile_model (torch.compile with "
                         "freezing; the compiling call is the warm-up, untimed)")
    ap.add_argument("--flex", action="store_true",
                    help="with --compiled: also each model compiled with flex_attention (compile_model(..., "
                         "attention='flex_attention'))")
    ap.add_argument("--int8-embeddings", choices=["float32", "bfloat16"], default=None,
                    help="the int8 model's embedding table and lm_head (default: as saved)")
    ap.add_argument("--profile", type=int, default=None, metavar="BATCH",
                    help="also profile one forward per backend at this batch size (first --threads value)")
    args = ap.parse_args()

    from spikequant.backends import compile_model, load_int8
    from spikequant.models import load_model
    from spikequant.reports import cpu_info

    torch.set_flush_denormal(True)
    int8_dtype = getattr(torch, args.int8_dtype)
    int8 = load_int8(args.int8_dir, "auto", int8_dtype, embedding_dtype=(
        getattr(torch, args.int8_embeddings) if args.int8_embeddings else None))[0]
    table = str(int8.get_input_embeddings().weight.dtype).removeprefix("torch.")
    models = {"fp32": load_model(args.model, "float32", "cpu").model,
              "bf16": load_model(args.model, "bfloat16", "cpu").model,
              f"int8 ({args.int8_dtype}" + (f", {table} table)" if table != args.int8_dtype else ")"): int8}
    if args.compiled:
        plain = list(models.items())
        models.update({f"{k}, compiled": compile_model(m) for k, m in plain})
        if args.flex:
            models.update({f"{k}, compiled, flex": compile_model(m, attention="flex_attention") for k, m in plain})
    print(f"CPU: {cpu_info()}; torch {torch.__version__}", flush=True)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                x = torch.randint(0, 49000, (batch, args.prompt_len), generator=g)
                times: dict[str, list[float]] = {k: [] for k in models}
                for k, m in models.items():  # warm-up: kernel selection, packing, compilation
                    t = time.perf_counter()
                    m(x, use_cache=True, logits_to_keep=1)
                    print(f"  warm-up {k}: {time.perf_counter() - t:.1f} s", flush=True)
                for _ in range(args.repeats):
                    for k, m in models.items():
                        t = time.perf_counter()
                        m(x, use_cache=True, logits_to_keep=1)
                        times[k].append(time.perf_counter() - t)
                tps = {k: batch * args.prompt_len / statistics.median(v) for k, v in times.items()}
                best = {k: batch * args.prompt_len / min(v) for k, v in times.items()}
                print(f"threads {threads}, batch {batch}, prefill tokens/s median (best of {args.repeats}): "
                      + ", ".join(f"{k} {tps[k]:.0f} ({best[k]:.0f})" for k in models), flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            torch.set_num_threads(args.threads[0])
            x = torch.randint(0, 49000, (args.profile, args.prompt_len), generator=g)
            for k, m in models.items():
                if k == "fp32":
                    continue
                m(x, use_cache=True, logits_to_keep=1)
                with profile(activities=[ProfilerActivity.CPU]) as p:
                    m(x, use_cache=True, logits_to_keep=1)
                print(f"\n{k}, batch {args.profile}, {args.threads[0]} threads: operators by self CPU time")
                print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
