"""Theory check (METHODS §B.4): how far a rotation shrinks an isolated spike.

x has one value c = 200 and N(0, 0.1²) elsewhere. A normalized Hadamard H gives max|Hx| ≈ c/√n; a Haar-random
orthogonal Q gives max|Qx| ≈ c·√(2 ln n / n). Averaged over seeds; writes a PNG and prints a markdown table.

    python bench/hadamard_theory.py [--out docs/img/hadamard_theory.png]
"""

from __future__ import annotations

import argparse
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from spikequant.hadamard import RandomizedHadamard, hadamard_transform, random_orthogonal_matrix  # noqa: E402

SIZES = [64, 128, 256, 512, 576, 1024, 1536, 2048, 4096]
C = 200.0


def spike(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    x[int(torch.randint(0, n, (1,), generator=g))] = C
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default="docs/img/hadamard_theory.png")
    args = ap.parse_args()
    rows = ["| n | max abs Hx | c/√n | max abs (randomized H)x | max abs Qx (Haar) | c·√(2 ln n / n) |",
            "| --- | --- | --- | --- | --- | --- |"]
    res: dict[str, list[float]] = {"h": [], "rh": [], "q": []}
    for n in SIZES:
        h = rh = q = 0.0
        for s in range(args.seeds):
            x = spike(n, s)
            h += float(hadamard_transform(x).abs().max())
            rh += float(RandomizedHadamard(n, seed=100 + s).apply(x).abs().max())
            q += float((random_orthogonal_matrix(n, seed=200 + s) @ x).abs().max())
        h, rh, q = h / args.seeds, rh / args.seeds, q / args.seeds
        res["h"].append(h)
        res["rh"].append(rh)
        res["q"].append(q)
        rows.append(f"| {n} | {h:.2f} | {C / math.sqrt(n):.2f} | {rh:.2f} | {q:.2f} | "
                    f"{C * math.sqrt(2 * math.log(n) / n):.2f} |")
    print("\n".join(rows))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ns = torch.tensor(SIZES, dtype=torch.float64)
    ax.plot(SIZES, res["h"], "o-", label="Hadamard: max|Hx|")
    ax.plot(SIZES, res["rh"], "s-", label="randomized Hadamard")
    ax.plot(SIZES, res["q"], "^-", label="Haar random: max|Qx|")
    ax.plot(SIZES, (C / ns.sqrt()).tolist(), "k--", label="c/√n (optimal)")
    ax.plot(SIZES, (C * (2 * ns.log() / ns).sqrt()).tolist(), "k:", label="c·√(2 ln n / n)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("max |rotated x|")
    ax.set_title(f"One spike c={C:g} in N(0, 0.1²) noise, mean of {args.seeds} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
