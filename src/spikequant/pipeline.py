"""The model-level API: quantize a model by a recipe, and run recipes end to end with reports."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spikequant.algorithms.base import QuantContext
from spikequant.data import Text, calibration_windows, eval_windows, load_text, tokenize
from spikequant.errors import RecipeError
from spikequant.eval import EvalContext, PerplexityEvaluator, reference_logprobs, run_evaluators
from spikequant.models import DEFAULT_MODEL, LoadedModel, decoder_linears, get_arch, load_model
from spikequant.quant import ModuleQuant, QuantizedModel, attach, resolve_plan
from spikequant.recipes import DECODER_LINEARS, Recipe
from spikequant.reports import environment


def build_plan(model: nn.Module, recipe: Recipe, extra_overrides=()) -> dict[str, ModuleQuant]:
    """Resolve a recipe against a model: the quantization of every targeted linear."""
    get_arch(model)  # fail early, with the supported list, on an unknown architecture
    decoder = list(decoder_linears(model))
    all_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets: list[str] = []
    for t in recipe.targets:
        targets += [n for n in decoder] if t == DECODER_LINEARS else [t]
    names = decoder + [n for n in all_linears if n not in set(decoder)]
    overrides = [(list(o.match), dict(o.slots)) for o in recipe.overrides] + list(extra_overrides)
    plan = resolve_plan(names, targets, ModuleQuant(recipe.weights, recipe.inputs, recipe.outputs), overrides)
    check_plan(model, plan)
    return plan


def check_plan(model: nn.Module, plan: dict[str, ModuleQuant]) -> None:
    """Fail before anything runs (one line naming the module) where a group size does not divide the
    width it groups: in_features for the weights and inputs, out_features for the outputs."""
    for name, mq in plan.items():
        linear = model.get_submodule(name)
        for slot, width in (("weights", linear.in_features), ("inputs", linear.in_features),
                            ("outputs", linear.out_features)):
            spec = getattr(mq, slot)
            if spec is not None and spec.granularity == "group" and width % spec.group_size:
                raise RecipeError(f"{name}.{slot}: group_size {spec.group_size} does not divide its width "
                                  f"{width}; use a divisor of {width} or an override for this module")


def quantize(
    model: nn.Module,
    recipe: Recipe,
    calibration: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[QuantizedModel, dict[str, Any]]:
    """Apply ``recipe`` to ``model`` in place, stage by stage (see :mod:`spikequant.algorithms.base`):
    transforms, weight algorithms, attaching the quantization state, calibration of static scales, and
    algorithms on the quantized model. ``calibration`` is a (N, seqlen) tensor of token ids or a function
    returning one (called only if something needs it). Returns the handle and the modifiers' findings."""

    def calib() -> torch.Tensor:
        if calibration is None:
            raise ValueError(f"recipe {recipe.name!r} needs calibration data, none was given")
        return calibration() if callable(calibration) else calibration

    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method is not None and str(getattr(method, "value", method)) == "compressed-tensors":
        raise RecipeError(f"the model is already quantized (a compressed-tensors checkpoint); recipe {recipe.name!r} "
                          "needs a float model")
    ctx = QuantContext(model=model, calibration_windows=calib, seed=recipe.seed, progress=progress)

    def run_stage(stage: str) -> None:
        for modifier in recipe.modifiers:
            if modifier.stage == stage:
                modifier.apply(ctx)

    run_stage("transform")
    ctx.plan = build_plan(model, recipe, ctx.overrides)
    run_stage("weights")
    qm = attach(model, ctx.plan)
    ctx.qm = qm
    run_stage("attach")
    if qm.needs_calibration:
        qm.calibrate(calib(), progress=progress)
    run_stage("quantized")
    return qm, ctx.findings


@dataclass
class Session:
    """One model and one evaluation text, reused across recipes (compare runs many)."""

    model_source: str = DEFAULT_MODEL
    data_dir: str | None = None
    dataset: str = "wikitext2"
    split: str = "test"
    seqlen: int = 2048
    max_windows: int | None = None
    dtype: str = "float32"
    device: str | None = None
    kl: bool = True
    progress: bool = True
    # Precompute the reference log-probs when they fit in this many bytes; else run side by side.
    reference_budget_bytes: int = 4 << 30
    # Evaluators run after perplexity on every model (e.g. zero-shot tasks); see spikequant.eval.base.
    evaluators: list = field(default_factory=list)
    _loaded: LoadedModel | None = field(default=None, repr=False)
    _text: Text | None = field(default=None, repr=False)
    _windows: torch.Tensor | None = field(default=None, repr=False)
    _reference: Any = field(default=None, repr=False)
    _calib_cache: dict = field(default_factory=dict, repr=False)
    load_seconds: float = 0.0

    def load(self) -> None:
        if self._loaded is None:
            t = time.perf_counter()
            # Data first: a bad --data-dir fails in a second, not after loading the model.
            self._text = load_text(self.dataset, self.split, self.data_dir)
            self.check_evaluators()  # e.g. lm-eval present, task names known: before the model loads
            self._loaded = load_model(self.model_source, self.dtype, self.device)
            self._windows = eval_windows(tokenize(self._loaded.tokenizer, self._text), self.seqlen, self.max_windows,
                                         self._text.max_windows)
            self.load_seconds = time.perf_counter() - t

    @property
    def loaded(self) -> LoadedModel:
        self.load()
        assert self._loaded is not None
        return self._loaded

    @property
    def windows(self) -> torch.Tensor:
        self.load()
        assert self._windows is not None
        return self._windows

    def calibration(self, recipe: Recipe, tokenizer: Any = None) -> torch.Tensor:
        """The recipe's calibration windows (``tokenizer``: instead of the loaded model's, e.g. a streamed
        model's, so nothing is loaded whole)."""
        c = recipe.calibration
        key = (c.dataset, c.split, c.num_samples, c.seqlen, recipe.seed)
        if key not in self._calib_cache:
            text = load_text(c.dataset, c.split, self.data_dir)
            ids = tokenize(tokenizer or self.loaded.tokenizer, text)
            self._calib_cache[key] = (calibration_windows(ids, c.seqlen, c.num_samples, recipe.seed), text)
        return self._calib_cache[key][0]

    def reference(self):
        """The unquantized model's log-probs on the windows (or the model itself if they are too big)."""
        if self._reference is None:
            n, s = self.windows.shape
            size = n * (s - 1) * self.loaded.model.config.vocab_size * 4
            if size <= self.reference_budget_bytes:
                self._reference = reference_logprobs(self.loaded.model, self.windows, self.progress)
            else:
                self._reference = self.loaded.model
        return self._reference

    def run(self, recipe: Recipe) -> tuple[dict[str, Any], QuantizedModel | None]:
        """Quantize a fresh copy of the model by ``recipe``, evaluate it, and return the report."""
        self.load()
        base = self.loaded.model
        timings: dict[str, float] = {"load_s": round(self.load_seconds, 3)}
        qm = None
        findings: dict[str, Any] = {}
        if recipe.is_float:
            model = base
            timings["quantize_s"] = 0.0
        else:
            t = time.perf_counter()
            model = copy.deepcopy(base)
            qm, findings = quantize(model, recipe, lambda: self.calibration(recipe), self.progress)
            timings["quantize_s"] = round(time.perf_counter() - t, 3)
        reference = self.reference() if (self.kl and not recipe.is_float) else None
        evaluation = self.evaluate(model, self.loaded.tokenizer, self.windows, reference, recipe)
        if recipe.is_float and self.kl:
            evaluation["metrics"].update(kl=0.0, top1=1.0)  # the model is its own reference
        timings["eval_s"] = evaluation["seconds"]
        return self.report(recipe, evaluation, qm, findings, timings), qm

    def check_evaluators(self) -> None:
        """Run each evaluator's ``check()`` (what can fail before a model is loaded), where it has one."""
        for ev in self.evaluators:
            check = getattr(ev, "check", None)
            if check is not None:
                check()

    def evaluator(self, name: str) -> Any:
        """The evaluator called ``name`` in :attr:`evaluators`, or None."""
        return next((ev for ev in self.evaluators if ev.name == name), None)

    def evaluate(self, model: nn.Module, tokenizer: Any, windows: torch.Tensor, reference: Any,
                 recipe: Recipe) -> dict[str, Any]:
        """Run the perplexity evaluator and :attr:`evaluators` on ``model`` (as it is, in memory)."""
        t = time.perf_counter()
        ctx = EvalContext(tokenizer=tokenizer, reference=reference, progress=self.progress,
                          desc=f"eval {recipe.name}")
        metrics, columns, details = run_evaluators([PerplexityEvaluator(windows), *self.evaluators], model, ctx)
        return {"metrics": metrics, "columns": columns, "details": details,
                "seconds": round(time.perf_counter() - t, 3)}

    def report(self, recipe: Recipe, evaluation: dict[str, Any], qm: QuantizedModel | None, findings: dict,
               timings: dict[str, float]) -> dict[str, Any]:
        assert self._text is not None
        model = self.loaded.model
        calib = None
        if qm is not None and self._calib_cache:
            c = recipe.calibration
            hit = self._calib_cache.get((c.dataset, c.split, c.num_samples, c.seqlen, recipe.seed))
            if hit is not None:
                calib = {**vars(c), "name": hit[1].name, "source": hit[1].source, "sha256": hit[1].sha256,
                         "unk_word_share": hit[1].unk_share}
        metrics = evaluation["metrics"]
        ppl_info = evaluation["details"]["perplexity"]
        return {
            # The perplexity evaluator's metrics, also at the top level (the documented report schema).
            "ppl": metrics["ppl"],
            "kl": metrics["kl"],
            "top1": metrics["top1"],
            "metrics": metrics,
            "metric_columns": evaluation["columns"],
            "evaluation": {k: v for k, v in evaluation["details"].items() if k != "perplexity"},
            "recipe": recipe.to_dict(),
            "seed": recipe.seed,
            "data_sha256": self._text.sha256,
            "data": {"name": self._text.name, "source": self._text.source, "sha256": self._text.sha256,
                     "seqlen": self.seqlen, "windows": ppl_info["windows"], "tokens": ppl_info["tokens"],
                     "calibration": calib},
            "model": {"source": self.model_source, "class": type(model).__name__,
                      "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                      "device": str(next(model.parameters()).device)},
            "quantization": None if qm is None else {
                "high_precision_share": qm.high_precision_share(),
                "effective_weight_bits": qm.effective_weight_bits(),
                "quantized_linears": sum(not m.is_float for m in qm.plan.values()),
                "float_linears": [n for n, m in qm.plan.items() if m.is_float],
                "findings": findings,
            },
            "timings": timings,
            "environment": environment(),
        }


def save_report_files(reports: list[dict[str, Any]], json_path: str | Path | None,
                      md_path: str | Path | None, title: str) -> None:
    from spikequant.reports import report_markdown, write_json, write_text

    if json_path:
        write_json(reports[0] if len(reports) == 1 else {"results": reports}, json_path)
    if md_path:
        write_text(report_markdown(reports, title), md_path)


def run_saved(session: Session, path: str | Path, backend: str = "float") -> tuple[dict[str, Any], Recipe]:
    """Evaluate a directory written by ``quantize --output``, or a compressed-tensors checkpoint (``export``;
    loaded through transformers + compressed-tensors, see :func:`spikequant.models.load_model`); the base
    model it names is the KL reference (and is only loaded when KL is asked for). ``backend``
    (``spikequant.backends``, spikequant folders only): ``float`` runs the fake-quant model as loaded,
    ``int8`` its int8 kernels, ``bf16`` the model in bfloat16."""
    from spikequant.export import load_quantized
    from spikequant.export.compressed import FORMAT, is_compressed_tensors_dir, load_compressed

    session.check_evaluators()
    t = time.perf_counter()
    compressed = is_compressed_tensors_dir(path)
    qm: QuantizedModel | None
    if compressed:
        if backend != "float":
            raise RecipeError(f"--backend {backend}: {path} is a compressed-tensors checkpoint; the backends run "
                              "folders written by spikequant quantize")
        loaded, manifest = load_compressed(path, session.dtype, session.device)
        recipe = Recipe.from_dict(manifest["recipe"], f"{path}") if manifest.get("recipe") else Recipe(name=FORMAT)
        qm = None
        if session.kl and not manifest.get("base_model"):
            raise RecipeError(f"{path} does not name its base model (not exported by spikequant): pass --no-kl")
    else:
        if backend == "int8":
            import json

            from spikequant.backends.int8 import check_manifest
            from spikequant.export.saving import MANIFEST

            check_manifest(json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8")), str(path))
        loaded, qm, recipe, manifest = load_quantized(path, session.dtype, session.device)
        if backend != "float":
            from spikequant.backends import prepare

            prepare(loaded.model, loaded.tokenizer, backend, str(path), recipe.name)
    load_s = time.perf_counter() - t
    session.model_source = manifest.get("base_model") or str(path)
    if session.kl:
        session.load()
        reference = session.reference()
        windows = session.windows
        text = session._text
    else:
        text = load_text(session.dataset, session.split, session.data_dir)
        windows = eval_windows(tokenize(loaded.tokenizer, text), session.seqlen, session.max_windows, text.max_windows)
        session._text, session._loaded, session._windows = text, loaded, windows
        reference = None
    evaluation = session.evaluate(loaded.model, loaded.tokenizer, windows, reference, recipe)
    rep = session.report(recipe, evaluation, qm, manifest.get("findings", {}),
                         {"load_s": round(load_s, 3), "quantize_s": 0.0, "eval_s": evaluation["seconds"]})
    rep["model"]["source"] = str(path)
    rep["model"]["base_model"] = manifest.get("base_model")
    rep["model"]["backend"] = backend
    if compressed:
        rep["model"]["format"] = FORMAT
        rep["model"]["compressed_tensors"] = manifest.get("compressed_tensors")
    return rep, recipe
