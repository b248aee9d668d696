"""Spike analysis outputs: tables (markdown, JSON), the token summary and a ready-to-run recipe."""

from __future__ import annotations

import string
from collections import Counter
from typing import Any

import yaml

from spikequant.algorithms.spike_exempt import exemption_slots
from spikequant.recipes import Recipe
from spikequant.stats import LinearStats, SpikeRule, median_max_in

_PUNCT = set(string.punctuation) | {"—", "–", "…", "“", "”", "‘", "’"}


def is_delimiter(text: str) -> bool:
    """Whitespace-only tokens ("\\n", " ") and tokens made only of punctuation ("." "," "@-@" "=")."""
    t = text.strip()
    return t == "" or all(c in _PUNCT for c in t)


def show_token(text: str) -> str:
    """A token's text for a markdown cell: quoted, with newlines and pipes visible."""
    return "`" + repr(text)[1:-1].replace("|", "\\|").replace("`", "'") + "`"


def token_summary(stats: list[LinearStats], detected: list[str]) -> dict[str, Any]:
    """Which tokens carry the spikes of the detected layers: how often the maximum sits on the first
    token of a window, and how many of the largest tokens are delimiters."""
    spikes = [s for s in stats if s.name in set(detected)]
    hits = [(s, h) for s in spikes for h in s.top_tokens]
    first = sum(s.position == 0 for s in spikes)
    top_texts = Counter(h.token for _, h in hits)
    return {
        "spike_layers": len(spikes),
        "max_on_first_token": first,
        "top_tokens_considered": len(hits),
        "top_tokens_on_first_position": sum(h.position == 0 for _, h in hits),
        "top_tokens_delimiters": sum(is_delimiter(h.token) for _, h in hits),
        "most_common_top_tokens": [[t, c] for t, c in top_texts.most_common(8)],
        # Spike tokens that are not at position 0: a position-based fix (keep the first token) misses them.
        "off_first_position": [{"linear": s.name, **h.to_dict()} for s, h in hits if h.position != 0],
        # Without the first token the spike layers look like everyone else: that is the attention sink.
        "max_without_first_token": {s.name: round(s.max_in_rest, 3) for s in spikes},
    }


def token_note(summary: dict[str, Any]) -> str:
    """One paragraph, in words, on where the spikes sit."""
    n = summary["spike_layers"]
    if n == 0:
        return "No spike layer was detected."
    parts = [f"In {summary['max_on_first_token']} of {n} spike layers the maximum sits on the first token "
             f"of a window (the attention-sink position)."]
    k = summary["top_tokens_considered"]
    parts.append(f"Of their {k} largest tokens, {summary['top_tokens_on_first_position']} are at position 0 and "
                 f"{summary['top_tokens_delimiters']} are delimiters (punctuation or whitespace).")
    rest = summary["max_without_first_token"]
    if rest:
        parts.append("Leaving out position 0, the largest input of these layers is "
                     + ", ".join(f"{v:.4g} ({n.removeprefix('model.')})" for n, v in rest.items()) + ".")
    off = summary.get("off_first_position") or []
    if off:
        seen = sorted({(h["window"], h["position"], h["token"]) for h in off})
        parts.append("Spike tokens away from position 0: " + ", ".join(
            f"window {w} position {p} {t!r}" for w, p, t in seen[:6]) + (" ..." if len(seen) > 6 else "") + ".")
    return " ".join(parts)


def analysis_dict(stats: list[LinearStats], rule: SpikeRule, percentile: float, outliers: int = 4
                  ) -> dict[str, Any]:
    detected = rule.detect(stats)
    median = median_max_in(stats)
    return {
        "rule": rule.to_dict(),
        "median_max_in": median,
        "threshold": rule.threshold(stats),
        "percentile": percentile,
        "outliers": outliers,
        "detected": detected,
        "token_summary": token_summary(stats, detected),
        "linears": [s.to_dict() for s in stats],
    }


def _f(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def stats_markdown(stats: list[LinearStats], detected: list[str], percentile: float, only: list[str] | None = None,
                   outliers: int = 4) -> str:
    """The per-linear table; ``only`` restricts the rows (e.g. to the detected layers)."""
    median = median_max_in(stats)
    pct = f"{percentile:g}"
    rows = [f"| linear | layer | role | max \\|in\\| | x median | p{pct} \\|in\\| | max \\|in\\| w/o first token | "
            f"max \\|in\\| w/o {outliers} largest tokens | max \\|out\\| | max at window:position | channel | token "
            "| spike |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- |"]
    keep = set(only) if only is not None else None
    for s in stats:
        if keep is not None and s.name not in keep:
            continue
        rows.append(f"| `{s.name}` | {s.layer} | {s.role} | {_f(s.max_in)} | {s.max_in / median:.1f} | "
                    f"{_f(s.pct_in)} | {_f(s.max_in_rest)} | {_f(s.max_in_bulk)} | {_f(s.max_out)} | "
                    f"{s.window}:{s.position} | "
                    f"{s.channel} | {show_token(s.token)} | {'**yes**' if s.name in detected else ''} |")
    return "\n".join(rows)


def tokens_markdown(stats: list[LinearStats], detected: list[str], per_layer: int = 5) -> str:
    """The largest tokens of every detected layer, with position and text."""
    rows = ["| linear | rank | max \\|in\\| of token | window | position | token | first token | delimiter |",
            "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    by_name = {s.name: s for s in stats}
    for name in detected:
        for r, h in enumerate(by_name[name].top_tokens[:per_layer], 1):
            rows.append(f"| `{name}` | {r} | {_f(h.value)} | {h.window} | {h.position} | {show_token(h.token)} | "
                        f"{'yes' if h.position == 0 else ''} | {'yes' if is_delimiter(h.token) else ''} |")
    return "\n".join(rows)


def spike_recipe(base: Recipe, detected: list[str], precision: str = "float", name: str | None = None,
                 note: str = "") -> dict[str, Any]:
    """``base`` with one override keeping the ``detected`` layers at ``precision``; detection modifiers
    of the base are dropped since the list now stands in the recipe (edit it freely)."""

    data = base.to_dict()
    data["name"] = name or f"{base.name}-spike-list"
    data["description"] = (f"{base.name} with the spike layers detected by `spikequant analyze` kept in "
                           f"{precision}. {note}").strip()
    data["modifiers"] = [m for m in data["modifiers"] if m["type"] not in ("spike_exempt", "random_exempt")]
    dynamic = base.inputs.dynamic if base.inputs is not None else True
    if detected:
        slots = exemption_slots(precision, dynamic)
        data["overrides"] = [*data["overrides"], {"match": list(detected),
                                                  **{k: None if v is None else v.to_dict() for k, v in slots.items()}}]
    Recipe.from_dict(data, source="generated recipe")  # what we write must load
    return data


def recipe_yaml(data: dict[str, Any], header: str = "") -> str:
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join(lines) + ("\n" if lines else "") + yaml.safe_dump(data, sort_keys=False, width=110)
