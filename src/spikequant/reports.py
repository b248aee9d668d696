"""Reports: every result carries the recipe, seed, data fingerprint, versions and timings behind it."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("spikequant", "torch", "transformers", "safetensors", "gguf", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def environment() -> dict[str, Any]:
    import torch

    return {
        "versions": versions(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": " ".join(["spikequant", *sys.argv[1:]]) if sys.argv else "",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"
    return str(v)


def metric_columns(reports: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The metric columns of ``reports``, in the order their evaluators report them (union)."""
    seen: dict[str, str] = {}
    for r in reports:
        for key, header in r.get("metric_columns") or [["ppl", "PPL"], ["kl", "KL"], ["top1", "top-1"]]:
            seen.setdefault(key, header)
    return list(seen.items())


def table_columns(reports: list[dict[str, Any]], compare: bool = False) -> list[tuple[str, str]]:
    """Columns of a results table: recipe, every metric, then the quantization and timing columns."""
    metrics = metric_columns(reports)
    if not compare:
        return [("recipe", "recipe"), *metrics, ("hp_share", "high-prec. params"), ("weight_bits", "bits/weight"),
                ("seconds", "eval s")]
    ppl = [c for c in metrics if c[0] == "ppl"]
    rest = [c for c in metrics if c[0] != "ppl"]
    return [("recipe", "recipe"), *ppl, ("ppl_vs_fp", "PPL / FP"), *rest, ("hp_pct", "high-prec. params %"),
            ("weight_bits", "bits/weight"), ("wall_s", "wall s")]


def result_row(report: dict[str, Any], fp_ppl: float | None = None) -> dict[str, Any]:
    """The one place that turns a report into a table row: its metrics (whatever evaluators produced
    them), PPL relative to FP, the high-precision share and bit width, timings and kept layers."""
    q = report.get("quantization") or {}
    f = q.get("findings") or {}
    t = report.get("timings", {})
    metrics = report.get("metrics") or {k: report.get(k) for k in ("ppl", "kl", "top1")}
    hp = q.get("high_precision_share")
    return {
        "recipe": report["recipe"]["name"],
        **metrics,
        "ppl_vs_fp": None if fp_ppl is None or metrics.get("ppl") is None else metrics["ppl"] / fp_ppl,
        "hp_share": hp if hp is not None else (0.0 if report["recipe"]["name"] == "fp" else None),
        "float_linear_share": q.get("float_linear_share"),
        # an int 0 prints as "0", where 0.0 would print as "0.0000" in the markdown table
        "hp_pct": None if hp is None else (round(100 * hp, 2) or 0),
        "weight_bits": q.get("effective_weight_bits"),
        "seconds": t.get("eval_s"),
        "wall_s": round(t.get("wall_s", t.get("quantize_s", 0.0) + t.get("eval_s", 0.0)), 1),
        "kept_layers": f.get("spike_layers") or f.get("random_layers") or q.get("float_linears") or [],
    }


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def provenance_markdown(report: dict[str, Any]) -> str:
    d = report["data"]
    env = report["environment"]
    lines = [
        f"- model: `{report['model']['source']}` ({report['model']['class']}, {report['model']['dtype']}, "
        f"{report['model']['device']})",
        f"- data: {d['name']} from `{d['source']}`, sha256 `{d['sha256']}`, {d['windows']} windows x "
        f"{d['seqlen']} tokens",
        f"- seed: {report['seed']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- command: `{env['command']}`",
        f"- created: {env['created']}",
    ]
    return "\n".join(lines)


def report_markdown(reports: list[dict[str, Any]], title: str = "spikequant results") -> str:
    """One markdown document: the metrics table, then the provenance and the recipes."""
    parts = [f"# {title}", "", markdown_table([result_row(r) for r in reports], table_columns(reports)), "",
             "## Provenance", "",
             provenance_markdown(reports[0]), ""]
    for r in reports:
        findings = (r.get("quantization") or {}).get("findings")
        parts += [f"### Recipe `{r['recipe']['name']}`", "", "```json", json.dumps(r["recipe"], indent=2), "```", ""]
        if findings:
            parts += ["Findings:", "", "```json", json.dumps(findings, indent=2), "```", ""]
    return "\n".join(parts)


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
