"""Gradual Binary Search (GBS): per-(layer, quantizer) activation clip ratios by bisection on an objective.

The paper's procedure, as its code runs it (``lucasmaisonnave/Gradual-Binary-Search``,
``QuaRot/fake_quant/RotateGridSearch.py``, ``GridSearch.search``):

- weights are quantized before the search; the V cache is quantized in every layer from the start; the
  activation and K-cache quantizers of slots not yet searched pass through (the code starts them at 16
  bits): the model is quantized gradually;
- layers 0 → L−1 (``reverse``: L−1 → 0, slots in reverse too, as the code's ``inv``), eight slots per
  layer in :data:`SLOTS` order; the ``v_proj`` ratio also clips the V cache;
- per slot: [a, b] = [0, 1], m = 0.5, f(m); then up to ``iterations`` times while b − a > ``epsilon``:
  x = (a+m)/2 on even iterations, (m+b)/2 on odd ones; if f(x) < f(m) the interval moves to x's side of
  m and m ← x, else x's side is cut off. The slot is frozen at m. One evaluation per iteration (the
  paper's text says two; the code does one, and so do we).

Two modes share that search space and accept rule:

- ``exact``: f = perplexity of the whole model on the calibration windows, nothing cached: the paper's
  objective (its calibration text is a contiguous 10 % prefix of WikiText-2 train).
- ``fast`` (ours): the hidden states entering layer l do not change while l is searched (earlier slots
  are frozen, later ones pass through), so they are computed once per layer and every probe runs layer
  l only. ``objective: layer`` scores a probe by the relative error of layer l's output against the same
  layer in the reference stream (quantized weights, float activations and KV cache), averaged over
  tokens: ‖y − y_ref‖² / ‖y_ref‖². ``objective: ppl`` keeps the paper's perplexity and only skips the
  prefix (layers before l run once per layer, not once per probe).

The state is written atomically after every probe (:func:`gbs_search` ``state_path``); a run killed at
any point resumes to the same ratios.

A streamed model (``spikequant.streaming``: decoder layers without tensors until loaded) is searched by the
same code: every layer forward goes through the runner's :func:`~spikequant.models.runner.loaded_layer`
(a no-op in memory), fast mode holds the layers a probe runs while their layer is searched, and the
whole-model perplexity runs one layer at a time (:func:`calibration_ppl`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from spikequant.algorithms.base import Modifier, QuantContext, register, require_positive_int
from spikequant.algorithms.clip_ratios import QUANTIZER_KEYS, Ratios, activation_quantizers, set_clip_ratio
from spikequant.errors import RecipeError, SpikequantError
from spikequant.models import ArchSpec, decoder_layers, get_arch
from spikequant.models.runner import (
    capture_inputs,
    layer_output,
    layer_source,
    loaded_layer,
    run_layers,
    stopped,
    stopping_at,
)
from spikequant.quant import ActivationQuantizer, QuantizedModel
from spikequant.transforms import installed_attention_transforms

SLOTS = QUANTIZER_KEYS  # q_proj, k_proj, v_proj, k_cache, o_proj, gate_proj, up_proj, down_proj
MODES = ("exact", "fast")
OBJECTIVES = ("layer", "ppl")
# What objective "layer" measures a probe's output against: "float" (default), the reference stream with
# every activation quantizer off from layer 0 on, i.e. the error accumulated up to here; "slot", the same
# computation from the same (quantized) inputs with the searched slot passing through, i.e. only the error
# this slot's quantization adds. On SmolLM2 "slot" agreed more often with exact mode's single decisions
# but ended further from it (it settles near the MSE-optimal ratio everywhere; docs/gbs.md).
REFERENCES = ("float", "slot")
PRECISIONS = ("float32", "bfloat16")
STATE_VERSION = 1


@dataclass(frozen=True)
class GBSConfig:
    """What one search does. ``layers`` limits the search to the first k layers of the visiting order
    (the others stay pass-through), for comparisons that must fit a small budget."""

    mode: str = "fast"
    objective: str | None = None  # fast mode: layer (default) or ppl; exact mode: ppl only
    iterations: int = 10
    epsilon: float = 1e-3
    reverse: bool = False
    layers: int | None = None
    batch_size: int = 4
    horizon: int = 1  # objective "layer": measure the error this many layers on (1: the slot's own block)
    reference: str = "float"  # objective "layer": see REFERENCES
    # objective "ppl" only: decide f(x) < f(m) batch by batch and stop as soon as the mean per-token NLL
    # difference over the batches seen (at least race_min) is more than race standard errors from 0; 0: off
    race: float = 0.0
    race_min: int = 2
    race_max: int | None = None  # racing: decide by the sign of the mean difference after this many batches
    # objective "ppl" in fast mode: run the probes' forward under torch.autocast(bfloat16) (ours; the
    # cached layer inputs and the final calibration PPL stay in the model's dtype)
    precision: str = "float32"

    def __post_init__(self) -> None:
        require_positive_int(self.horizon, "horizon")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "float32" and (self.mode != "fast" or self.resolved_objective != "ppl"):
            raise ValueError("precision bfloat16 applies to fast mode's ppl objective only")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.mode == "exact" and self.objective not in (None, "ppl"):
            raise ValueError("exact mode's objective is the perplexity (objective: ppl)")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {self.iterations!r}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.layers is not None:
            require_positive_int(self.layers, "layers")
        require_positive_int(self.batch_size, "batch_size")
        if isinstance(self.race, bool) or not isinstance(self.race, (int, float)) or not 0 <= self.race < math.inf:
            raise ValueError(f"race must be a number >= 0 (0: off), got {self.race!r}")
        require_positive_int(self.race_min, "race_min")
        if self.race and (self.mode != "fast" or self.objective not in (None, "ppl")):
            raise ValueError("race decides on the perplexity: it needs mode fast (objective ppl, implied)")
        if self.race and self.race_min < 2:
            raise ValueError(f"race_min must be >= 2 (a standard error needs two batches), got {self.race_min}")
        if self.race_max is not None:
            require_positive_int(self.race_max, "race_max")
            if self.race_max < self.race_min:
                raise ValueError(f"race_max ({self.race_max}) must be >= race_min ({self.race_min})")

    @property
    def resolved_objective(self) -> str:
        if self.mode == "exact" or self.race:
            return "ppl"
        return self.objective or "layer"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "objective": self.resolved_objective}


# --- the bisection, as pure functions ---------------------------------------------------------------

def next_probe(a: float, m: float, b: float, iteration: int) -> float:
    """The code's probe order: left of m on even iterations, right of m on odd ones."""
    return (a + m) / 2 if iteration % 2 == 0 else (m + b) / 2


def step(a: float, m: float, b: float, x: float, better: bool) -> tuple[float, float, float]:
    """The accept rule: a better x becomes m and the interval keeps x's side of the old m; a worse x cuts
    its own side off. Returns the new (a, m, b)."""
    if better:
        return (a, x, m) if x < m else (m, x, b)
    return (x, m, b) if x < m else (a, m, x)


def race_decision(dx: list[float], dm: list[float], z: float, n_min: int, n_all: int,
                  n_max: int | None = None) -> bool | None:
    """The racing test on per-batch mean NLLs of x and m seen so far (equal length, in batch order):
    True (x better) / False when the mean difference is more than ``z`` standard errors from 0 after at
    least ``n_min`` batches (a paired t statistic), or by its sign alone once ``n_max`` batches are seen;
    None (undecided) otherwise, and with every batch seen the caller compares the sums (the exact rule)."""
    n = len(dx)
    if n < n_min or n >= n_all:
        return None
    d = [u - v for u, v in zip(dx, dm, strict=True)]
    mean = sum(d) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)
    if abs(mean) > z * se or (n_max is not None and n >= n_max):
        return mean < 0
    return None


# --- state on disk ------------------------------------------------------------------------------------

def fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """Write, flush and fsync a temporary file beside ``path``, then rename it over ``path``: a reader (or a
    resumed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class SlotResult:
    layer: int
    key: str
    ratio: float
    objective: float
    probes: list[list[float]]  # [x, f(x)] in evaluation order (racing: f over the batches it was run on)
    seconds: float
    batches: list[int] | None = None  # racing: how many batches each decision used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GBSResult:
    config: GBSConfig
    slots: list[SlotResult]
    ratios: Ratios
    probes: int
    layer_forwards: int  # whole decoder-layer forwards, counted per window
    sublayer_forwards: dict[str, int]  # fast mode: attention-only / MLP-only runs of a layer, per window
    search_seconds: float  # this process's time in the search (a resumed run adds the earlier runs')
    calib_ppl: float  # calibration perplexity at the end of the search (in the search's own setting)
    windows: int
    seqlen: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["config"] = self.config.to_dict()
        d["slots"] = [s.to_dict() for s in self.slots]
        d["ratios"] = {str(i): e for i, e in sorted(self.ratios.items())}
        return d


# --- running the model: the shared layer runner (spikequant.models.runner) -----------------------------

ATTENTION_SLOTS = ("q_proj", "k_proj", "v_proj", "k_cache", "o_proj")


def _capture(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[tuple[Any, dict]]:
    return list(capture_inputs(model, windows, batch_size))


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kw: dict) -> torch.Tensor:
    return layer_output(layer(hidden, **kw))


def _attention_part(arch: ArchSpec, layer: nn.Module, hidden: torch.Tensor, kw: dict) -> torch.Tensor:
    """The residual stream after a layer's attention block (the input of its post-attention norm); the
    MLP is not run."""
    caught: list[torch.Tensor] = []
    norm = layer.get_submodule(arch.post_attn_norm)
    handle = norm.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
    try:
        with stopping_at(norm), stopped():
            layer(hidden, **kw)
    finally:
        handle.remove()
    return caught[0]


def _mlp_part(arch: ArchSpec, layer: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """The rest of a pre-norm decoder layer from its post-attention residual: r + mlp(norm(r))."""
    mlp = layer.get_submodule(arch.gate_proj.rsplit(".", 1)[0])
    return residual + mlp(layer.get_submodule(arch.post_attn_norm)(residual))


def _batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[b:b + batch_size] for b in range(0, len(windows), batch_size)]


def _nll_of_hidden(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    arch = get_arch(model)
    h = model.get_submodule(arch.final_norm)(hidden)
    logits = model.get_submodule(arch.lm_head)(h)[:, :-1].float()
    t = targets[:, 1:].to(logits.device)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum")
                 .to(torch.float64))


@torch.no_grad()
def calibration_ppl(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of the whole model over ``windows`` (N, seqlen), each window alone, NLL averaged over
    every predicted token: the paper's objective. A streamed model runs the same batches one decoder
    layer at a time (the runner loads and frees each layer), then the final norm and lm_head: the
    activations of a full forward, bit for bit."""
    if layer_source(model) is not None:
        batches = _batches(windows, batch_size)
        outs = run_layers(model, windows, batch_size=batch_size, progress=False)
        nll = 0.0
        for (h, _), batch in zip(outs, batches, strict=True):
            nll += _nll_of_hidden(model, h, batch)
        return math.exp(nll / sum(b[:, 1:].numel() for b in batches))
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in _batches(windows, batch_size):
        logits = model(batch.to(device), use_cache=False).logits[:, :-1].float()
        t = batch[:, 1:].to(device)
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum")
                     .to(torch.float64))
        count += t.numel()
    return math.exp(nll / count)


def _relative_error(ys: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean over tokens of |y - t|^2 / |t|^2."""
    err, count = 0.0, 0
    for y, r in zip(ys, targets, strict=True):
        y, r = y.float(), r.float()
        e = (y - r).pow(2).sum(-1) / r.pow(2).sum(-1).clamp_min(1e-30)
        err += float(e.sum(dtype=torch.float64))
        count += e.numel()
    return err / count


def _all_quantizers(qm: QuantizedModel) -> list[ActivationQuantizer]:
    out: list[ActivationQuantizer] = [q for _, q in qm.quantizers()]
    for t in installed_attention_transforms(qm.model) or []:
        out += [q for q in (t.k_quantizer, t.v_quantizer) if q is not None]
    return out


@contextmanager
def _float_activations(qm: QuantizedModel) -> Iterator[None]:
    """The reference stream: quantized weights, every activation and KV quantizer off."""
    qs = _all_quantizers(qm)
    before = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield
    finally:
        for q, e in zip(qs, before, strict=True):
            q.enabled = e


# --- the search -----------------------------------------------------------------------------------------

def _v_cache_ids(index: dict[tuple[int, str], list[ActivationQuantizer]]) -> set[int]:
    return {id(q) for (_, k), qs in index.items() if k == "v_cache" for q in qs}


def gradual_start(index: dict[tuple[int, str], list[ActivationQuantizer]]) -> None:
    """Every slot of ``index`` (:func:`activation_quantizers`) as before a search reaches it: only the V
    caches quantize, every other activation and K-cache quantizer passes through."""
    v_cache = _v_cache_ids(index)
    for qs in index.values():
        for q in qs:
            q.enabled = id(q) in v_cache


@dataclass(frozen=True)
class _Rule:
    """How one slot's bisection judges a probe: ``start()`` evaluates what must be known before the first
    probe (True when it evaluated something, so the state is saved), ``decide(x)`` says whether x beats
    the current m (recording the probe), ``f(r)`` is the objective reported for a ratio already judged,
    ``finish()`` completes f(m) when no iteration ran."""
    start: Callable[[], bool]
    decide: Callable[[float], bool]
    f: Callable[[float], float]
    finish: Callable[[], None]


class _Search:
    def __init__(self, qm: QuantizedModel, windows: torch.Tensor, config: GBSConfig,
                 state_path: str | Path | None, progress: bool,
                 on_probe: Callable[[str, int], None] | None) -> None:
        self.qm, self.windows, self.config = qm, windows, config
        self.model = qm.model
        self.layers = decoder_layers(self.model)
        self.index = activation_quantizers(qm)
        self.state_path = None if state_path is None else Path(state_path)
        self.progress, self.on_probe = progress, on_probe
        n = len(self.layers)
        order = list(range(n))[::-1] if config.reverse else list(range(n))
        if config.layers is not None:
            if config.layers > n:
                raise RecipeError(f"gbs: layers={config.layers} but the model has {n} decoder layers")
            order = order[:config.layers]
        slot_order = SLOTS[::-1] if config.reverse else SLOTS
        self.plan = [(i, k) for i in order for k in slot_order if (i, k) in self.index]
        if not self.plan:
            raise RecipeError("gbs: the model has no quantized activation or KV-cache slot to search")
        self.v_cache = _v_cache_ids(self.index)
        self.batches = _batches(windows, config.batch_size)
        self.probes = 0
        self.layer_forwards = 0
        self.sublayer_forwards = {"attention": 0, "mlp": 0}
        self.arch = get_arch(self.model)
        self.seconds = 0.0
        self._cache: dict[str, Any] = {}
        self.source = layer_source(self.model)  # None in memory
        self._held: set[int] = set()
        self._bf16: dict[int, torch.Tensor] | None = None  # precision bfloat16: the linears' weights, cast once
        # each slot's ratios before the search touches it: the V cache (quantized throughout) keeps its own
        # while its slot is switched off for objective "layer"'s reference "slot"
        self.initial = {id(q): q.spec.clip_ratio for qs in self.index.values() for q in qs}

    # state --------------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": self.config.to_dict(), "windows_sha256": fingerprint(self.windows),
                "windows": list(self.windows.shape), "plan": [[i, k] for i, k in self.plan]}

    def load_state(self) -> dict[str, Any] | None:
        if self.state_path is None or not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise SpikequantError(f"gbs: state file {self.state_path} is not valid JSON") from None
        mine = self.identity()
        if isinstance(state.get("config"), dict):  # written before these options: their only behaviour
            state["config"].setdefault("reference", "float")
            state["config"].setdefault("race", 0.0)
            state["config"].setdefault("race_min", 2)
            state["config"].setdefault("race_max", None)
            state["config"].setdefault("precision", "float32")
        for key in mine:
            if state.get(key) != mine[key]:
                raise SpikequantError(f"gbs: state file {self.state_path} was written by a different search "
                                      f"({key} differs); use a new output folder or the same settings")
        return state

    def save_state(self, done: list[SlotResult], current: dict[str, Any] | None) -> None:
        if self.state_path is None:
            return
        write_json_atomic({**self.identity(), "done": [s.to_dict() for s in done], "current": current,
                           "counters": {"probes": self.probes, "layer_forwards": self.layer_forwards,
                                        "sublayer_forwards": self.sublayer_forwards,
                                        "seconds": self.seconds}}, self.state_path)

    # quantizer states ---------------------------------------------------------------------------------
    def set_slot(self, layer: int, key: str, ratio: float) -> None:
        for q in self.index[(layer, key)]:
            q.enabled = True
        set_clip_ratio(self.qm, layer, key, ratio, self.index)

    @contextmanager
    def slot_off(self, layer: int, key: str) -> Iterator[None]:
        """The slot as before the search reached it: its quantizers pass through, the V cache (quantized
        from the start) at its initial ratio; restored on exit."""
        qs = self.index[(layer, key)]
        before = [(q.spec, q.enabled) for q in qs]
        for q in qs:
            if id(q) in self.v_cache:
                if q.spec.clip_ratio != self.initial[id(q)]:
                    q.spec = replace(q.spec, clip_ratio=self.initial[id(q)])
            else:
                q.enabled = False
        try:
            yield
        finally:
            for q, (spec, enabled) in zip(qs, before, strict=True):
                if q.spec is not spec:
                    q.spec = spec
                q.enabled = enabled

    # streamed layers --------------------------------------------------------------------------------
    def probe_layers(self, layer: int) -> range:
        """The decoder layers every probe of ``layer`` runs, held loaded while it is searched (streamed):
        fast mode's layer objective, l .. l+horizon-1; its ppl objective, l (the rest are read per probe,
        as exact mode reads every layer)."""
        if self.config.mode == "exact":
            return range(0)
        if self.config.resolved_objective == "ppl":
            return range(layer, layer + 1)
        return range(layer, min(layer + self.config.horizon, len(self.layers)))

    def hold(self, layers: Iterable[int]) -> None:
        """Keep exactly ``layers`` loaded: the ones the search has moved past are freed."""
        if self.source is None:
            return
        wanted = set(layers)
        for j in sorted(self._held - wanted):
            self.source.unhold(j)
        for j in sorted(wanted - self._held):
            self.source.hold(j)
        self._held = wanted

    @contextmanager
    def loaded(self, layers: Iterable[int]) -> Iterator[None]:
        with ExitStack() as stack:
            for j in layers:
                stack.enter_context(loaded_layer(self.model, j))
            yield

    # objectives ---------------------------------------------------------------------------------------
    def layer_inputs(self, layer: int, stream: str) -> list[tuple[torch.Tensor, dict]]:
        """The (hidden, kwargs) batches entering ``layer`` in the current state (``stream`` "q") or with
        float activations ("ref"); computed from layer 0's inputs, kept for the next layer when the order
        is forward (the same operations either way, so a resumed run sees the same tensors)."""
        key = (stream, layer)
        if key in self._cache:
            return self._cache[key]
        if "h0" not in self._cache:
            self._cache["h0"] = _capture(self.model, self.windows, self.config.batch_size)
        start, hs = 0, self._cache["h0"]
        for j in range(layer, 0, -1):  # nearest cached earlier layer of this stream
            if (stream, j) in self._cache:
                start, hs = j, self._cache[(stream, j)]
                break
        for j in range(start, layer):
            hs = self.run_layer(j, hs, stream)
        self._cache = {k: v for k, v in self._cache.items() if k == "h0" or k[0] != stream}
        self._cache[key] = hs
        return hs

    def run_layer(self, j: int, hs: list[tuple[torch.Tensor, dict]], stream: str):
        self.layer_forwards += len(self.windows)
        with loaded_layer(self.model, j):
            if stream == "ref":
                with _float_activations(self.qm):
                    return [(_run_layer(self.layers[j], h, kw), kw) for h, kw in hs]
            return [(_run_layer(self.layers[j], h, kw), kw) for h, kw in hs]

    @torch.no_grad()
    def objective(self, layer: int, key: str) -> float:
        obj = self.config.resolved_objective
        if self.config.mode == "exact":
            self.layer_forwards += len(self.windows) * len(self.layers)
            return calibration_ppl(self.model, self.windows, self.config.batch_size)
        hs = self.layer_inputs(layer, "q")
        if obj == "ppl":
            # layer by layer over all batches (each batch's operations are those of a batch-by-batch loop),
            # so a streamed model reads each layer once per probe
            ys = [h for h, _ in hs]
            nll, count = 0.0, 0
            with self.probe_precision():
                for j in range(layer, len(self.layers)):
                    with loaded_layer(self.model, j):
                        ys = [_run_layer(self.layers[j], y, kw) for y, (_, kw) in zip(ys, hs, strict=True)]
                for y, batch in zip(ys, self.batches, strict=True):
                    nll += _nll_of_hidden(self.model, y, batch)
                    count += batch[:, 1:].numel()
            self.layer_forwards += len(self.windows) * (len(self.layers) - layer)
            return math.exp(nll / count)
        last = min(layer + self.config.horizon, len(self.layers)) - 1
        with self.loaded(range(layer, last + 1)):
            return self.block_error(layer, key, hs, last)

    def batch_nll(self, layer: int, k: int) -> float:
        """Racing: the summed NLL of calibration batch ``k`` in the current state, from the cached inputs of
        ``layer`` through the rest of the model (the same operations as objective ppl on that batch)."""
        y, kw = self.layer_inputs(layer, "q")[k]
        with self.probe_precision():
            for j in range(layer, len(self.layers)):
                with loaded_layer(self.model, j):
                    y = _run_layer(self.layers[j], y, kw)
            self.layer_forwards += len(self.batches[k]) * (len(self.layers) - layer)
            return _nll_of_hidden(self.model, y, self.batches[k])

    @contextmanager
    def probe_precision(self) -> Iterator[None]:
        """Precision "bfloat16": torch.autocast to bfloat16, with the linears' (already fake-quantized)
        weights swapped for bfloat16 copies made once (autocast would cast them on every call); in memory
        only, a streamed model's layers are cast per call. Float32: nothing."""
        if self.config.precision != "bfloat16":
            yield
            return
        params: dict[int, nn.Parameter] = {}
        if self.source is None:
            params = {id(m.weight): m.weight for m in self.model.modules() if isinstance(m, nn.Linear)}
            if self._bf16 is None:
                self._bf16 = {k: p.detach().to(torch.bfloat16) for k, p in params.items()}
        saved = {k: p.data for k, p in params.items()}
        try:
            for k, p in params.items():
                p.data = self._bf16[k]
            with torch.autocast(next(self.model.parameters()).device.type, dtype=torch.bfloat16):
                yield
        finally:
            for k, p in params.items():
                p.data = saved[k]

    def block_error(self, layer: int, key: str, hs: list[tuple[torch.Tensor, dict]], last: int) -> float:
        """Objective "layer": the searched slot's own block (attention or MLP) of layer l, against a reference
        (``config.reference``: the same block with the slot passing through, or the float reference stream);
        with a horizon, the output of layer ``last`` instead."""
        if self.config.reference == "slot":
            tkey = ("slot_ref", layer, key)
            if tkey not in self._cache:
                with self.slot_off(layer, key):
                    self._cache[tkey] = self.probe_outputs(layer, key, hs, last)
            target = self._cache[tkey]
        else:
            target = self.float_reference(layer, key, hs, last)
        return _relative_error(self.probe_outputs(layer, key, hs, last), target)

    def float_reference(self, layer: int, key: str, hs: list[tuple[torch.Tensor, dict]],
                        last: int) -> list[torch.Tensor]:
        """What reference "float" compares with: the same block (or layer ``last``'s output) in the stream
        whose activations were never quantized."""
        arch, mod = self.arch, self.layers[layer]
        if ("ref_attention", layer) not in self._cache:
            ref_in = self.layer_inputs(layer, "ref")
            with _float_activations(self.qm):
                mid = [_attention_part(arch, mod, h, kw) for h, kw in ref_in]
                self._cache[("ref_attention", layer)] = mid
                self._cache[("ref_mlp", layer)] = [_mlp_part(arch, mod, r) for r in mid]
            self.layer_forwards += len(self.windows)
        if last == layer:
            return self._cache[("ref_" + ("attention" if key in ATTENTION_SLOTS else "mlp"), layer)]
        if ("ref_h", layer) not in self._cache:
            ref = self._cache[("ref_mlp", layer)]
            with _float_activations(self.qm):
                for j in range(layer + 1, last + 1):
                    ref = [_run_layer(self.layers[j], r, kw) for r, (_, kw) in zip(ref, hs, strict=True)]
            self._cache[("ref_h", layer)] = ref
            self.layer_forwards += len(self.windows) * (last - layer)
        return self._cache[("ref_h", layer)]

    def probe_outputs(self, layer: int, key: str, hs: list[tuple[torch.Tensor, dict]],
                      last: int) -> list[torch.Tensor]:
        """The searched slot's block of layer l in the current state (attention slots: up to the
        post-attention norm; MLP slots: from the cached post-attention residual), or with a horizon the
        output of layer ``last`` (layer l finished, then the next layers)."""
        arch, mod = self.arch, self.layers[layer]
        part = "attention" if key in ATTENTION_SLOTS else "mlp"
        if part == "attention":
            ys = [_attention_part(arch, mod, h, kw) for h, kw in hs]
        else:
            if ("q_mid", layer) not in self._cache:  # attention slots are frozen (or pass through) by now
                self._cache[("q_mid", layer)] = [_attention_part(arch, mod, h, kw) for h, kw in hs]
                self.sublayer_forwards["attention"] += len(self.windows)
            ys = [_mlp_part(arch, mod, r) for r in self._cache[("q_mid", layer)]]
        self.sublayer_forwards[part] += len(self.windows)
        if last > layer:  # horizon: finish layer l, then the next layers (in the current state) as well
            if part == "attention":
                ys = [_mlp_part(arch, mod, y) for y in ys]
                self.sublayer_forwards["mlp"] += len(self.windows)
            for j in range(layer + 1, last + 1):
                ys = [_run_layer(self.layers[j], y, kw) for y, (_, kw) in zip(ys, hs, strict=True)]
            self.layer_forwards += len(self.windows) * (last - layer)
        return ys

    def forget_layer(self, layer: int) -> None:
        """Layer ``layer`` is frozen: keep its output as the next layer's input (forward order)."""
        if self.config.mode == "exact" or self.config.reverse or ("q", layer) not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k == "h0"}
            return
        nxt = layer + 1
        if nxt < len(self.layers):
            self._cache[("q", nxt)] = self.run_layer(layer, self._cache[("q", layer)], "q")
            if ("ref", layer) in self._cache:  # the full layer, as a resumed run computes it from layer 0
                self._cache[("ref", nxt)] = self.run_layer(layer, self._cache[("ref", layer)], "ref")
        self._cache = {k: v for k, v in self._cache.items() if k == "h0" or k[1] == nxt}

    def record(self, st: dict[str, Any], x: float, fx: float) -> float:
        """Count a probe of the current slot and add [x, f(x)] to its state."""
        self.probes += 1
        if self.on_probe is not None:
            self.on_probe("evaluated", self.probes)
        st["probes"].append([x, fx])
        return fx

    def search_slot(self, n: int, st: dict[str, Any], done: list[SlotResult], bar: Any, t0: float,
                    seconds0: float) -> SlotResult:
        """Bisection of one slot from its state ``st`` (fresh, or as saved), saving after every probe.
        The loop is the authors' (``next_probe``, ``step``); how a probe x is judged against m is the
        rule's: the exact rule (f over every window, ``_exact_rule``) or racing (``_racing_rule``)."""
        cfg = self.config
        layer, key = st["layer"], st["key"]
        t_slot, prior = time.perf_counter(), st.get("seconds", 0.0)

        def save() -> None:
            self.seconds = seconds0 + time.perf_counter() - t0
            st["seconds"] = prior + time.perf_counter() - t_slot
            self.save_state(done, st)
            if self.on_probe is not None:
                self.on_probe("saved", self.probes)
            bar.update(1)
            bar.set_postfix_str(f"layer {layer} {key} ({n + 1}/{len(self.plan)}) m={st['m']:.4f} f={st['fm']:.5g}")

        rule = self._racing_rule(st) if cfg.race else self._exact_rule(st)
        if rule.start():
            save()
        while st["b"] - st["a"] > cfg.epsilon and st["iteration"] < cfg.iterations:
            x = next_probe(st["a"], st["m"], st["b"], st["iteration"])
            better = rule.decide(x)
            st["a"], st["m"], st["b"] = step(st["a"], st["m"], st["b"], x, better)
            st["fm"] = rule.f(st["m"])
            st["iteration"] += 1
            save()
        rule.finish()
        self.set_slot(layer, key, st["m"])
        return SlotResult(layer, key, st["m"], st["fm"], st["probes"], prior + time.perf_counter() - t_slot,
                          list(st["batches"]) if cfg.race else None)

    def _exact_rule(self, st: dict[str, Any]) -> _Rule:
        """The authors' rule: f(x) is the objective on every window; x is better when f(x) < f(m)."""
        layer, key = st["layer"], st["key"]
        values: dict[float, float] = {x: fx for x, fx in st["probes"]}

        def probe(x: float) -> float:
            self.set_slot(layer, key, x)
            values[x] = self.record(st, x, self.objective(layer, key))
            return values[x]

        def start() -> bool:  # f(m) first, as the authors' fm = f(m); a resumed slot has it
            if st["fm"] is None:
                st["fm"] = probe(st["m"])
                return True
            values[st["m"]] = st["fm"]
            return False

        return _Rule(start=start, decide=lambda x: probe(x) < st["fm"], f=lambda r: values[r], finish=lambda: None)

    def _racing_rule(self, st: dict[str, Any]) -> _Rule:
        """Racing: each probe x runs batch by batch against m (m's batches are computed when a decision
        first needs them, then kept in ``st["nll"]``, so a resumed run has them too) and stops once
        ``race_decision`` is sure; with every batch seen, the exact rule on the sums. ``probes`` records f
        over the batches each ratio was run on, ``batches`` how many each decision used."""
        cfg, layer, key = self.config, st["layer"], st["key"]
        n_all = len(self.batches)
        tokens = [b[:, 1:].numel() for b in self.batches]
        nll: dict[str, list[float | None]] = st.setdefault("nll", {})
        used: list[int] = st.setdefault("batches", [])

        def unit(r: float, k: int) -> float:
            row = nll.setdefault(repr(r), [None] * n_all)
            if row[k] is None:
                self.set_slot(layer, key, r)
                row[k] = self.batch_nll(layer, k)
            return row[k]

        def ppl(r: float) -> float:
            seen = [k for k, v in enumerate(nll[repr(r)]) if v is not None]
            return math.exp(sum(nll[repr(r)][k] for k in seen) / sum(tokens[k] for k in seen))

        def decide(x: float) -> bool:
            m = st["m"]
            dx: list[float] = []
            dm: list[float] = []
            better = None
            for k in range(n_all):
                dx.append(unit(x, k) / tokens[k])
                dm.append(unit(m, k) / tokens[k])
                better = race_decision(dx, dm, cfg.race, cfg.race_min, n_all, cfg.race_max)
                if better is not None:
                    break
            if better is None:  # every batch seen: the exact rule on the sums
                better = sum(nll[repr(x)]) < sum(nll[repr(m)])
            self.record(st, x, ppl(x))
            used.append(len(dx))
            return better

        def finish() -> None:
            if repr(st["m"]) not in nll:  # no iteration ran: f(m) on every batch, as exact mode's first probe
                for k in range(n_all):
                    unit(st["m"], k)
                st["fm"] = ppl(st["m"])

        return _Rule(start=lambda: False, decide=decide, f=ppl, finish=finish)

    # the loop -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> GBSResult:
        cfg = self.config
        qs = _all_quantizers(self.qm)
        enabled_before = [q.enabled for q in qs]
        state = self.load_state()
        done = [SlotResult(**s) for s in state["done"]] if state else []
        current = state["current"] if state else None
        if state:
            c = state["counters"]
            self.probes, self.layer_forwards, self.seconds = c["probes"], c["layer_forwards"], c["seconds"]
            self.sublayer_forwards = dict(c["sublayer_forwards"])
        gradual_start(self.index)  # each slot switches on when the search reaches it
        for s in done:
            self.set_slot(s.layer, s.key, s.ratio)
        finished = {(s.layer, s.key) for s in done}
        total = len(self.plan) * (cfg.iterations + (0 if cfg.race else 1))  # racing: m runs inside decisions
        bar = tqdm(total=total, initial=min(total, self.probes), desc=f"gbs {cfg.mode}", unit="probe",
                   disable=not self.progress)
        t0 = time.perf_counter()
        seconds0 = self.seconds
        try:
            for n, (layer, key) in enumerate(self.plan):
                if (layer, key) in finished:
                    continue
                if current is not None and (current["layer"], current["key"]) == (layer, key):
                    st = current
                else:
                    st = {"layer": layer, "key": key, "a": 0.0, "b": 1.0, "m": 0.5, "fm": None, "iteration": 0,
                          "probes": [], "seconds": 0.0}
                current = None
                self.hold(self.probe_layers(layer))
                done.append(self.search_slot(n, st, done, bar, t0, seconds0))
                nxt = self.plan[n + 1][0] if n + 1 < len(self.plan) else None
                if nxt != layer:
                    self.forget_layer(layer)
                self.seconds = seconds0 + time.perf_counter() - t0
                self.save_state(done, None)
        finally:
            bar.close()
            self.hold(())
        self._cache.clear()
        calib = calibration_ppl(self.model, self.windows, cfg.batch_size)
        ratios: Ratios = {}
        for s in done:
            ratios.setdefault(s.layer, {})[s.key] = s.ratio
        for q, e in zip(qs, enabled_before, strict=True):
            q.enabled = e
        return GBSResult(cfg, done, {i: ratios[i] for i in sorted(ratios)}, self.probes, self.layer_forwards,
                         dict(self.sublayer_forwards),
                         self.seconds, calib, len(self.windows), int(self.windows.shape[1]))


def gbs_search(qm: QuantizedModel, calib_windows: torch.Tensor, config: GBSConfig | None = None,
               state_path: str | Path | None = None, progress: bool = True,
               on_probe: Callable[[str, int], None] | None = None) -> GBSResult:
    """Search the clip ratios of ``qm``'s activation and K-cache quantizers (and of the V cache through
    ``v_proj``) on ``calib_windows`` (N, seqlen) and leave them set on ``qm``. With ``state_path``, the
    search state is written there after every probe and an existing state file is resumed.

    ``calib_ppl`` in the result is measured in the search's final state: with ``config.layers`` set,
    the layers outside the search still pass through. On return every quantizer is switched back on."""
    config = config or GBSConfig()
    if calib_windows.dim() != 2 or len(calib_windows) == 0:
        raise SpikequantError(f"gbs: calibration windows must be a non-empty (N, seqlen) tensor, "
                              f"got shape {tuple(calib_windows.shape)}")
    if next(qm.model.parameters()).device.type == "cpu":
        torch.set_flush_denormal(True)  # fake-quantized activations produce denormals that slow CPU math
    return _Search(qm, calib_windows, config, state_path, progress, on_probe).run()


# --- outputs ----------------------------------------------------------------------------------------------

def ratio_matrix(ratios: Ratios, n_layers: int) -> list[list[float | None]]:
    return [[ratios.get(i, {}).get(k) for k in SLOTS] for i in range(n_layers)]


def plot_heatmap(ratios: Ratios, n_layers: int, path: str | Path, title: str = "") -> Path:
    """Layers × slots heatmap of the ratios (blank: not searched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.array([[np.nan if v is None else v for v in row] for row in ratio_matrix(ratios, n_layers)])
    fig, ax = plt.subplots(figsize=(6.5, max(3.0, 0.22 * n_layers + 1.2)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(SLOTS)), [s.replace("_proj", "") for s in SLOTS], rotation=45, ha="right")
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.set_ylabel("layer")
    ax.set_title(title or "GBS clip ratios")
    fig.colorbar(im, ax=ax, label="clip ratio")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_markdown(report: dict[str, Any]) -> str:
    r = report["result"]
    cfg = r["config"]
    race = "off"
    if cfg.get("race"):
        race = f"{cfg['race']:g} (min {cfg['race_min']}, max {cfg.get('race_max') or 'all'} batches)"
    lines = [f"# GBS search: {report.get('recipe', {}).get('name', '?')} on {report.get('model', '?')}", "",
             f"mode {cfg['mode']}, objective {cfg['objective']}, iterations {cfg['iterations']}, "
             f"epsilon {cfg['epsilon']}, reverse {cfg['reverse']}, layers {cfg['layers'] or 'all'}, "
             f"race {race}, "
             f"precision {cfg.get('precision', 'float32')}; "
             f"calibration {r['windows']} x {r['seqlen']} tokens", "",
             f"- probes: {r['probes']}; decoder-layer forwards (per window): {r['layer_forwards']} whole layers, "
             f"{r['sublayer_forwards']['attention']} attention blocks, {r['sublayer_forwards']['mlp']} MLP blocks",
             f"- search wall time: {r['search_seconds']:.1f} s",
             f"- calibration PPL at the end of the search: {r['calib_ppl']:.4f}"]
    for k, v in r.get("extra", {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| layer | slot | ratio | objective | probes | batches per decision | s |",
              "|---:|---|---:|---:|---:|---|---:|"]
    for s in r["slots"]:
        used = ", ".join(map(str, s["batches"])) if s.get("batches") is not None else "all"
        lines.append(f"| {s['layer']} | {s['key']} | {s['ratio']:.4f} | {s['objective']:.6g} | "
                     f"{len(s['probes'])} | {used} | {s['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


# --- the modifier ---------------------------------------------------------------------------------------

@register
@dataclass
class GBS(Modifier):
    """Gradual Binary Search of the clip ratios, run on the quantized model (stage ``quantized``: after the
    quantizers are attached and static scales calibrated) on the first ``num_samples`` calibration
    windows (default: all of the recipe's)."""

    type = "gbs"
    stage: ClassVar[str] = "quantized"
    mode: str = "fast"
    objective: str | None = None
    iterations: int = 10
    epsilon: float = 1e-3
    reverse: bool = False
    layers: int | None = None
    num_samples: int | None = None
    batch_size: int = 4
    horizon: int = 1
    reference: str = "float"
    race: float = 0.0
    race_min: int = 2
    race_max: int | None = None
    precision: str = "float32"

    def __post_init__(self) -> None:
        self.config()  # validate now: a bad value is a RecipeError at load time
        if self.num_samples is not None:
            require_positive_int(self.num_samples, "num_samples")

    def config(self) -> GBSConfig:
        return GBSConfig(self.mode, self.objective, self.iterations, self.epsilon, self.reverse, self.layers,
                         self.batch_size, self.horizon, self.reference, self.race, self.race_min,
                         self.race_max, self.precision)

    def apply(self, ctx: QuantContext) -> None:
        qm = getattr(ctx, "qm", None)
        if qm is None:
            raise RecipeError("gbs runs on the quantized model (stage 'quantized'); this pipeline has no such "
                              "stage yet: use `spikequant search`")
        windows = ctx.calibration_windows()
        if self.num_samples is not None:
            windows = windows[: self.num_samples]
        res = gbs_search(qm, windows, self.config(), progress=ctx.progress)
        ctx.findings["gbs"] = {"config": self.config().to_dict(), "windows": res.windows, "seqlen": res.seqlen,
                               "probes": res.probes, "layer_forwards": res.layer_forwards,
                               "sublayer_forwards": res.sublayer_forwards,
                               "search_seconds": round(res.search_seconds, 3), "calib_ppl": res.calib_ppl,
                               "ratios": {str(i): e for i, e in res.ratios.items()}}
