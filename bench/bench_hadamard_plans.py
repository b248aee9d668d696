"""Time the planner's choice against the other constructions of the same order (CPU, float32 rows).

For each n the chosen plan and up to ``--alternatives`` others (``alternatives(n)``, cheapest modelled cost
first) are run through :class:`spikequant.hadamard.HadamardTransform` with ``plan_=``; calls are interleaved
so that all see the same machine load, median of ``--repeats`` after a warm-up. Prints a markdown table of
modelled cost per element against measured milliseconds, and the measured ratio to the chosen plan.

    python bench/bench_hadamard_plans.py [--sizes 576 8960 11008 13824] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from spikequant.hadamard import HadamardTransform, alternatives, plan, previous_plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[576, 8960, 11008, 13824])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alternatives", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rows} x n float32 rows, median of "
          f"{args.repeats}; 1-minute load average {load:.1f} at start\n")
    print("| n | plan | chosen | previous rule | modelled cost/element | ms | ms / chosen ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in args.sizes:
        chosen = plan(n)
        plans = [chosen, *alternatives(n)[:args.alternatives]]
        before = previous_plan(n)
        if before is not None and before not in plans:
            plans.append(before)
        x = torch.randn(args.rows, n, generator=torch.Generator().manual_seed(n))
        ts = [HadamardTransform(n, plan_=p) for p in plans]
        for t in ts:
            t(x)  # warm-up
        times: list[list[float]] = [[] for _ in ts]
        for _ in range(args.repeats):
            for i, t in enumerate(ts):
                start = time.perf_counter()
                t(x)
                times[i].append(time.perf_counter() - start)
        med = [statistics.median(t) for t in times]
        for p, ms in zip(plans, med, strict=True):
            print(f"| {n} | {p.name} | {'yes' if p is chosen else ''} | {'yes' if p == before else ''} "
                  f"| {p.cost:.0f} | {1e3 * ms:.1f} | {ms / med[0]:.2f} |", flush=True)
    print(f"\n1-minute load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
