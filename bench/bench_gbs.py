"""GBS benchmark tables from ``spikequant search`` output folders (docs/gbs.md).

Each folder holds the ``report.json`` a search wrote. Two tables come out:

- quality: per run, the recipe, the search setting, calibration PPL at clip 1.0 and after the search, and
  (when the search ran with ``--eval-windows``) test PPL, KL and top-1 at clip 1.0 and after;
- exact vs fast: for ``--pair EXACT FAST`` (two runs on the same calibration windows and setting), the
  wall-time ratio, the decoder-layer-forward ratio and the calibration-PPL difference.

Usage::

    python bench/bench_gbs.py --runs RUN_DIR ... [--pair EXACT_DIR FAST_DIR ...] [--markdown out.md]
        [--img-dir docs/img]     # copy each run's heatmap.png there as gbs-<run>.png
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any


def load(run: str | Path) -> dict[str, Any]:
    path = Path(run) / "report.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: not a finished `spikequant search` folder")
    return json.loads(path.read_text(encoding="utf-8"))


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


# Share of a SmolLM2-135M layer's multiply-adds per token in its attention block (q, o: 576x576; k, v:
# 576x192; scores and values at 128-512 tokens add 3-10 %) against its MLP (3 x 576x1536): ~0.25 / 0.75.
ATTENTION_SHARE = 0.25


def block_equivalents(res: dict[str, Any], attention_share: float = ATTENTION_SHARE) -> float:
    """Work in whole-layer forwards per window: attention-only and MLP-only runs weighted by their share of
    a layer's multiply-adds."""
    w = {"attention": attention_share, "mlp": 1 - attention_share}
    sub = res.get("sublayer_forwards", {})
    return res["layer_forwards"] + sum(w[k] * sub.get(k, 0) for k in w)


def quality_table(runs: list[str]) -> str:
    rows = ["| run | recipe | mode (objective) | calib tokens | layers | T | probes | layer fwd (eq.) | search s | "
            "calib PPL clip 1.0 → GBS | test PPL clip 1.0 → GBS | test KL | test top-1 |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for run in runs:
        r = load(run)
        res, cfg, cal = r["result"], r["result"]["config"], r["calibration"]
        test = r.get("test") or {}
        c1, g = test.get("clip1") or {}, test.get("gbs") or {}
        rows.append(
            f"| {Path(run).name} | {r['recipe']['name']} | {cfg['mode']} ({objective_label(cfg)}) | "
            f"{cal['windows']}×{cal['seqlen']} | {cfg['layers'] or 'all'} | {cfg['iterations']} | {res['probes']} | "
            f"{_f(block_equivalents(res), 0)} | {_f(res['search_seconds'], 0)} | "
            f"{_f(res['extra'].get('calib_ppl_clip1'))} → {_f(res['calib_ppl'])} | "
            f"{_f(c1.get('ppl'))} → {_f(g.get('ppl'))} | {_f(c1.get('kl'), 3)} → {_f(g.get('kl'), 3)} | "
            f"{_f(c1.get('top1'), 3)} → {_f(g.get('top1'), 3)} |")
    return "\n".join(rows)


def objective_label(cfg: dict[str, Any]) -> str:
    """The fast run's objective as run: racing and precision where set (ours)."""
    out = cfg["objective"]
    if cfg.get("race"):
        out += (f", race z = {cfg['race']:g} (min {cfg.get('race_min', 2)}, max {cfg.get('race_max') or 'all'} "
                "batches)")
    if cfg.get("precision", "float32") != "float32":
        out += f", {cfg['precision']}"
    return out


def pair_table(pairs: list[tuple[str, str]]) -> str:
    rows = ["| exact run | fast run | fast objective | wall-time ratio | layer-forward ratio (eq.) | "
            "calib PPL exact | calib PPL fast | difference | same ratios |",
            "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for e_dir, f_dir in pairs:
        e, f = load(e_dir)["result"], load(f_dir)["result"]
        for key in ("windows", "seqlen"):
            if e[key] != f[key]:
                raise SystemExit(f"{e_dir} and {f_dir} differ in calibration {key}: not a pair")
        diff = (f["calib_ppl"] - e["calib_ppl"]) / e["calib_ppl"]
        rows.append(
            f"| {Path(e_dir).name} | {Path(f_dir).name} | {objective_label(f['config'])} | "
            f"{e['search_seconds'] / f['search_seconds']:.1f} | "
            f"{block_equivalents(e) / block_equivalents(f):.1f} | {e['calib_ppl']:.3f} | {f['calib_ppl']:.3f} | "
            f"{100 * diff:+.2f} % | {'yes' if e['ratios'] == f['ratios'] else 'no'} |")
    return "\n".join(rows)


def ratio_summary(runs: list[str]) -> str:
    """Mean searched ratio per slot, per run: which inputs are clipped hardest."""
    from spikequant.algorithms.gbs import SLOTS

    rows = ["| run | " + " | ".join(SLOTS) + " |", "|---|" + "---:|" * len(SLOTS)]
    for run in runs:
        ratios = load(run)["result"]["ratios"]
        cells = []
        for k in SLOTS:
            vals = [e[k] for e in ratios.values() if k in e]
            cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "–")
        rows.append(f"| {Path(run).name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], help="search output folders for the quality table")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("EXACT", "FAST"))
    p.add_argument("--markdown", default=None, help="write the tables here too")
    p.add_argument("--img-dir", default=None, help="copy each run's heatmap.png here as gbs-<run>.png")
    args = p.parse_args()
    parts = []
    if args.runs:
        parts += ["## Runs", quality_table(args.runs), "", "## Mean ratio per slot", ratio_summary(args.runs)]
    if args.pair:
        parts += ["", "## Exact vs fast", pair_table([tuple(x) for x in args.pair])]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.img_dir:
        for run in args.runs:
            src = Path(run) / "heatmap.png"
            if src.is_file():
                Path(args.img_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, Path(args.img_dir) / f"gbs-{Path(run).name}.png")


if __name__ == "__main__":
    main()
