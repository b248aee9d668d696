"""Perplexity of an int8 checkpoint run compiled (spikequant.backends.compile_model), optionally with
inductor's ``emulate_precision_casts`` (bfloat16 rounding between fused ops, as eager computes them):
how much of the compiled model's PPL difference to the eager one is float rounding inside the graph.

    python bench/int8_compiled_ppl.py /tmp/q8-int8-bf16 --data-dir ../shared/data --windows 16 --emulate
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("int8_dir", help="an int8 checkpoint (spikequant generate --save-int8)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--emulate", action="store_true", help="inductor option emulate_precision_casts")
    args = ap.parse_args()

    from spikequant.backends import CompiledModel, load_int8
    from spikequant.data import eval_windows, load_text, tokenize
    from spikequant.eval.perplexity import evaluate

    torch.set_flush_denormal(True)
    model, tok, _ = load_int8(args.int8_dir, "auto", getattr(torch, args.dtype))
    text = load_text("wikitext2", "test", args.data_dir)
    windows = eval_windows(tokenize(tok, text), args.seqlen, args.windows, text.max_windows)
    compiled = CompiledModel(model, options={"emulate_precision_casts": True} if args.emulate else None)
    t = time.perf_counter()
    res = evaluate(compiled, windows, progress=False)
    print(f"{args.int8_dir} ({args.dtype}, compiled{', emulate_precision_casts' if args.emulate else ''}): "
          f"PPL {res.ppl:.4f} on {res.windows} x {args.seqlen} tokens ({time.perf_counter() - t:.0f} s with compiling)")


if __name__ == "__main__":
    main()
