"""Zero-shot accuracy with lm-evaluation-harness, on the model exactly as it was quantized.

The model lm-eval scores is the in-memory one: fake-quantized weights, activation and KV quantizers,
rotations, expansion and online Hadamards all stay in place (nothing is saved and reloaded, no second
copy is made). lm-eval's ``HFLM`` wraps it as a pre-built model.

Metric rule, as QuaRot reports it (``spcl/QuaRot`` ``fake_quant/main.py``, ``main``: ``acc_norm`` if the
task has it, else ``acc``; the mean over the tasks): see :func:`headline_metric`.

lm-eval is an optional dependency (the ``eval`` extra); it is imported only when zero-shot is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spikequant.errors import DataError, SpikequantError

LM_EVAL_PIN = "0.4.13"  # keep in step with the `eval` extra in pyproject.toml
INSTALL_HINT = "pip install 'spikequant[eval]' (`make setup` does)"

TASK_PRESETS: dict[str, tuple[str, ...]] = {
    # QuaRot (seed paper B), fake_quant/README.md and main.py: the six commonsense tasks.
    "quarot": ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada_openai"),
    # PWIM (seed paper A), PWIM/benchmark.py: the task list passed to simple_evaluate.
    "pwim": ("hellaswag", "piqa", "winogrande", "openbookqa", "rte", "copa", "lambada_standard"),
}
METRIC_ORDER = ("acc_norm", "acc")  # the first one a task reports is its headline number


class ZeroShotError(SpikequantError):
    """A zero-shot setting that cannot run: lm-eval missing, unknown task, bad task folder."""


def lm_eval_version() -> str:
    """The installed lm-eval version; a one-line error naming the install command when it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ZeroShotError(f"zero-shot tasks need lm-eval, which is not installed; {INSTALL_HINT}") from None
    return metadata.version("lm_eval")


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"quarot"``, ``"piqa,hellaswag"`` or a list of either: task names in order, presets expanded,
    duplicates dropped."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in parts:
        for name in (n.strip() for n in str(part).split(",")):
            if not name:
                continue
            for task in TASK_PRESETS.get(name, (name,)):
                if task not in names:
                    names.append(task)
    if not names:
        raise ZeroShotError(f"no zero-shot task given in {spec!r}; name tasks or a preset "
                            f"({', '.join(TASK_PRESETS)})")
    return names


def headline_metric(task_results: dict[str, Any]) -> str | None:
    """``acc_norm`` where the task reports it, else ``acc`` (None if neither)."""
    for metric in METRIC_ORDER:
        if f"{metric},none" in task_results:
            return metric
    return None


def make_task_manager(tasks: Sequence[str], tasks_dir: str | Path | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``tasks``, with ``tasks_dir``'s YAMLs added.

    When ``tasks_dir`` holds all the tasks, lm-eval's own ~15k task configs are not indexed (that index
    costs tens of seconds); otherwise they are, and lm-eval gives ``tasks_dir``'s files precedence.
    """
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise DataError(f"--tasks-dir {tasks_dir} is not a folder; give the folder holding the task YAML files")
    lm_eval_version()
    from lm_eval.tasks import TaskManager

    include = None
    if tasks_dir is not None:
        include = str(Path(tasks_dir).resolve())
        with _quiet_lm_eval():
            local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    with _quiet_lm_eval():
        manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"neither lm-eval nor {tasks_dir} defines it" if tasks_dir else "lm-eval does not define it"
        raise ZeroShotError(f"unknown zero-shot task {unknown[0]!r}: {where} (list them with `lm-eval ls tasks`; "
                            "a local task goes in a YAML under --tasks-dir)")
    return manager


@dataclass
class ZeroShotResult:
    """Per-task scores by their lm-eval names, the mean of the headline metrics, and the settings."""

    tasks: dict[str, dict[str, Any]]  # name -> metric, value, stderr, acc, acc_norm, num_fewshot, samples
    mean: float
    num_fewshot: int | None
    limit: int | None
    batch_size: int
    max_length: int | None
    tasks_dir: str | None
    lm_eval_version: str
    seconds: float

    def metrics(self) -> dict[str, float]:
        """Named metrics: ``zeroshot_mean`` and ``zeroshot/<task>`` (the headline metric of each task)."""
        return {"zeroshot_mean": self.mean, **{f"zeroshot/{t}": r["value"] for t, r in self.tasks.items()}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ZeroShotEvaluator:
    """Zero-shot accuracy on lm-eval tasks; ``evaluate(model, tokenizer)`` returns named metrics.

    ``batch_size`` 1 is the faithful setting for dynamic per-tensor activation quantization: with more
    rows in a batch, a per-tensor scale is shared by the rows (and their padding), so a question's score
    would depend on its neighbours.
    """

    tasks: list[str]
    tasks_dir: str | None = None
    num_fewshot: int = 0
    limit: int | None = None
    batch_size: int = 1
    max_length: int | None = None
    progress: bool = True
    name: str = "zeroshot"
    _manager: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.tasks = parse_tasks(self.tasks)
        for value, flag in ((self.limit, "--limit"), (self.batch_size, "--batch-size"),
                            (self.max_length, "--max-length")):
            if value is not None and value < 1:
                raise ZeroShotError(f"{flag} must be >= 1, got {value}")
        if self.num_fewshot < 0:
            raise ZeroShotError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")

    def check(self) -> None:
        """Everything that can fail before a model is loaded: lm-eval present, tasks dir, task names."""
        if self._manager is None:
            self._manager = make_task_manager(self.tasks, self.tasks_dir)

    @property
    def columns(self) -> tuple[tuple[str, str], ...]:
        """The :class:`~spikequant.eval.base.Evaluator` columns: one per task (its headline metric, by its
        lm-eval name), then the mean."""
        return (*((f"{TASK_PREFIX}{t}", t) for t in self.tasks), (MEAN_KEY, "0-shot mean"))

    def evaluate(self, model: nn.Module, ctx: Any) -> dict[str, Any]:
        """The evaluator interface: named metrics, plus the full result (provenance) as details."""
        res = self.run(model, ctx.tokenizer)
        return {**res.metrics(), **res.to_dict()}

    def run(self, model: nn.Module, tokenizer: Any) -> ZeroShotResult:
        """Score ``model`` (as it is, hooks and all) on the tasks."""
        self.check()
        return evaluate(model, tokenizer, self.tasks, task_manager=self._manager, num_fewshot=self.num_fewshot,
                        limit=self.limit, batch_size=self.batch_size, max_length=self.max_length,
                        progress=self.progress, tasks_dir=self.tasks_dir)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    tasks_dir: str | Path | None = None,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    progress: bool = True,
    task_manager: Any = None,
) -> ZeroShotResult:
    """Zero-shot accuracy of ``model`` on lm-eval ``tasks`` (names or presets, see :data:`TASK_PRESETS`).

    The model is evaluated in place and left as it was; the global random state is restored afterwards
    (lm-eval seeds python, numpy and torch).
    """
    version = lm_eval_version()
    names = parse_tasks(tasks)
    manager = task_manager or make_task_manager(names, tasks_dir)
    import lm_eval

    if next(model.parameters()).device.type == "cpu":
        torch.set_flush_denormal(True)  # as in perplexity: fake-quant denormals slow CPU math ~10x
    start = time.perf_counter()
    with _restored_rng(), _quiet_lm_eval(), torch.inference_mode():
        lm = _in_memory_lm(model, tokenizer, batch_size, max_length, progress)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      batch_size=batch_size, task_manager=manager, log_samples=False)
    seconds = time.perf_counter() - start
    results = out["results"]
    groups = set(out.get("groups", {}))
    scores: dict[str, dict[str, Any]] = {}
    for task, r in results.items():
        if task in groups:  # a group's aggregate; its member tasks are listed themselves
            continue
        metric = headline_metric(r)
        if metric is None:
            reported = sorted(k.split(",")[0] for k in r if "," in k and "stderr" not in k)
            raise ZeroShotError(f"task {task!r} reports neither acc_norm nor acc (it reports {', '.join(reported)});"
                                " only accuracy tasks go in the zero-shot columns")
        scores[task] = {
            "metric": metric,
            "value": float(r[f"{metric},none"]),
            "stderr": _float_or_none(r.get(f"{metric}_stderr,none")),
            "acc": _float_or_none(r.get("acc,none")),
            "acc_norm": _float_or_none(r.get("acc_norm,none")),
            "num_fewshot": out.get("n-shot", {}).get(task),
            "samples": out.get("n-samples", {}).get(task, {}).get("effective"),
        }
    mean = sum(s["value"] for s in scores.values()) / len(scores)
    return ZeroShotResult(tasks=scores, mean=mean, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                          max_length=max_length, tasks_dir=None if tasks_dir is None else str(tasks_dir),
                          lm_eval_version=version, seconds=round(seconds, 3))


def _float_or_none(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a stderr it did not compute
        return None


_LM_CLASS: type | None = None


def _lm_class() -> type:
    """``HFLM`` for a model held in memory: no hub look-up for its revision, progress bars on request."""
    global _LM_CLASS
    if _LM_CLASS is None:
        from lm_eval.models.huggingface import HFLM

        class InMemoryHFLM(HFLM):
            show_progress = True

            def loglikelihood(self, requests, disable_tqdm: bool = False):
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)

            def generate_until(self, requests, disable_tqdm: bool = False):
                return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)

            def get_model_info(self) -> dict:
                return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                        "model_dtype": str(next(self.model.parameters()).dtype)}

        _LM_CLASS = InMemoryHFLM
    return _LM_CLASS


def _in_memory_lm(model: nn.Module, tokenizer: Any, batch_size: int, max_length: int | None, progress: bool):
    import copy

    # HFLM calls model.tie_weights(); a rotated model whose embeddings were untied must stay untied
    # (spikequant sets tie_word_embeddings False when it unties, but the model is scored as it is held,
    # whatever its config says), so the call is a no-op while HFLM is built.
    model.tie_weights = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        # HFLM sets a pad token on the tokenizer it is given: a copy keeps the caller's untouched.
        lm = _lm_class()(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                         max_length=max_length)
    finally:
        del model.tie_weights
    lm.show_progress = progress
    return lm


@contextlib.contextmanager
def _restored_rng() -> Iterator[None]:
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(npy)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    # lm-eval logs a page of INFO/WARNING lines per run (among them that a pre-built model is passed,
    # which is the point here); errors still show.
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --- Reports: a zero-shot section of a report becomes named cells of its row, and columns/notes of tables.

MEAN_KEY = "zeroshot_mean"
TASK_PREFIX = "zeroshot/"


def table_note(reports: Sequence[dict[str, Any]]) -> str | None:
    """One line under a table saying which metric each task column holds and how it was run."""
    zs = [r["evaluation"]["zeroshot"] for r in reports if (r.get("evaluation") or {}).get("zeroshot")]
    if not zs:
        return None
    z = zs[0]
    by_metric: dict[str, list[str]] = {}
    for t, s in z["tasks"].items():
        by_metric.setdefault(s["metric"], []).append(t)
    metrics = "; ".join(f"{m} for {', '.join(ts)}" for m, ts in by_metric.items())
    limit = "all examples" if z["limit"] is None else f"limit {z['limit']} examples per task"
    return (f"Zero-shot accuracy (lm-eval {z['lm_eval_version']}, num_fewshot {z['num_fewshot']}, {limit}, "
            f"batch size {z['batch_size']}): {metrics} (acc_norm where the task has it, else acc, as QuaRot "
            "reports); `0-shot mean` is their mean.")


def add_arguments(p: Any) -> None:
    """The zero-shot flags of ``eval`` and ``compare``."""
    g = p.add_argument_group("zero-shot accuracy (lm-eval)")
    g.add_argument("--tasks", default=None,
                   help="lm-eval task names and/or presets, comma-separated: "
                        + "; ".join(f"{k} = {','.join(v)}" for k, v in TASK_PRESETS.items()))
    g.add_argument("--tasks-dir", default=None, help="folder of local task YAMLs (lm-eval's include_path)")
    g.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per question (default: 0)")
    g.add_argument("--limit", type=int, default=None, help="only the first N examples of each task (quick runs)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="lm-eval batch size (default: 1, exact for per-tensor dynamic activation scales)")
    g.add_argument("--max-length", type=int, default=None,
                   help="longest input in tokens (default: the model's max_position_embeddings)")


def from_arguments(args: Any) -> list[ZeroShotEvaluator]:
    """The evaluators the flags ask for (none without --tasks); --tasks-dir alone is an error."""
    if not getattr(args, "tasks", None):
        if getattr(args, "tasks_dir", None):
            raise ZeroShotError("--tasks-dir given without --tasks; name the tasks to run")
        return []
    return [ZeroShotEvaluator(args.tasks, tasks_dir=args.tasks_dir, num_fewshot=args.num_fewshot, limit=args.limit,
                             batch_size=args.batch_size, max_length=args.max_length,
                             progress=not getattr(args, "no_progress", False))]
