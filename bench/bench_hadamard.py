"""Fast Hadamard transform vs dense matmul on 2048 x n float32 rows (CPU); the ratio comes from one run.

The dense baseline is ``x @ Hᵀ`` with the normalized H precomputed in float32; the fast transform is
:class:`spikequant.hadamard.HadamardTransform`. Dense and fast calls alternate, so both see the same machine
load, and each reports the median of ``--repeats`` timed calls after one warm-up. A float64 column checks on a
few rows that the two agree (the goal is 1e-10). Writes the table into docs/benchmarks.md between the
``bench:hadamard`` markers.

    python bench/bench_hadamard.py [--sizes 576 1536 4096 11008 14336 18944] [--repeats 5] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spikequant.hadamard import HadamardTransform, hadamard_matrix

MARK = "bench:hadamard"
GOAL = "fast transform >= 20x faster than the dense matmul at n = 11008 and n = 18944"


def _once(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def agreement(t: HadamardTransform) -> float:
    """Max |fast - dense| in float64 on 4 random rows (the dense matrix lives only inside this call)."""
    x64 = torch.randn(4, t.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return float((t(x64) - x64 @ hadamard_matrix(t.n, torch.float64, normalized=True).T).abs().max())


def timings(t: HadamardTransform, rows: int, repeats: int,
            threads: list[int]) -> dict[int, tuple[float, float]]:
    """Per thread count: median dense and fast times (s), calls interleaved after one warm-up each."""
    h = hadamard_matrix(t.n, torch.float32, normalized=True).T.contiguous()  # x @ Hᵀ/√n: the same map
    x = torch.randn(rows, t.n, generator=torch.Generator().manual_seed(t.n))
    before = torch.get_num_threads()
    out = {}
    try:
        for k in threads:
            torch.set_num_threads(k)
            _once(lambda: x @ h), _once(lambda: t(x))  # warm-up: page in, build caches
            td, tf = [], []
            for _ in range(repeats):
                td.append(_once(lambda: x @ h))
                tf.append(_once(lambda: t(x)))
            out[k] = statistics.median(td), statistics.median(tf)
    finally:
        torch.set_num_threads(before)
    return out


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


HEADER = "# Benchmarks\n\nEach section names the command that produced it.\n"


def write_section(path: Path, block: str) -> None:
    """Replace this benchmark's marked section of the markdown file, or append it (creating the file)."""
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(f"<!-- {MARK} -->.*?<!-- /{MARK} -->", re.S)
    found = pattern.search(text)
    path.write_text(pattern.sub(lambda _: block, text) if found else text.rstrip() + "\n\n" + block + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096, 11008, 14336, 18944])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch thread counts to measure (default: torch's, %(default)s)")
    ap.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update")
    ap.add_argument("--no-write", action="store_true", help="only print the table")
    ap.add_argument("--chunk-bytes", type=int, default=None,
                    help="HadamardTransform(chunk_bytes=...): rows in chunks of this size at every thread count "
                         "(default: the transform's own choice, chunks only single-threaded)")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = [
        "| n | plan (dense factor x 2^k, rule) | threads | CPU schedule (blocks) | dense matmul ms "
        "| fast transform ms | dense / fast | max abs diff, float64 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in args.sizes:
        t = HadamardTransform(n, chunk_bytes=args.chunk_bytes)
        diff = agreement(t)
        for k, (dense, fast) in timings(t, args.rows, args.repeats, args.threads).items():
            chunked = k == 1 if t.chunk_bytes is None else t.chunk_bytes > 0  # as __call__ decides
            rows.append(f"| {n} | {t.plan.name} | {k} | {' x '.join(map(str, t.schedule(chunked)))} "
                        f"| {1e3 * dense:.1f} | {1e3 * fast:.2f} | **{dense / fast:.1f}x** | {diff:.1e} |")
            print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    table = "\n".join(rows)
    print(table)
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; 1-minute load average "
          f"{load_before:.1f} before, {load_after:.1f} after")
    if args.no_write:
        return 0
    cmd = " ".join(["python bench/bench_hadamard.py", *(sys.argv[1:] if argv is None else argv)])
    block = (
        f"<!-- {MARK} -->\n## Hadamard transform\n\n"
        f"Goal: {GOAL}, and equal to the dense product to 1e-10 in float64.\n\n"
        f"Command: `{cmd}`  \n"
        f"Measured {dt.date.today()}: {args.rows} x n float32 rows; dense `x @ Hᵀ` (normalized H "
        f"precomputed) against `HadamardTransform(n)(x)`, calls interleaved, median of {args.repeats} after "
        f"a warm-up, per torch thread count; torch {torch.__version__}, {cpu_name()}, {os.cpu_count()} cores. The "
        f"machine is shared: 1-minute load average {load_before:.1f} before, {load_after:.1f} after. The "
        f"float64 column compares the fast transform with the dense product on 4 random rows.\n\n{table}\n"
        f"<!-- /{MARK} -->"
    )
    write_section(Path(args.doc), block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
