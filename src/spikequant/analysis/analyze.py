"""``analyze`` as a Python API: statistics, detection and every output file of one spike analysis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from spikequant.analysis.plots import plot_spikes
from spikequant.analysis.report import (
    analysis_dict,
    recipe_yaml,
    spike_recipe,
    stats_markdown,
    token_note,
    tokens_markdown,
)
from spikequant.reports import environment, write_json, write_text
from spikequant.stats import LinearStats, SpikeRule, collect_stats, median_max_in

if TYPE_CHECKING:  # recipes import the modifiers, which import this package
    from spikequant.recipes import Recipe

FILES = {"json": "spikes.json", "markdown": "spikes.md", "plot": "spikes.png", "recipe": "spike-recipe.yaml"}


@dataclass
class SpikeAnalysis:
    """Statistics of every decoder linear and what the rule makes of them."""

    stats: list[LinearStats]
    rule: SpikeRule
    percentile: float
    outliers: int = 4

    @property
    def detected(self) -> list[str]:
        return self.rule.detect(self.stats)

    @property
    def threshold(self) -> float:
        return self.rule.threshold(self.stats)

    @property
    def median(self) -> float:
        return median_max_in(self.stats)

    def to_dict(self) -> dict[str, Any]:
        return analysis_dict(self.stats, self.rule, self.percentile, self.outliers)


def analyze(model: nn.Module, windows: torch.Tensor, tokenizer: Any = None, rule: SpikeRule | None = None,
            percentile: float = 99.9, top_tokens: int = 8, progress: bool = True, outliers: int = 4
            ) -> SpikeAnalysis:
    """Record activation statistics of every decoder linear over ``windows`` and apply ``rule``."""
    stats = collect_stats(model, windows, tokenizer, percentile, progress, top_tokens, outliers)
    return SpikeAnalysis(stats, rule or SpikeRule(), percentile, outliers)


def write_analysis(result: SpikeAnalysis, output: str | Path, base: Recipe, precision: str = "float",
                   provenance: dict[str, Any] | None = None, title: str = "") -> dict[str, Path]:
    """Write ``spikes.json``, ``spikes.md``, ``spikes.png`` and ``spike-recipe.yaml`` into ``output``.

    The recipe is built (and validated) first so that a bad ``base``/``precision`` fails before any file
    is written."""
    out = Path(output)
    detected = result.detected
    rule = result.rule
    rule_text = (f"max |input| > {rule.k:g} x median ({result.median:.4g})" if rule.k is not None else "")
    if rule.abs_threshold is not None:
        rule_text += (" or " if rule_text else "max |input| > ") + f"{rule.abs_threshold:g}"
    recipe = spike_recipe(base, detected, precision, note=f"Detected by the rule {rule_text}.")
    paths = {k: out / v for k, v in FILES.items()}
    prov = provenance or {}
    data = {**prov, **result.to_dict(), "environment": environment()}
    write_json(data, paths["json"])
    summary = data["token_summary"]
    src = prov.get("data", {})
    lines = [
        f"# {title or 'Activation spikes'}", "",
        f"- model: `{prov.get('model', '?')}`",
        f"- data: {src.get('name', '?')} (sha256 `{str(src.get('sha256', '?'))[:12]}`), "
        f"{src.get('windows', '?')} windows x {src.get('seqlen', '?')} tokens",
        f"- rule: {rule_text}" + (f", at most {rule.max_layers} layers" if rule.max_layers is not None else "")
        + f" -> threshold {result.threshold:.4g}",
        f"- detected ({len(detected)}): " + (", ".join(f"`{n}`" for n in detected) or "none"),
        "", f"![spike plot]({FILES['plot']})", "",
        "## Spike layers", "", stats_markdown(result.stats, detected, result.percentile, detected, result.outliers), "",
        "## Which tokens carry the spikes", "", token_note(summary), "",
        tokens_markdown(result.stats, detected), "",
        "## All decoder linears", "",
        stats_markdown(result.stats, detected, result.percentile, None, result.outliers), "",
        f"Recipe with this list: `{FILES['recipe']}` (run it with `spikequant eval --recipe "
        f"{out / FILES['recipe']}`).", "",
    ]
    write_text("\n".join(lines), paths["markdown"])
    plot_spikes(result.stats, detected, result.threshold, paths["plot"], title=title, median=result.median,
                outliers=result.outliers)
    header = (f"Written by spikequant analyze for {prov.get('model', '?')}.\n"
              f"Spike layers detected by the rule {rule_text}; edit the override list freely.\n"
              f"Evaluate: spikequant eval --recipe {paths['recipe']} --model {prov.get('model', '?')}")
    write_text(recipe_yaml(recipe, header), paths["recipe"])
    return paths
