"""Theory check: how far a rotation flattens an isolated activation spike.

x has one entry c = 200 at a random position and N(0, 0.1²) entries elsewhere. A normalized Hadamard matrix
spreads the spike evenly, max|Hx| ≈ c/√n (every entry of H/√n is ±1/√n); a Haar-random orthogonal Q sends
it to a uniformly random direction, whose largest entry is about √(2 ln n / n), so max|Qx| ≈ c·√(2 ln n / n).
Both are measured for powers of two and for Paley-based sizes (96, 576, 1536), averaged over seeds, and
written as a markdown table (stdout) and a log-log plot.

    python bench/hadamard_theory.py [--seeds 5] [--out docs/img/hadamard_theory.png]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from spikequant.hadamard import (  # noqa: E402
    RandomizedHadamard,
    hadamard_transform,
    plan,
    random_orthogonal_matrix,
)

SIZES = [64, 96, 128, 256, 512, 576, 1024, 1536, 2048, 4096]
C = 200.0
NOISE = 0.1


def spike(n: int, seed: int) -> torch.Tensor:
    """One entry C at a seeded random position, N(0, NOISE²) elsewhere (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * NOISE
    x[int(torch.randint(0, n, (1,), generator=g))] = C
    return x


def measure(n: int, seeds: int) -> dict[str, float]:
    """Mean over seeds of max|·| after each rotation, and the two predictions."""
    h = rh = q = 0.0
    for s in range(seeds):
        x = spike(n, s)
        h += float(hadamard_transform(x).abs().max())
        rh += float(RandomizedHadamard(n, seed=1000 + s)(x).abs().max())
        q += float((random_orthogonal_matrix(n, seed=2000 + s) @ x).abs().max())
    return {"hadamard": h / seeds, "randomized": rh / seeds, "haar": q / seeds,
            "c/sqrt(n)": C / math.sqrt(n), "c*sqrt(2ln(n)/n)": C * math.sqrt(2 * math.log(n) / n)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default="docs/img/hadamard_theory.png")
    args = ap.parse_args(argv)
    res = {n: measure(n, args.seeds) for n in SIZES}
    lines = [
        "| n | construction | max abs Hx | c/√n | ratio | max abs (randomized H)x | max abs Qx (Haar) "
        "| c·√(2 ln n / n) | ratio | Haar / Hadamard |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, r in res.items():
        h_pred, q_pred = r["c/sqrt(n)"], r["c*sqrt(2ln(n)/n)"]
        lines.append(
            f"| {n} | {plan(n).name} | {r['hadamard']:.2f} | {h_pred:.2f} | {r['hadamard'] / h_pred:.2f} "
            f"| {r['randomized']:.2f} | {r['haar']:.2f} | {q_pred:.2f} | {r['haar'] / q_pred:.2f} "
            f"| {r['haar'] / r['hadamard']:.1f}x |"
        )
    print("\n".join(lines))

    ns = list(res)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ns, [res[n]["hadamard"] for n in ns], "o-", label="Hadamard: max|Hx|")
    ax.plot(ns, [res[n]["randomized"] for n in ns], "s", mfc="none", label="randomized Hadamard")
    ax.plot(ns, [res[n]["haar"] for n in ns], "^-", label="Haar random: max|Qx|")
    ax.plot(ns, [res[n]["c/sqrt(n)"] for n in ns], "k--", label="c/√n")
    ax.plot(ns, [res[n]["c*sqrt(2ln(n)/n)"] for n in ns], "k:", label="c·√(2 ln n / n)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (96, 576, 1536: Paley-based)")
    ax.set_ylabel("max |rotated x|")
    ax.set_title(f"One spike c = {C:g} in N(0, {NOISE:g}²) noise, mean of {args.seeds} seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
