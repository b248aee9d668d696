"""Where a compiled prefill forward spends its time: load a float or int8 model, compile it
(spikequant.backends.compile_model), run one batch twice (the first compiles), profile a third call and
print the top operators by self CPU time; ``--attention`` also times SDPA alone at the same shape.

    PYTHONPATH=src python bench/profile_prefill.py int8 --int8-dir /work/runs/infbench-epyc/int8
    PYTHONPATH=src python bench/profile_prefill.py bfloat16 --attention
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backend", choices=["float32", "bfloat16", "int8", "int8-bf16"])
    ap.add_argument("--int8-dir", help="an int8 checkpoint (spikequant generate --save-int8) for the int8 rows")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--attention", action="store_true", help="also time SDPA alone (SmolLM2's 9 / 3 heads of 64)")
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from spikequant.backends import compile_model, load_int8
    from spikequant.models import load_model

    torch.set_flush_denormal(True)
    if args.backend.startswith("int8"):
        if not args.int8_dir:
            ap.error("--int8-dir is needed for the int8 rows")
        dtype = torch.bfloat16 if args.backend == "int8-bf16" else torch.float32
        model, _, _ = load_int8(args.int8_dir, "auto", dtype)
    else:
        model = load_model("smollm2-135m", args.backend, "cpu").model
    run = compile_model(model)
    x = torch.randint(0, 40000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        run(x, use_cache=True, logits_to_keep=1)
        t = time.perf_counter()
        run(x, use_cache=True, logits_to_keep=1)
        print(f"{args.backend}: forward {time.perf_counter() - t:.2f} s (batch {args.batch} x {args.tokens}), "
              f"{torch.get_num_threads()} threads")
        with profile(activities=[ProfilerActivity.CPU]) as p:
            run(x, use_cache=True, logits_to_keep=1)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.attention:
        gen = torch.Generator().manual_seed(1)
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(args.batch, 9, args.tokens, 64, generator=gen).to(dtype)
            k, v = (torch.randn(args.batch, 9, args.tokens, 64, generator=gen).to(dtype) for _ in range(2))
            for causal in (True, False):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                best = min(_timed(q, k, v, causal) for _ in range(5))
                print(f"SDPA alone, {dtype}, is_causal={causal}: {1000 * best:.1f} ms per layer")


def _timed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> float:
    t = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
