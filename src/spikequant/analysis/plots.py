"""Figures: max |activation| per layer (the paper's spike plot) and the recipe comparison bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spikequant.models.arch import ROLES
from spikequant.stats import LinearStats

ROLE_ORDER = ROLES


def _pyplot():
    # Imported on first use: importing the package (and every modifier) should not pay for matplotlib.
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _roles(stats: list[LinearStats]) -> list[str]:
    present = {s.role for s in stats}
    return [r for r in ROLE_ORDER if r in present] + sorted(present - set(ROLE_ORDER))


def _series(stats: list[LinearStats], attr: str) -> list[tuple[str, list[int], list[float]]]:
    """One (label, layers, values) line per projection type; types fed by the same tensor (q/k/v read
    the same normed input, as do gate/up) have identical lines and are drawn once, labelled together."""
    lines: list[tuple[str, list[int], list[float]]] = []
    for role in _roles(stats):
        rows = sorted((s for s in stats if s.role == role), key=lambda s: s.layer)
        xs, ys = [s.layer for s in rows], [max(getattr(s, attr), 1e-6) for s in rows]
        for i, (label, lx, ly) in enumerate(lines):
            if lx == xs and ly == ys:
                lines[i] = (f"{label} = {role}", lx, ly)
                break
        else:
            lines.append((role, xs, ys))
    return lines


def plot_spikes(stats: list[LinearStats], detected: list[str], threshold: float, path: str | Path,
                title: str = "", median: float | None = None, outliers: int = 4) -> Path:
    """Max |input| per layer index, one line per projection type, log scale, spike layers circled.

    A second panel repeats it with the ``outliers`` largest tokens of every window left out, which shows
    how much of each spike belongs to a handful of tokens (attention sink, delimiters)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
    spikes = set(detected)
    panels = ((axes[0], "max_in", "all tokens"),
              (axes[1], "max_in_bulk", f"the {outliers} largest tokens of each window left out"))
    for ax, attr, sub in panels:
        for label, xs, ys in _series(stats, attr):
            ax.plot(xs, ys, marker=".", lw=1.2, label=label)
        hit = [s for s in stats if s.name in spikes]
        ax.scatter([s.layer for s in hit], [max(getattr(s, attr), 1e-6) for s in hit], s=140, facecolors="none",
                   edgecolors="red", linewidths=1.5, zorder=5, label="detected spike layer")
        if attr == "max_in":
            last = max(s.layer for s in stats)
            for s in hit:
                right = s.layer > last / 2  # label on the inner side so it stays inside the axes
                ax.annotate(f"{s.layer}.{s.role}", (s.layer, s.max_in), textcoords="offset points",
                            xytext=(-8 if right else 8, -4), ha="right" if right else "left", fontsize=8,
                            color="red")
        ax.axhline(threshold, color="red", ls="--", lw=0.8, label=f"threshold {threshold:.4g}")
        if median is not None:
            ax.axhline(median, color="grey", ls=":", lw=0.8, label=f"median {median:.3g}")
        ax.set_yscale("log")
        ax.set_xlabel("layer index")
        ax.set_title(sub, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("max |input| of the projection")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title or "activation spikes per decoder linear")
    fig.subplots_adjust(left=0.06, right=0.99, top=0.88, bottom=0.2, wspace=0.05)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_compare(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Perplexity per recipe as horizontal bars (log scale), FP and FP + 15 % marked, each bar labelled
    with its high-precision parameter share; bars within 15 % of FP are green."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9.0, 1.2 + 0.32 * len(rows)))
    fp = next((r["ppl"] for r in rows if r["recipe"] == "fp"), None)
    ys = list(range(len(rows)))[::-1]  # first recipe on top
    good = [fp is not None and r["ppl"] <= 1.15 * fp for r in rows]
    ax.barh(ys, [r["ppl"] for r in rows], color=["#3a7" if g else "#999" for g in good], height=0.7)
    if fp is not None:
        ax.axvline(fp, color="black", lw=0.8, ls="--", label=f"fp {fp:.4g}")
        ax.axvline(fp * 1.15, color="red", lw=0.8, ls=":", label="fp + 15 %")
        ax.legend(fontsize=8, loc="lower right")
    for y, r in zip(ys, rows, strict=True):
        hp = r.get("hp_share")
        label = f" {r['ppl']:.4g}" + ("" if not hp else f"  ({100 * hp:.1f}% high precision)")
        ax.annotate(label, (r["ppl"], y), va="center", fontsize=7)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["recipe"] for r in rows], fontsize=8)
    ax.set_xscale("log")
    low = min(r["ppl"] for r in rows)
    ax.set_xlim(low * 0.8, max(r["ppl"] for r in rows) * 4)  # room for the labels
    ax.set_xlabel("perplexity (log scale)")
    ax.set_title(title or "recipes compared", fontsize=10)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    # A fixed margin for the names: tight_layout costs seconds per figure on a busy CPU.
    fig.subplots_adjust(left=0.34, right=0.98, top=1 - 0.5 / fig.get_figheight(), bottom=0.55 / fig.get_figheight())
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
