"""Run several recipes on one model and one text (one FP reference) and write one comparison.

Results are written after every recipe, so an interrupted run loses at most the recipe in flight, and
``resume`` skips recipes whose result is already in the JSON (when the recipe itself is unchanged).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spikequant.analysis.plots import plot_compare
from spikequant.errors import SpikequantError
from spikequant.pipeline import Session
from spikequant.quant import QuantizedModel
from spikequant.recipes import Recipe, load_recipe
from spikequant.reports import (
    environment,
    markdown_table,
    provenance_markdown,
    result_row,
    table_columns,
    write_json,
    write_text,
)

FILES = {"json": "compare.json", "markdown": "compare.md", "plot": "compare.png"}

def float_linear_share(qm: QuantizedModel | None) -> float | None:
    """Share of decoder-linear parameters in linears whose weights *or* inputs are not integer-quantized
    (stricter than ``high_precision_share``, which looks at the weights only)."""
    return None if qm is None else qm.high_precision_share(("weights", "inputs"))


def _settings(session: Session) -> dict[str, Any]:
    return {"model": session.model_source, "dataset": session.dataset, "split": session.split,
            "seqlen": session.seqlen, "max_windows": session.max_windows, "dtype": session.dtype}


def _load_previous(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SpikequantError(f"cannot resume from {path}: {e}") from None
    if not isinstance(prev, dict) or not isinstance(prev.get("results", []), list):
        raise SpikequantError(f"cannot resume from {path}: not a compare.json written by spikequant compare")
    if prev.get("settings") != settings:
        raise SpikequantError(f"cannot resume: {path} was made with other settings {prev.get('settings')}; "
                              "use a new --output or drop --resume")
    return list(prev.get("results", []))


def fp_ppl(reports: list[dict[str, Any]]) -> float | None:
    """The perplexity of the run's ``fp`` recipe, the reference of the PPL / FP column (None without one)."""
    return next((r["ppl"] for r in reports if r["recipe"]["name"] == "fp"), None)


def write_outputs(out: Path, reports: list[dict[str, Any]], settings: dict[str, Any], pending: list[str]) -> None:
    fp = fp_ppl(reports)
    rows = [result_row(r, fp) for r in reports]
    write_json({"settings": settings, "rows": rows, "pending": pending, "results": reports}, out / FILES["json"])
    title = (f"{settings['model']} on {settings['dataset']}:{settings['split']}, "
             f"{reports[0]['data']['windows']} windows x {settings['seqlen']} tokens")
    parts = [f"# spikequant compare: {title}", "", markdown_table(rows, table_columns(reports, compare=True)), "",
             "`high-prec. params %`: share of decoder-linear weights not integer-quantized; `wall s`: quantize + "
             "evaluate (the FP reference pass is shared and not included).", ""]
    if pending:
        parts += [f"Not yet run: {', '.join(pending)}", ""]
    kept = [(r["recipe"], r["kept_layers"]) for r in rows if r["kept_layers"]]
    if kept:
        parts += ["## Layers kept in high precision", ""]
        parts += [f"- `{name}`: " + ", ".join(f"`{n}`" for n in layers) for name, layers in kept]
        parts.append("")
    parts += ["## Provenance", "", provenance_markdown(reports[-1]), ""]
    for r in reports:
        parts += [f"### Recipe `{r['recipe']['name']}`", "", "```json", json.dumps(r["recipe"], indent=2), "```", ""]
    write_text("\n".join(parts), out / FILES["markdown"])
    plot_compare(rows, out / FILES["plot"], title)


def resolve_recipes(names: list[str]) -> list[Recipe]:
    """Load every recipe before anything runs, so a typo fails in a second; names must be unique."""
    recipes = [load_recipe(n) for n in names]
    seen: set[str] = set()
    for r in recipes:
        if r.name in seen:
            raise SpikequantError(f"recipe name {r.name!r} appears twice in --recipes; names must be unique")
        seen.add(r.name)
    return recipes


def run_compare(session: Session, recipes: list[Recipe], output: str | Path, resume: bool = False,
                overwrite: bool = False, on_result: Callable[[dict[str, Any]], None] | None = None
                ) -> list[dict[str, Any]]:
    """Evaluate ``recipes`` in order in one ``session`` and keep ``output/compare.{json,md,png}`` current."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise SpikequantError(f"--output {out} is a file; give a folder for compare.json/.md/.png")
    settings = _settings(session)
    previous: list[dict[str, Any]] = []
    if (out / FILES["json"]).exists():
        if resume:
            previous = _load_previous(out / FILES["json"], settings)
        elif not overwrite:
            raise SpikequantError(f"{out / FILES['json']} exists; pass --resume to continue it or --overwrite")
    done = {r["recipe"]["name"]: r for r in previous}
    session.load()  # a bad --data-dir or --model fails before any output is written
    if session.kl and any(not r.is_float and r.name not in done for r in recipes):
        session.reference()  # shared by all rows: computed here so no row's wall time includes it
    reports: list[dict[str, Any]] = []
    written = 0  # how many results the files on disk hold
    for i, recipe in enumerate(recipes):
        old = done.get(recipe.name)
        if old is not None and old["recipe"] == recipe.to_dict():
            reports.append(old)
            continue
        t = time.perf_counter()
        rep, qm = session.run(recipe)
        if rep.get("quantization") is not None:
            rep["quantization"]["float_linear_share"] = float_linear_share(qm)
        rep["timings"]["wall_s"] = round(time.perf_counter() - t, 3)
        rep["environment"] = environment()
        reports.append(rep)
        del qm
        write_outputs(out, reports, settings, [r.name for r in recipes[i + 1:]])
        written = len(reports)
        if on_result is not None:
            on_result(rep)
    if reports and written != len(reports):
        write_outputs(out, reports, settings, [])
    return reports
