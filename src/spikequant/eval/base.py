"""One evaluator interface: every evaluation of a model returns named metrics and says how to show them.

The pipeline runs a list of evaluators on each quantized model and merges their metrics into the report
(``report["metrics"]``, with ``report["metric_columns"]`` naming the table columns), and
:func:`spikequant.reports.result_row` turns any report into a table row. A new kind of evaluation
(e.g. zero-shot accuracy through lm-eval) is one more :class:`Evaluator`; no table code changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class EvalContext:
    """What an evaluator may use besides the model."""

    tokenizer: Any = None
    # The unquantized model, or its log-probs per perplexity window; None: no agreement metrics.
    reference: nn.Module | Sequence[torch.Tensor] | None = None
    progress: bool = True
    desc: str = "evaluating"
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Evaluator(Protocol):
    name: str
    # (metric key, table header) for each metric this evaluator reports, in display order.
    columns: tuple[tuple[str, str], ...]

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, Any]:
        """Named metrics (keys of ``columns``, plus any details under other keys)."""
        ...


@dataclass
class PerplexityEvaluator:
    """Perplexity over non-overlapping windows (the papers' protocol), with KL divergence and top-1
    agreement against the reference when the context has one."""

    windows: torch.Tensor
    name: str = "perplexity"
    columns: tuple[tuple[str, str], ...] = (("ppl", "PPL"), ("kl", "KL"), ("top1", "top-1"))

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, Any]:
        from spikequant.eval.perplexity import evaluate

        res = evaluate(model, self.windows, ctx.reference, ctx.progress, desc=ctx.desc)
        return res.to_dict()


def run_evaluators(evaluators: Sequence[Evaluator], model: nn.Module, ctx: EvalContext
                   ) -> tuple[dict[str, Any], list[list[str]], dict[str, Any]]:
    """Run each evaluator; returns (metrics by key, the columns [key, header], details by evaluator)."""
    metrics: dict[str, Any] = {}
    columns: list[list[str]] = []
    details: dict[str, Any] = {}
    for ev in evaluators:
        out = ev.evaluate(model, ctx)
        for key, header in ev.columns:
            metrics[key] = out.get(key)
            columns.append([key, header])
        details[ev.name] = {k: v for k, v in out.items() if k not in dict(ev.columns)}
    return metrics, columns, details
