"""Rerun the commands behind the README and docs tables and print each number next to the documented one.

The list of documented numbers, their commands and margins is docs/reproduce.yaml; this script runs the
commands of the selected rows (one after another), reads their JSON output, prints documented vs today vs
relative difference, flags what lies outside the stated margin, and writes results/reproduce.md.

    python bench/reproduce.py --data-dir ../shared/data               # everything (hours on 2 cores)
    python bench/reproduce.py --data-dir ../shared/data --quick       # two rows of the remeasured spike-aware table
    python bench/reproduce.py --only 'rotation' --reuse               # a subset; reuse finished runs
    python bench/reproduce.py --check-docs                            # reproduce.yaml vs the docs tables only
    python bench/reproduce.py --no-run --extra avx2=results/spread/avx2/compare.json   # more columns

Exit status: 0 all selected numbers within their margin, 1 some outside, 2 bad input or a failed command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doctables import clean, doc_tables, find_table, numbers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "reproduce.yaml"
# Every markdown page: a new doc with a table of numbers fails the check until reproduce.yaml accounts for it.
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


@dataclass
class Check:
    """One documented number: where it is, which command and metric produce it, how far it may move."""

    doc: str
    label: str
    column: str
    documented: float
    run: str
    recipe: str  # the argument the command takes (a preset name or a recipe file)
    metric: str
    klass: str
    quick: bool

    @property
    def key(self) -> str:
        return f"{self.doc} | {self.label} | {self.column}"


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _listed(v: Any, n: int) -> list[Any]:
    return list(v) if isinstance(v, list) else [v] * n


def checks_of(spec: dict[str, Any]) -> list[Check]:
    out = []
    exact = set(spec.get("exact_metrics", []))
    for t in spec["tables"]:
        for label, row in t["rows"].items():
            for column, metric in t["columns"].items():
                if column not in row:
                    continue
                values = row[column] if isinstance(row[column], list) else [row[column]]
                n = len(values)
                recipes = _listed(row.get("recipe", label), n)
                classes = _listed(row.get("class", t.get("class", "quantized")), n)
                for v, r, k in zip(values, recipes, classes, strict=True):
                    out.append(Check(t["doc"], str(label), column, float(v), row.get("run", t.get("run")), r,
                                     metric, "exact" if metric in exact else k, bool(row.get("quick", False))))
    return out


# --- the docs tables against reproduce.yaml -----------------------------------------------------------------------

def check_docs(spec: dict[str, Any], root: Path = ROOT, docs: list[str] = DOCS) -> list[str]:
    """Problems: a documented value that differs from the doc, a row or table that is not in the doc, or a
    number in a docs table that reproduce.yaml neither lists nor declares not covered."""
    problems: list[str] = []
    parsed = doc_tables(root, docs)
    claimed: dict[tuple[str, int], Any] = {}
    for entry in spec["tables"] + spec.get("not_covered", []):
        doc = entry["doc"]
        if doc not in parsed:
            problems.append(f"{doc}: not one of the checked documents {docs}")
            continue
        text, tables = parsed[doc]
        table = find_table(tables, text, entry["after"])
        if table is None:
            problems.append(f"{doc}: no table below a line containing {entry['after']!r}")
            continue
        if (doc, table.line) in claimed:
            problems.append(f"{doc}:{table.line}: the table is listed twice in reproduce.yaml")
        claimed[(doc, table.line)] = entry
    for doc, (_, tables) in parsed.items():
        for table in tables:
            entry = claimed.get((doc, table.line))
            cells = [(table.label(r), h, c) for r in table.rows for h, c in zip(table.header[1:], r[1:], strict=False)]
            if entry is None:
                if any(numbers(c) for _, _, c in cells):
                    problems.append(f"{doc}:{table.line}: table with numbers ({' | '.join(table.header)}) is "
                                    "neither in reproduce.yaml tables nor in its not_covered list")
                continue
            if "rows" not in entry:
                continue  # declared not covered as a whole
            with_numbers = {h for _, h, c in cells if numbers(c)}
            for h in table.header[1:]:
                if h in with_numbers and h not in entry["columns"] and h not in entry.get("not_covered", {}):
                    problems.append(f"{doc}:{table.line}: column {h!r} is neither mapped nor declared not covered")
            for c in list(entry["columns"]) + list(entry.get("not_covered", {})):
                if c not in table.header:
                    problems.append(f"{doc}:{table.line}: reproduce.yaml names column {c!r}, the table has "
                                    f"{table.header}")
            labels = {table.label(r) for r in table.rows}
            for label in entry["rows"]:
                if clean(str(label)) not in labels:
                    problems.append(f"{doc}:{table.line}: reproduce.yaml row {label!r} is not in the table")
            rows = {clean(str(k)): v for k, v in entry["rows"].items()}
            for label, h, cell in cells:
                found = numbers(cell)
                if h in entry.get("not_covered", {}) or h not in entry["columns"]:
                    continue
                listed = rows.get(label, {}).get(h)
                listed = [] if listed is None else listed if isinstance(listed, list) else [listed]
                if not found and not listed:
                    continue
                if label not in rows:
                    problems.append(f"{doc}:{table.line}: row {label!r} has numbers but is not in reproduce.yaml")
                elif [float(x) for x in listed] != found:
                    problems.append(f"{doc}:{table.line}: {label!r} / {h!r}: the doc says {cell.strip()!r}, "
                                    f"reproduce.yaml {listed}")
    return problems


# --- running the commands -----------------------------------------------------------------------------------------

def recipe_name(arg: str) -> str:
    if arg.endswith((".yaml", ".yml", ".json")):
        from spikequant.recipes import load_recipe

        return load_recipe(str(ROOT / arg) if not Path(arg).is_absolute() else arg).name
    return arg


def command_of(run: dict[str, Any], recipes: list[str], out: Path, data_dir: str) -> list[str]:
    bindir = Path(sys.executable).parent
    text = run["command"].format(data_dir=data_dir, out=out, recipes=" ".join(recipes), python=sys.executable)
    argv = shlex.split(text)
    if argv[0] == "spikequant":
        exe = bindir / "spikequant"
        argv[0] = str(exe) if exe.exists() else "spikequant"
    return argv


def metrics_of(data: Any, fmt: str) -> dict[str, dict[str, float]]:
    """recipe (or linear) name -> metric -> value, from one command's JSON output."""
    out: dict[str, dict[str, float]] = {}
    if fmt == "reports":
        reports = data["results"] if isinstance(data, dict) and "results" in data else [data]
        fp = next((r["ppl"] for r in reports if r["recipe"]["name"] == "fp"), None)
        for r in reports:
            q = r.get("quantization") or {}
            m = {"ppl": r["ppl"], "kl": r["kl"], "top1": r["top1"],
                 "hp_share": q.get("high_precision_share"), "weight_bits": q.get("effective_weight_bits")}
            if m["hp_share"] is not None:
                m["hp_pct"] = 100 * m["hp_share"]
            if fp:
                m["ppl_vs_fp"] = r["ppl"] / fp
            out[r["recipe"]["name"]] = m
    elif fmt in ("compare", "rows"):
        for r in data["rows"]:
            m = {k: r.get(k) for k in ("ppl", "kl", "top1", "ppl_vs_fp", "hp_pct", "weight_bits", "hidden", "mlp")}
            if m["hp_pct"] is not None:
                m["hp_share"] = m["hp_pct"] / 100
            out[r["recipe"]] = m
        fp = out.get("fp", {}).get("ppl")
        for m in out.values():
            if m.get("ppl_vs_fp") is None and fp:
                m["ppl_vs_fp"] = m["ppl"] / fp
    elif fmt == "spikes":
        med = data["median_max_in"]
        for s in data["linears"]:
            out[s["name"].removeprefix("model.")] = {"max_in": s["max_in"], "x_median": s["max_in"] / med,
                                                     "max_in_rest": s["max_in_rest"], "max_in_bulk": s["max_in_bulk"]}
    else:
        raise ValueError(f"unknown format {fmt!r}")
    for m in out.values():
        if m.get("ppl_vs_fp") is not None:
            m["vs_fp_pct"] = 100 * (m["ppl_vs_fp"] - 1)
    return out


def guess_format(data: Any) -> str:
    if isinstance(data, dict) and "linears" in data:
        return "spikes"
    if isinstance(data, dict) and "rows" in data:
        return "compare" if "settings" in data else "rows"
    return "reports"


def read_metrics(path: Path, fmt: str | None = None) -> dict[str, dict[str, float]]:
    """Metrics from one JSON output, or from every JSON file in a folder (e.g. one `eval --json` per recipe)."""
    if path.is_dir():
        merged: dict[str, dict[str, float]] = {}
        for f in sorted(path.glob("*.json")):
            merged.update(read_metrics(f, fmt))
        return merged
    data = json.loads(path.read_text(encoding="utf-8"))
    return metrics_of(data, fmt or guess_format(data))


def run_all(spec: dict[str, Any], checks: list[Check], results: Path, data_dir: str, reuse: bool, dry: bool
            ) -> tuple[dict[str, dict[str, dict[str, float]]], list[str]]:
    """Run each needed command once (recipes of the selected rows only); return run -> name -> metrics."""
    needed: dict[str, list[str]] = {}
    for c in checks:
        needed.setdefault(c.run, [])
        if c.recipe not in needed[c.run]:
            needed[c.run].append(c.recipe)
    measured: dict[str, dict[str, dict[str, float]]] = {}
    log: list[str] = []
    for name, recipes in needed.items():
        run = spec["runs"][name]
        out = results / name
        path = out / run["json"]
        uses_recipes = "{recipes}" in run["command"]
        argv = command_of(run, recipes if uses_recipes else [], out, data_dir)
        shown = " ".join(shlex.quote(a) for a in argv).replace(sys.executable, "python")
        want = {recipe_name(r) for r in recipes}
        if path.exists() and (reuse or dry):
            have = read_metrics(path, run["format"])
            if want <= set(have) or dry:
                measured[name] = have
                log.append(f"- {name}: reused `{path}`")
                continue
        if dry:
            log.append(f"- {name}: no results at `{path}` (not run: --no-run)")
            continue
        out.mkdir(parents=True, exist_ok=True)
        print(f"[reproduce] {name}: {shown}", flush=True)
        t = time.perf_counter()
        with open(out / "command.log", "w", encoding="utf-8") as f:
            rc = subprocess.call(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t
        if rc != 0:
            log.append(f"- {name}: `{shown}` FAILED (exit {rc}, see {out / 'command.log'})")
            print(f"[reproduce] {name} failed with exit code {rc}; log: {out / 'command.log'}", flush=True)
            continue
        measured[name] = read_metrics(path, run["format"])
        log.append(f"- {name}: `{shown}` ({dt / 60:.1f} min)")
        print(f"[reproduce] {name}: done in {dt / 60:.1f} min", flush=True)
    return measured, log


# --- comparing ----------------------------------------------------------------------------------------------------

def half_unit(v: float) -> float:
    """Half a unit of the last digit of ``v`` as written in reproduce.yaml (the doc's rounding)."""
    text = repr(v)
    if "e" in text:
        return 0.0
    decimals = len(text.split(".")[1].rstrip("0")) if "." in text else 0
    return 0.5 * 10 ** -decimals


def within(c: Check, today: float, spec: dict[str, Any]) -> tuple[bool, float]:
    """(inside the margin?, allowed deviation) for one number."""
    margin = spec["margins"][c.klass]
    absolute = c.metric in spec.get("absolute_metrics", [])
    allowed = (margin if absolute else margin * abs(c.documented)) + half_unit(c.documented)
    return abs(today - c.documented) <= allowed + 1e-12, allowed


def fmt(v: float | None, digits: int = 4) -> str:
    """Like the docs (4 significant digits); measured values get ``digits=6`` so small moves show."""
    if v is None:
        return "–"
    if v != 0 and (abs(v) >= 1e7 or abs(v) < 1e-3):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.4f}"


def compare(spec: dict[str, Any], checks: list[Check], measured: dict[str, dict[str, dict[str, float]]],
            extras: dict[str, dict[str, dict[str, float]]]) -> tuple[list[list[str]], int, int]:
    rows, bad, missing = [], 0, 0
    for c in checks:
        name = recipe_name(c.recipe)
        today = measured.get(c.run, {}).get(name, {}).get(c.metric)
        others = [extras[e].get(name, {}).get(c.metric) for e in extras]
        if today is None:
            missing += 1
            rows.append([c.doc, c.label, c.column, fmt(c.documented), "not run", "", "", c.klass, "",
                         *[fmt(o, 6) for o in others], ""])
            continue
        ok, allowed = within(c, today, spec)
        bad += not ok
        rel = (today - c.documented) / c.documented if c.documented else math.nan
        absolute = c.metric in spec.get("absolute_metrics", [])
        diff = f"{today - c.documented:+.4f}" if absolute else (f"{100 * rel:+.2f} %" if c.documented else "")
        vals = [v for v in [today, *others] if v is not None]
        spread = ""
        if len(vals) > 1 and min(vals) > 0 and not absolute:
            spread = f"{100 * (max(vals) - min(vals)) / min(vals):.2f} %"
        elif len(vals) > 1:
            spread = f"{max(vals) - min(vals):.4f}"
        if absolute:
            shown = "±" + fmt(allowed)
        else:
            shown = f"±{100 * allowed / abs(c.documented):.2f} %" if c.documented else f"±{fmt(allowed)}"
        rows.append([c.doc, c.label, c.column, fmt(c.documented), fmt(today, 6), diff, shown, c.klass,
                     "ok" if ok else "OUTSIDE", *[fmt(o, 6) for o in others], spread])
    return rows, bad, missing


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def environment_lines() -> list[str]:
    from spikequant.reports import cpu_line, environment

    env = environment()
    return [f"- CPU: {cpu_line(env)}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
            f"- platform: {env['platform']}", f"- created: {env['created']}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("SPIKEQUANT_DATA_DIR", "../shared/data"))
    ap.add_argument("--spec", default=str(SPEC), help="the list of documented numbers (default: %(default)s)")
    ap.add_argument("--results", default="results/reproduce", help="folder for the commands' outputs")
    ap.add_argument("--markdown", default=None, help="report file (default: <results>.md)")
    ap.add_argument("--only", default=None, help="regex: rows whose 'doc | label | column', run or recipe match")
    ap.add_argument("--quick", action="store_true", help="only the rows marked quick (README demo, static spike rows)")
    ap.add_argument("--reuse", action="store_true", help="skip a command whose JSON already holds its recipes")
    ap.add_argument("--no-run", action="store_true", help="run nothing; compare what --results already holds")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                    help="another measurement (a demo/compare/eval/bench JSON, or a folder of them) shown as a "
                         "column, e.g. another CPU or kernel selection")
    ap.add_argument("--check-docs", action="store_true", help="only check reproduce.yaml against the docs tables")
    args = ap.parse_args(argv)

    spec = load_spec(Path(args.spec))
    problems = check_docs(spec)
    if problems:
        print("reproduce.yaml and the docs disagree:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.check_docs:
        print(f"reproduce.yaml matches the docs: {len(checks_of(spec))} numbers listed")
        return 0
    checks = checks_of(spec)
    if args.quick:
        checks = [c for c in checks if c.quick]
    if args.only:
        pat = re.compile(args.only)
        checks = [c for c in checks if pat.search(c.key) or pat.search(c.run) or pat.search(c.recipe)]
    if not checks:
        print("no documented number matches the selection", file=sys.stderr)
        return 2
    extras = {}
    for e in args.extra:
        name, _, path = e.partition("=")
        if not path or not Path(path).exists():
            print(f"--extra {e!r}: give NAME=PATH to an existing JSON file or folder", file=sys.stderr)
            return 2
        extras[name] = read_metrics(Path(path))
    results = Path(args.results)
    measured, log = run_all(spec, checks, results, args.data_dir, args.reuse, args.no_run)
    rows, bad, missing = compare(spec, checks, measured, extras)
    header = ["doc", "row", "column", "documented", "today", "diff", "margin", "class", "",
              *extras, *(["spread (today and extras)"] if extras else [])]
    table = markdown(header, rows)
    summary = (f"{len(checks) - bad - missing} of {len(checks)} numbers within their margin, {bad} outside, "
               f"{missing} not run")
    print(table)
    print(summary)
    md = [f"# make reproduce: {summary}", "", *environment_lines(), "", "Commands:", "", *log, "",
          f"Margins (relative unless absolute for {', '.join(spec.get('absolute_metrics', []))}; plus half a unit "
          "of the last printed digit): " + ", ".join(f"{k} {v}" for k, v in spec["margins"].items()), "",
          table, ""]
    out = Path(args.markdown or str(results) + ".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md), encoding="utf-8")
    print(f"wrote {out}")
    if any("FAILED" in line for line in log):
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
