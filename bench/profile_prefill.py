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
    ap.add_argument("--model", default="smollm2-135m", help="the float model for the float rows")
    ap.add_argument("--int8-dir", help="an int8 checkpoint (spikequant generate --save-int8) for the int8 rows")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--attention", action="store_true", help="also time SDPA alone at the model's head sizes")
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
        model = load_model(args.model, args.backend, "cpu").model
    run = compile_model(model)
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
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
        from bench_int8_kernels import timeit

        gen = torch.Generator().manual_seed(1)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        shape = (args.batch, heads, args.tokens, head_dim)  # k/v already repeated to every query head
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
            for causal in (True, False):
                t = timeit(lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c), 5)
                print(f"SDPA alone, {dtype}, is_causal={causal}: {1000 * t:.1f} ms per layer")


if __name__ == "__main__":
    main()
