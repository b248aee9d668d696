"""Fast Hadamard transform vs dense matmul on 2048 x n float32 inputs (CPU), ratio within one run.

Also checks, in float64 on a few rows, that the fast transform matches the dense product.

    python bench/bench_hadamard.py [--sizes 576 1536 4096 11008 14336 18944] [--repeats 3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from spikequant.hadamard import HadamardTransform, hadamard_matrix

MARK = "bench:hadamard"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096, 11008, 14336, 18944])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", default="docs/benchmarks.md")
    args = ap.parse_args()
    rows = [
        "| n | construction | dense matmul ms | fast transform ms | speed-up | max abs diff float64 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n in args.sizes:
        t = HadamardTransform(n)
        h = (hadamard_matrix(n, torch.float32) / math.sqrt(n)).T.contiguous()  # x @ Hᵀ/√n, the same map
        x = torch.randn(args.rows, n)
        t_dense = _time(lambda h=h, x=x: x @ h, args.repeats)
        t_fast = _time(lambda t=t, x=x: t(x), args.repeats)
        del h
        x64 = torch.randn(4, n, dtype=torch.float64)
        diff = float((t(x64) - x64 @ (hadamard_matrix(n) / math.sqrt(n)).T).abs().max())
        p = t.plan
        name = f"{p.m} x {p.pow2} ({p.construction})" if p.m > 1 else f"{p.pow2} (sylvester)"
        rows.append(f"| {n} | {name} | {1e3 * t_dense:.1f} | {1e3 * t_fast:.2f} | **{t_dense / t_fast:.1f}x** | "
                    f"{diff:.1e} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.write:
        cmd = "python bench/bench_hadamard.py " + " ".join(sys.argv[1:])
        block = (
            f"<!-- {MARK} -->\n## Hadamard transform\n\n"
            f"Goal: fast transform >= 20x faster than the dense matmul at n = 11008 and 18944.\n\n"
            f"Command: `{cmd}`  \nMeasured {dt.date.today()}: {args.rows} x n float32 rows, median of "
            f"{args.repeats}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; the float64 column "
            f"compares the fast transform with the dense product on 4 random rows.\n\n{table}\n<!-- /{MARK} -->"
        )
        path = Path(args.write)
        header = "# Benchmarks\n\nEach section names the command that produced it.\n"
        text = path.read_text() if path.exists() else header
        pattern = re.compile(f"<!-- {MARK} -->.*?<!-- /{MARK} -->", re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
