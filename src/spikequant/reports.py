"""Reports: every result carries the recipe, seed, data fingerprint, versions and timings behind it."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from spikequant.eval import zeroshot

PACKAGES = ("spikequant", "torch", "transformers", "tokenizers", "accelerate", "safetensors", "gguf", "numpy",
            "lm_eval", "compressed-tensors")

# The command line that started this process, set by the ``spikequant`` CLI (and the bench scripts) when
# they are the entry point; a report made through the Python API says so instead of guessing from sys.argv.
ENTRY_COMMAND: str | None = None

# CPU features that decide which int8 / bf16 / fp16 kernels oneDNN, MKL and ATen pick (x86 and Arm names).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
                "amx_bf16", "asimddp", "i8mm", "bf16", "sve", "sve2")
# Environment variables that change kernel selection or threading, hence float32 summation order.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
              "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def set_entry_command(command: str | None) -> None:
    """Record the command line of this process in every later report (called by the CLI entry points)."""
    global ENTRY_COMMAND
    ENTRY_COMMAND = command


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str]]:
    """The CPU model name and flags from /proc/cpuinfo (Linux); (None, empty) elsewhere."""
    model, flags = None, set()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "cpu model", "hardware"):
            model = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = set(value.split())
    return model, flags


def cpu_info() -> dict[str, Any]:
    """What quantized numbers depend on: the CPU model, its int8/bf16 features and the kernels torch picks
    (torch's CPU capability, threads, and the kernel-selection variables that are set)."""
    import torch

    model, flags = _cpuinfo()
    return {
        "model": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "features": [f for f in CPU_FEATURES if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
    }


def environment() -> dict[str, Any]:
    import torch

    return {
        "versions": versions(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": ENTRY_COMMAND or "python API",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_line(env: dict[str, Any]) -> str:
    """One line for a report: CPU model, features, torch capability, threads, kernel variables."""
    c = env.get("cpu")
    if not c:
        return f"unknown (report written before CPU details were recorded), {env.get('torch_threads')} torch threads"
    extra = ", ".join(f"{k}={v}" for k, v in c.get("env", {}).items())
    return (f"{c['model']} ({c['machine']}; {', '.join(c['features']) or 'no int8/bf16 features listed'}), "
            f"torch capability {c['torch_capability']}, {c['threads']} torch threads of {c['cores']} cores"
            + (f", {extra}" if extra else ""))


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
        f"- CPU: {cpu_line(env)}",
        *([f"- GPU: {env['cuda']}"] if env.get("cuda") else []),
        f"- command: `{env['command']}`",
        f"- created: {env['created']}",
    ]
    return "\n".join(lines)


def report_markdown(reports: list[dict[str, Any]], title: str = "spikequant results") -> str:
    """One markdown document: the metrics table, then the provenance and the recipes."""
    parts = [f"# {title}", "", markdown_table([result_row(r) for r in reports], table_columns(reports)), ""]
    note = zeroshot.table_note(reports)
    parts += ([note, ""] if note else []) + ["## Provenance", "", provenance_markdown(reports[0]), ""]
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
