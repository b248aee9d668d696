"""Markdown tables of the README and docs, as data: what `bench/reproduce.py` checks against."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# A number on its own (not inside a word such as int4 or R1): 74.23, 2647466.76, +14.3, 1e-3.
NUMBER = re.compile(r"(?<![\w.^·])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w^·])")


@dataclass
class Table:
    doc: str
    line: int  # 1-based line of the header
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def label(self, row: list[str]) -> str:
        return clean(row[0])


def clean(cell: str) -> str:
    """A cell as plain text: no markdown emphasis or code marks, single spaces."""
    return " ".join(cell.replace("**", "").replace("`", "").replace("\\|", "|").split())


def numbers(cell: str) -> list[float]:
    """The numbers a cell states, parenthesized remarks left out: '41.25 (+14 %)' -> [41.25]."""
    text = re.sub(r"\([^)]*\)", " ", clean(cell))
    return [float(m) for m in NUMBER.findall(text)]


def split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip() for c in cells[1:-1]]


def parse_tables(text: str, doc: str) -> list[Table]:
    tables: list[Table] = []
    lines = text.splitlines()
    in_code = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_code = not in_code
        is_table = (not in_code and line.lstrip().startswith("|") and i + 1 < len(lines)
                    and re.fullmatch(r"\s*\|(\s*:?-+:?\s*\|)+\s*", lines[i + 1]))
        if is_table:
            t = Table(doc, i + 1, [clean(c) for c in split_row(line)])
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                t.rows.append(split_row(lines[i]))
                i += 1
            tables.append(t)
            continue
        i += 1
    return tables


def find_table(tables: list[Table], text: str, after: str) -> Table | None:
    """The first table at or below the first line that contains ``after``."""
    for n, line in enumerate(text.splitlines(), 1):
        if after in line:
            return next((t for t in tables if t.line >= n), None)
    return None


def doc_tables(root: Path, docs: list[str]) -> dict[str, tuple[str, list[Table]]]:
    out = {}
    for d in docs:
        text = (root / d).read_text(encoding="utf-8")
        out[d] = (text, parse_tables(text, d))
    return out
