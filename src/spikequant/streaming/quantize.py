"""Quantize a model that does not fit in memory: one decoder layer at a time, written as it is done.

The in-memory pipeline (:func:`spikequant.pipeline.quantize`) runs each stage over the whole model:
transforms, the plan, GPTQ (a pass on the layer runner), attaching, static calibration (another pass).
Every stage but one is already local to a layer, so here they run back to back on each layer while it is
loaded, with the same functions:

1. before the loop, what needs all layers at once: the spike detection of ``spike_exempt`` /
   ``random_exempt`` (max |input| of every linear on the float model, compared to the median over all
   of them) runs unchanged on the streamed model (a read-only pass of the layer runner); then the plan;
   then the rotation's ends (embedding, final norm into lm_head, online hooks: :class:`LayerwiseRotation`);
   with ``smoothquant`` listed before ``rotate``, SmoothQuant's statistics too (``channel_maxima``, a
   read-only pass ahead of the online hooks);
2. for layer ``i``: SmoothQuant's statistics on the float stream (the windows through the float, unfolded
   layers before it, as ``smooth_model``'s statistics pass sees them), which then runs through the still
   unfolded layer, and the layer's folds (``smooth_layer``); its share of the rotation; GPTQ on the GPTQ
   stream (the calibration windows after the GPTQ-quantized layers before it, float activations and KV
   cache, as ``gptq_model`` sees them), which then runs through the quantized layer; attaching the layer's
   quantizers (RTN weights) and its KV quantizers; static calibration on the calibration stream (the windows
   after the quantized layers before it, static quantizers observing, as :meth:`QuantizedModel.calibrate`
   sees them), which runs through the layer while observing; the layer's clip ratios (after calibration, as
   the in-memory ``clip_ratios`` modifier sets them); then the layer is written (one safetensors shard), its
   quantizer state and the streams are saved for a resume, and its tensors are freed;
3. at the end: the ends' quantization (lm_head when targeted), the index, config, tokenizer,
   ``quantization.safetensors`` and ``spikequant.json``: the directory ``save_quantized`` writes, which
   ``load_quantized`` and the streamed evaluation read alike.

The streams hold one tensor per batch of windows, in memory or, past ``memory_limit`` bytes, in a
memory-mapped file under the output's ``.stream/``. An interrupted run leaves ``.stream/state.json``;
the same command resumes at the next layer. Results equal the in-memory pipeline's bit for bit
(``tests/streaming``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from spikequant.algorithms.base import QuantContext
from spikequant.algorithms.clip_ratios import (
    Ratios,
    activation_quantizers,
    check_ratio_targets,
    in_key_order,
    set_clip_ratio,
)
from spikequant.algorithms.smoothquant import channel_max_hooks, channel_maxima
from spikequant.errors import SpikequantError
from spikequant.export.saving import FORMAT_VERSION, MANIFEST, QPARAMS, build_manifest, qparam_tensors
from spikequant.models.arch import get_arch
from spikequant.models.runner import capture_inputs, loaded_layer
from spikequant.quant import ModuleQuant, QuantizedModel, QuantSpec, attach, set_weight_qparams
from spikequant.quant.apply import SLOTS
from spikequant.quant.observers import STATE_KEYS
from spikequant.recipes import Recipe
from spikequant.streaming.activations import Stream
from spikequant.streaming.checkpoint import StreamedModel, peak_rss_bytes
from spikequant.transforms import LayerwiseRotation, original_sizes
from spikequant.transforms.online import attention_transforms

STATE_DIR = ".stream"
STATE = "state.json"
SMOOTH_STATS = "smooth-stats.safetensors"
INDEX = "model.safetensors.index.json"
# Modifiers that have a streamed form here; any other stops the run before it starts.
DETECTION = ("spike_exempt", "random_exempt")
STREAMED = (*DETECTION, "smoothquant", "rotate", "gptq", "kv_cache", "clip_ratios")


class StreamingError(SpikequantError):
    pass


def check_streamable(recipe: Recipe) -> None:
    """Fail (one line naming the modifier) on a recipe the streamed pipeline cannot run."""
    seen: list[str] = []
    for m in recipe.modifiers:
        if m.type == "gbs":  # it probes the whole quantized model, which a one-pass quantize never holds
            raise StreamingError(f"recipe {recipe.name!r}: the gbs modifier does not run inside a streamed quantize; "
                                 "quantize without it, then run `spikequant search --model DIR --offload disk`")
        if m.type not in STREAMED:
            raise StreamingError(f"recipe {recipe.name!r}: modifier {m.type!r} has no streamed form (streamed: "
                                 f"{', '.join(STREAMED)}); run it in memory with --offload none")
        for before in ("rotate", "smoothquant"):
            if m.type in DETECTION and before in seen:
                raise StreamingError(f"recipe {recipe.name!r}: {m.type} after {before} is not streamed (detection "
                                     "runs on the model as loaded); list it first or use --offload none")
        if m.type in ("smoothquant", "clip_ratios") and m.type in seen:
            raise StreamingError(f"recipe {recipe.name!r}: {m.type} listed twice is not streamed; merge them or use "
                                 "--offload none")
        seen.append(m.type)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _atomic_json(data: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _plan_to_dict(plan: dict[str, ModuleQuant]) -> dict[str, Any]:
    return {n: {s: (None if getattr(m, s) is None else getattr(m, s).to_dict()) for s in SLOTS}
            for n, m in plan.items()}


def _plan_from_dict(data: dict[str, Any]) -> dict[str, ModuleQuant]:
    return {n: ModuleQuant(**{s: QuantSpec.from_dict(v, f"{STATE}: {n}.{s}") for s, v in slots.items()})
            for n, slots in data.items()}


def _needs_calibration(spec: QuantSpec | None) -> bool:
    return spec is not None and not spec.dynamic and not spec.is_float_cast


def _needs_windows(recipe: Recipe) -> bool:
    """Whether the recipe reads calibration windows (detection, GPTQ or a static activation scale)."""
    if any(m.type in (*DETECTION, "smoothquant", "gptq") for m in recipe.modifiers):
        return True
    specs = [recipe.inputs, recipe.outputs] + [s for o in recipe.overrides for s in o.slots.values()]
    return any(_needs_calibration(s) for s in specs)


def _ratio_targets(plan: dict[str, ModuleQuant], arch: Any, n: int, kv: Any) -> set[tuple[int, str]]:
    """The (layer, key) pairs a clip ratio can set once the layers are attached: what
    :func:`~spikequant.algorithms.clip_ratios.activation_quantizers` will find, known before any layer runs."""
    targets: set[tuple[int, str]] = set()
    for i in range(n):
        for role, path in arch.linear_roles.items():
            mq = plan.get(f"{arch.layer_path(i)}.{path}")
            if mq is not None and mq.inputs is not None:
                targets.add((i, role))
        if kv is not None:
            targets |= {(i, "k_cache"), (i, "v_cache"), (i, "v_proj")}
    return targets


def _set_layer_ratios(qm_i: QuantizedModel, i: int, ratios: Ratios) -> None:
    """Layer ``i``'s clip ratios on its quantizers (in key order, as the modifier sets them)."""
    if ratios.get(i):
        index = activation_quantizers(qm_i)
        for key, r in in_key_order(ratios[i]):
            set_clip_ratio(qm_i, i, key, r, index)


def _restore_layer_qparams(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    qm = QuantizedModel(model=model, names=names)
    for kind, quantizers in (("input", qm.inputs), ("output", qm.outputs)):
        for name, q in quantizers.items():
            q.load_state({k: tensors[f"{name}.{kind}.{k}"] for k in STATE_KEYS if f"{name}.{kind}.{k}" in tensors})
    for n in names:
        if f"{n}.weight.scale" in tensors:
            set_weight_qparams(model.get_submodule(n), tensors[f"{n}.weight.scale"], tensors.get(f"{n}.weight.zero"))


# -- the run ----------------------------------------------------------------------------------------------
def quantize_streamed(
    sm: StreamedModel,
    recipe: Recipe,
    calibration: torch.Tensor | Callable[[], torch.Tensor] | None,
    output: str | Path,
    base_model: str,
    progress: bool = True,
    memory_limit: int = 2 << 30,
    stop_after: int | None = None,
) -> tuple[QuantizedModel, dict[str, Any]]:
    """Quantize the streamed model ``sm`` by ``recipe`` and write it to ``output`` layer by layer (see the
    module docstring). ``calibration``: (N, seqlen) token ids (None when the recipe needs none). A
    partial run in ``output`` (``.stream/state.json`` of the same recipe and model) is resumed.
    ``calibration`` may be a function returning the windows (called only if needed). ``stop_after``
    ends the run after that many layers (tests of the resume). Returns the view of the quantized
    skeleton and the findings."""
    check_streamable(recipe)
    model = sm.model
    arch = get_arch(model)
    out = Path(output)
    state_dir = out / STATE_DIR
    key = {"recipe": recipe.to_dict(), "base_model": base_model, "dtype": str(sm.dtype),
           "calibration": vars(recipe.calibration)}
    state: dict[str, Any] | None = None
    if (state_dir / STATE).is_file():
        state = json.loads((state_dir / STATE).read_text(encoding="utf-8"))
        if state.get("key") != key:
            raise StreamingError(f"{out} holds a partial streamed run of another recipe, model or calibration; "
                                 "pass --overwrite to start afresh")
    cache: list[torch.Tensor] = []

    def calib() -> torch.Tensor:
        if calibration is None:
            raise ValueError(f"recipe {recipe.name!r} needs calibration data, none was given")
        if not cache:
            cache.append(calibration() if callable(calibration) else calibration)
        return cache[0]

    if _needs_windows(recipe):
        calib()  # a bad data folder fails here, before anything is written
    ctx = QuantContext(model=model, calibration_windows=calib, seed=recipe.seed, progress=progress)
    mods = {m.type: m for m in recipe.modifiers}
    # a bad ratio file or KV group fails here, before anything is written
    ratios: Ratios = mods["clip_ratios"].resolved() if "clip_ratios" in mods else {}  # type: ignore[attr-defined]
    kv = mods["kv_cache"].specs(ctx) if "kv_cache" in mods else None  # type: ignore[attr-defined]
    n = sm.num_layers
    smooth = mods.get("smoothquant")
    order = [m.type for m in recipe.modifiers]
    # SmoothQuant listed before rotate: its statistics are those of the model as loaded, but the rotation's
    # online transforms go on every layer before the loop, so a float stream would pass through them. The
    # statistics are then one read-only streamed pass ahead (smooth_model's own), kept for the loop.
    smooth_first = smooth is not None and "rotate" in mods and order.index("smoothquant") < order.index("rotate")
    smooth_stats: dict[tuple[int, str], torch.Tensor] = {}
    # 1. what needs all layers: detection (a read-only streamed pass), unless a resumed run has it.
    if state is None:
        for m in recipe.modifiers:
            if m.type in DETECTION:
                m.apply(ctx)
        from spikequant.pipeline import build_plan

        plan = build_plan(model, recipe, ctx.overrides)
        check_ratio_targets(ratios, n, _ratio_targets(plan, arch, n, kv))
        if smooth_first:
            smooth_stats = channel_maxima(model, smooth.windows(ctx), smooth.paths(model), progress)  # type: ignore
        state = {"key": key, "plan": _plan_to_dict(plan), "findings": ctx.findings, "done": 0, "gptq_loss": {},
                 "smoothquant": {}, "streams": []}
        state_dir.mkdir(parents=True, exist_ok=True)
        if smooth_first:
            _atomic_save({f"{i}.{path}": v for (i, path), v in smooth_stats.items()}, state_dir / SMOOTH_STATS)
        _atomic_json(state, state_dir / STATE)
    else:
        plan = _plan_from_dict(state["plan"])
        ctx.findings.update(state["findings"])
        if smooth_first:
            smooth_stats = {(int(k.partition(".")[0]), k.partition(".")[2]): v
                            for k, v in load_file(str(state_dir / SMOOTH_STATS)).items()}
    ctx.plan = plan
    start = int(state["done"])
    rotation = None
    if "rotate" in mods:
        rotation = LayerwiseRotation.prepare(model, mods["rotate"].config(ctx))  # type: ignore[attr-defined]
        rotation.apply_ends(model)
        mods["rotate"].record(ctx, rotation.report(model))  # type: ignore[attr-defined]
    streams: dict[str, Stream] = {}
    if smooth is not None and not smooth_first and start < n:
        # SmoothQuant's statistics: the float windows through the float, unfolded layers (the model as
        # smooth_model's statistics pass sees it, before any fold; rotated when rotate comes first).
        streams["smooth"] = Stream("smooth", capture_inputs(model, smooth.windows(ctx), 1))  # type: ignore
    gptq = mods.get("gptq")
    gptq_specs = gptq.specs(ctx) if gptq is not None else {}  # type: ignore[attr-defined]
    layer_names = [[name for name in plan if name.startswith(arch.layer_path(i) + ".")] for i in range(n)]
    end_names = [name for name in plan if not any(name in ln for ln in layer_names)]
    static = any(_needs_calibration(mq.inputs) or _needs_calibration(mq.outputs) for mq in plan.values())

    def install_kv(i: int) -> None:
        if kv is not None:
            t = attention_transforms(model)[i]
            from spikequant.quant.kv import KVQuantizer

            t.k_quantizer, t.v_quantizer = KVQuantizer(kv[0]), KVQuantizer(kv[1])

    for i in range(start):  # a resumed run: the finished layers' state back on the skeleton
        attach(model, {name: plan[name] for name in layer_names[i]}, quantize_weights=False)
        _restore_layer_qparams(model, layer_names[i], load_file(str(state_dir / f"qparams-{i:05d}.safetensors")))
        install_kv(i)
        _set_layer_ratios(QuantizedModel(model=model, names=layer_names[i]), i, ratios)

    # 2. the streams, captured from the (rotated) embedding; a resumed run reloads their hidden states.
    if gptq_specs and start < n:
        streams["gptq"] = Stream("gptq", capture_inputs(model, gptq.windows(ctx), gptq.batch_size))  # type: ignore
    if static:
        streams["calib"] = Stream("calib", capture_inputs(model, calib(), 1))
    if start:
        recorded = state.get("streams")  # absent in a state.json written before streams were recorded
        missing = [name for name in streams if recorded is not None and name not in recorded]
        if missing:
            raise StreamingError(f"{state_dir / STATE} records no {', '.join(missing)} stream to resume from; "
                                 "pass --overwrite to start afresh")
        saved = load_file(str(state_dir / "streams.safetensors"))
        for s in streams.values():
            s.load_state(saved)
    state["streams"] = list(streams)  # what streams.safetensors holds from the next layer on
    state.setdefault("smoothquant", {})
    if sum(s.nbytes for s in streams.values()) > memory_limit:
        for s in streams.values():
            s.to_mmap(state_dir / f"{s.name}.bin")

    t0 = time.perf_counter()
    bar = tqdm(range(start, n), desc=f"quantize {recipe.name} (streamed)", unit="layer", disable=not progress,
               initial=start, total=n)
    for i in bar:
        if stop_after is not None and i >= stop_after:
            break
        sm.hold(i)
        layer = sm.layer(i)
        with torch.no_grad():
            if rotation is not None and not smooth_first:
                rotation.apply_layer(model, i)
            if "smooth" in streams:
                stats: dict[tuple[int, str], torch.Tensor] = {}
                handles = channel_max_hooks(layer, i, smooth.paths(model), stats)  # type: ignore[union-attr]
                try:
                    streams["smooth"].propagate(layer)
                finally:
                    for h in handles:
                        h.remove()
                state["smoothquant"].update(smooth.smooth_layer(ctx, i, layer, stats))  # type: ignore[union-attr]
            if smooth_first:
                state["smoothquant"].update(smooth.smooth_layer(ctx, i, layer, smooth_stats))  # type: ignore
            if rotation is not None and smooth_first:
                rotation.apply_layer(model, i)
            specs_i = {name: s for name, s in gptq_specs.items() if name in layer_names[i]}
            if specs_i:
                res = gptq.quantize_layer(ctx, i, layer, streams["gptq"].inputs, specs_i)  # type: ignore[union-attr]
                for name, r in res.items():
                    set_weight_qparams(model.get_submodule(name), r["scale"], r.get("zero"))
                    state["gptq_loss"][name] = r["loss"]
            if "gptq" in streams:
                streams["gptq"].propagate(layer)
            qm_i = attach(model, {name: plan[name] for name in layer_names[i]})
            install_kv(i)
            if "calib" in streams:
                qm_i.set_observing(True)
                streams["calib"].propagate(layer)
                for _, q in qm_i.quantizers():
                    if q.needs_calibration:
                        q.freeze()
            # after calibration, as the in-memory clip_ratios modifier (quantized stage) sets them
            _set_layer_ratios(qm_i, i, ratios)
        # Write the layer, then its quantizer state and the streams, then mark it done (in that order:
        # a kill between two steps leaves the layer not done, and a rerun redoes it).
        _atomic_save(sm.layer_state(i), out / f"model-layer-{i:05d}.safetensors")
        _atomic_save(qparam_tensors(qm_i), state_dir / f"qparams-{i:05d}.safetensors")
        if streams:
            _atomic_save({k: v for s in streams.values() for k, v in s.state().items()},
                         state_dir / "streams.safetensors")
        state["done"] = i + 1
        _atomic_json(state, state_dir / STATE)
        sm.unhold(i)
        bar.set_postfix_str(f"peak rss {peak_rss_bytes() / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s")
    if int(state["done"]) < n:
        return QuantizedModel.from_model(model), ctx.findings

    # 3. the ends: lm_head (when targeted) quantized and calibrated after the final norm, then the files.
    with torch.no_grad():
        qm_end = attach(model, {name: plan[name] for name in end_names})
        if "calib" in streams and end_names:
            norm, lm_head = model.get_submodule(arch.final_norm), model.get_submodule(arch.lm_head)
            qm_end.set_observing(True)
            for hidden, _ in streams["calib"].inputs:
                lm_head(norm(hidden))
            for _, q in qm_end.quantizers():
                if q.needs_calibration:
                    q.freeze()
    if smooth is not None:
        smooth.record(ctx, state["smoothquant"], smooth.windows(ctx))  # type: ignore[attr-defined]
    if kv is not None:
        mods["kv_cache"].record(ctx, kv)  # type: ignore[attr-defined]
    if gptq_specs:
        losses = state["gptq_loss"]
        w = gptq.windows(ctx)  # type: ignore[union-attr]
        ctx.findings["gptq"] = {"windows": int(len(w)), "seqlen": int(w.shape[1]), "linears": len(losses),
                                "mean_loss": sum(losses.values()) / len(losses)}
    if ratios:
        mods["clip_ratios"].record(ctx, ratios)  # type: ignore[attr-defined]
    qm = QuantizedModel(model=model, names=list(plan))
    _write_ends(sm, out, n)
    save_file(qparam_tensors(qm), str(out / QPARAMS), metadata={"format": "spikequant", "version": str(FORMAT_VERSION)})
    manifest = build_manifest(qm, recipe, base_model, ctx.findings)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    shutil.rmtree(state_dir, ignore_errors=True)
    return qm, ctx.findings


def save_streamed(sm: StreamedModel, qm: QuantizedModel, recipe: Recipe, base_model: str, output: str | Path,
                  findings: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """:func:`spikequant.export.save_quantized` for a streamed model: each decoder layer loaded, written as
    its own shard and freed, then the ends, the index, config, tokenizer, ``quantization.safetensors`` and
    ``spikequant.json`` (the folder :func:`quantize_streamed` writes). For a model whose quantizer state
    changed after it was saved (a clip search): the layers' tensors are the checkpoint's as read."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(sm.num_layers), desc="saving (streamed)", unit="layer", disable=not progress, leave=False):
        with loaded_layer(sm.model, i):
            _atomic_save(sm.layer_state(i), out / f"model-layer-{i:05d}.safetensors")
    _write_ends(sm, out, sm.num_layers)
    save_file(qparam_tensors(qm), str(out / QPARAMS), metadata={"format": "spikequant", "version": str(FORMAT_VERSION)})
    manifest = build_manifest(qm, recipe, base_model, findings)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def _write_ends(sm: StreamedModel, out: Path, n: int) -> None:
    """Embedding, final norm and lm_head (not when tied), the index over all shards, config, tokenizer."""
    model, arch = sm.model, sm.arch
    ends: dict[str, torch.Tensor] = {}
    for path in (arch.embed, arch.final_norm, arch.lm_head):
        for k, v in model.get_submodule(path).state_dict().items():
            ends[f"{path}.{k}"] = v.detach().contiguous()
    head, embed = model.get_submodule(arch.lm_head), model.get_submodule(arch.embed)
    if head.weight is embed.weight:
        ends.pop(f"{arch.lm_head}.weight")
    save_file(ends, str(out / "model-ends.safetensors"), metadata={"format": "pt"})
    weight_map = dict.fromkeys(ends, "model-ends.safetensors")
    total = sum(v.numel() * v.element_size() for v in ends.values())
    for i in range(n):
        name = f"model-layer-{i:05d}.safetensors"
        with safe_open(str(out / name), "pt") as f:  # reads the header only
            for k in f.keys():  # noqa: SIM118 (a safetensors handle is not a mapping)
                weight_map[k] = name
                total += math.prod(f.get_slice(k).get_shape()) * sm.dtype.itemsize
    _atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map}, out / INDEX)
    with original_sizes(model):
        model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    sm.tokenizer.save_pretrained(out)

