"""One product per kernel at SmolLM2-135M's linear shapes: float32 and bfloat16 ``F.linear`` against
``torch._int_mm`` (and, with ``--qlinear``, oneDNN's ``qlinear_pointwise``, which can be very slow on some
CPUs with an int8 input: see backends.int8.onednn_input; ``--qlinear-u8`` times it on the uint8 input with
zero point 128 that the backend gives it there). Microseconds per product, weights prepared once; shapes and timer
(median of ``--repeats`` batches of calls) from bench_int8_kernels.py, which times whole int8 linears
(quantize + product + rescale) instead.

    PYTHONPATH=src python bench/gemm_int8_vs_float.py --tokens 512 4096 1 --threads 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_int8_kernels import SHAPES, timeit
from spikequant.backends.int8 import onednn_operand


def us(fn, args: tuple, repeats: int) -> float:
    return 1e6 * timeit(lambda: fn(*args), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 1])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--qlinear", action="store_true", help="oneDNN qlinear, int8 (s8) input, one timed call")
    ap.add_argument("--qlinear-u8", action="store_true", help="oneDNN qlinear, uint8 input (zero point 128)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cols = ["fp32", "bf16", "int8 _int_mm"] + (["int8 oneDNN qlinear"] if args.qlinear else []) \
        + (["int8 oneDNN qlinear, u8 input"] if args.qlinear_u8 else [])
    print(f"{args.threads} threads, torch {torch.__version__}, microseconds per product (median of {args.repeats})")
    print("| linear (N x K) | tokens | " + " | ".join(cols) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in cols) + " |")
    for m in args.tokens:
        for name, (n, k) in SHAPES.items():
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
            xb, wb = x.bfloat16(), w.bfloat16()
            qx = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
            qw = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
            qw_t = qw.t().contiguous()
            row = [us(F.linear, (x, w), args.repeats), us(F.linear, (xb, wb), args.repeats),
                   us(torch._int_mm, (qx, qw_t), args.repeats)]
            packed = torch.ops.onednn.qlinear_prepack(qw, None) if args.qlinear or args.qlinear_u8 else None
            ws, wz = torch.ones(n), torch.zeros(n, dtype=torch.int64)
            for on, kind, repeats in ((args.qlinear, "s8", 1), (args.qlinear_u8, "u8", args.repeats)):
                if on:
                    x8, zero = onednn_operand(qx, kind)
                    row.append(us(torch.ops.onednn.qlinear_pointwise, (x8, 1.0, zero, packed, ws, wz, None, 1.0, 0,
                                                                       torch.float32, "none", [], ""), repeats))
            print(f"| {name} {n}x{k} | {m} | " + " | ".join(f"{v:.0f}" for v in row) + " |")


if __name__ == "__main__":
    main()
