"""Export a saved spikequant model (``quantize --output``) to compressed-tensors, the checkpoint format
vLLM and llm-compressor read.

The *what* is compressed-tensors' own config objects: each planned linear's :class:`QuantSpec` maps to a
``QuantizationArgs`` (or the export refuses, naming the module and what has no equivalent), the linears
sharing a mapping form one ``QuantizationScheme``, float linears go to ``ignore``. The *how* is
compressed-tensors' API as llm-compressor uses it: ``apply_quantization_config`` registers
``weight_scale`` / ``input_scale`` (and zero points) on the modules, we copy **our** calibrated values
into them (read from the module state that ``load_quantized`` restores, never recomputed), and
``ModelCompressor`` infers the formats (``int-quantized``, ``pack-quantized``, ``float-quantized``),
compresses the weights and writes ``quantization_config`` into ``config.json``.

Grids. Our symmetric int quantizer is ``clamp(round(x / s), -2^(b-1), 2^(b-1)-1) * s`` with half-to-even
rounding; compressed-tensors' is ``round(clamp(x / s, -2^(b-1), 2^(b-1)-1)) * s`` (the same, as the
bounds are integers) and stores ``round(w / s)`` as int8 for the weight, which gives back our grid
exactly (checked for every module before anything is written). Asymmetric: ours keeps an unsigned zero
point ``z`` in [0, 2^b - 1], compressed-tensors a signed one in [-2^(b-1), 2^(b-1)-1]; we write
``z - 2^(b-1)``; the grids match except that compressed-tensors rounds ``x/s + z`` where we round ``x/s``
and then add ``z`` (different only on an exact .5 tie with an odd zero point). FP8 E4M3 with a scale:
identical (``(x / s).clamp(±448)`` cast to ``float8_e4m3fn``). Dynamic activation scales are computed by
the runtime, not stored: compressed-tensors' own fake-quant forward uses ``amax / 127.5`` for int8 (ours:
``amax / 127``), so a dynamic int recipe is exported with a note that the reloaded model is not
bit-identical.

What compressed-tensors cannot express here is a one-line :class:`ExportError` before anything is
written: unscaled E5M2 casts, per-input-channel or sink/outlier-token activation quantizers, output
quantizers, dynamic scales with a clip ratio, online Hadamards (R3, R4, o_proj: transformers applies no
``transform_config`` on load, and its Hadamards are not ours), our KV-cache quantizers, Dimension
Expansion, and fused groups (q/k/v, gate/up) whose parts differ (``promote_fused`` keeps such a group
in float instead and says so).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spikequant.errors import SpikequantError
from spikequant.export.saving import MANIFEST, QPARAMS, is_quantized_dir, load_quantized
from spikequant.models import LoadedModel, load_model
from spikequant.models.arch import ARCHITECTURES, ArchSpec
from spikequant.models.loading import compressed_tensors_config
from spikequant.quant import ModuleQuant, QuantSpec
from spikequant.quant.apply import HOOKS, INPUT_QUANTIZER, OUTPUT_QUANTIZER, SCHEME

FORMAT = "compressed-tensors"
FORMATS = (FORMAT,)
# Written beside config.json: where the checkpoint came from (recipe, source, attention implementation).
EXPORT_MANIFEST = "spikequant-export.json"
CT_VERSION = "0.20.1"  # the compressed-tensors version this module was written and tested against


class ExportError(SpikequantError):
    """A saved model (or an output folder) that cannot be exported as asked; one line."""


def is_compressed_tensors_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a checkpoint whose config.json says ``quant_method: compressed-tensors``."""
    return compressed_tensors_config(path) is not None


def read_export_manifest(path: str | Path) -> dict[str, Any]:
    """The provenance an export wrote (empty for a compressed-tensors checkpoint made elsewhere)."""
    p = Path(path) / EXPORT_MANIFEST
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def load_compressed(path: str | Path, dtype: str = "float32", device: str | None = None
                    ) -> tuple[LoadedModel, dict[str, Any]]:
    """Load a compressed-tensors checkpoint through transformers (see :func:`spikequant.models.load_model`)
    with the attention implementation its source was quantized under; returns the model and the export's
    provenance (empty for a checkpoint not written by spikequant)."""
    if not is_compressed_tensors_dir(path):
        raise ExportError(f"{path} is not a {FORMAT} checkpoint (no quantization_config with quant_method "
                          f"{FORMAT} in config.json)")
    provenance = read_export_manifest(path)
    loaded = load_model(str(path), dtype, device, attn_implementation=provenance.get("attn_implementation"))
    return loaded, provenance


# -- the mapping: our specs -> compressed-tensors QuantizationArgs ----------------------------------------

def _int_args(spec: QuantSpec, strategy: str, dynamic: bool):
    from compressed_tensors.quantization import QuantizationArgs

    kw: dict[str, Any] = {}
    if strategy == "group":
        kw["group_size"] = spec.group_size
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy,
                            dynamic=dynamic, **kw)


def weight_args(spec: QuantSpec, where: str):
    """compressed-tensors ``QuantizationArgs`` for a weight spec (weights are stored, so never dynamic)."""
    from compressed_tensors.quantization import QuantizationArgs

    if spec.format == "fp8_e5m2":
        raise ExportError(f"{where}: unscaled FP8 E5M2 weights have no compressed-tensors equivalent "
                          "(its 8-bit float is E4M3 with a scale)")
    strategy = {"tensor": "tensor", "channel": "channel", "group": "group"}.get(spec.granularity)
    if strategy is None:
        raise ExportError(f"{where}: weight granularity {spec.granularity} has no compressed-tensors equivalent")
    if spec.format == "fp8_e4m3":
        if strategy == "group":
            raise ExportError(f"{where}: group-wise FP8 weights are not exported (only per-tensor / per-channel)")
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False)
    return _int_args(spec, strategy, dynamic=False)


def input_args(spec: QuantSpec, where: str) -> tuple[Any, str | None]:
    """``QuantizationArgs`` for an activation spec, and a note when the reloaded model will not compute
    exactly what ours does (dynamic int scales). Raises :class:`ExportError` where there is no equivalent."""
    if spec.format == "fp8_e5m2":
        raise ExportError(f"{where}: the unscaled FP8 E5M2 input cast (spike-w8a8-fp8-e5m2) has no "
                          "compressed-tensors equivalent (its 8-bit float is E4M3 with a scale)")
    if spec.keep_first_tokens or spec.outlier_tokens:
        what = "keep_first_tokens" if spec.keep_first_tokens else "outlier_tokens"
        raise ExportError(f"{where}: {what} (sink/outlier tokens outside the shared scale) has no "
                          "compressed-tensors equivalent")
    if spec.granularity == "channel":
        raise ExportError(f"{where}: per-input-channel activation scales have no compressed-tensors equivalent "
                          "(activations take tensor, token or group strategies)")
    if not spec.dynamic and spec.granularity != "tensor":
        raise ExportError(f"{where}: static {spec.granularity} activation scales are not exported "
                          "(static means one per-tensor scale here)")
    if spec.dynamic and spec.clip_ratio != 1.0:
        raise ExportError(f"{where}: dynamic activations with clip_ratio {spec.clip_ratio}: compressed-tensors "
                          "computes dynamic scales from the full range and has no clip ratio")
    from compressed_tensors.quantization import QuantizationArgs

    strategy = spec.granularity
    if spec.format == "fp8_e4m3":
        if strategy not in ("tensor", "token"):
            raise ExportError(f"{where}: FP8 activations with granularity {strategy} are not exported")
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy,
                                dynamic=spec.dynamic), None
    note = None
    if spec.dynamic:
        q = 2 ** (spec.bits - 1)
        note = (f"dynamic int{spec.bits} activation scales are computed at run time; compressed-tensors' "
                f"forward uses amax/{q - 0.5:g} where spikequant uses amax/{q - 1}, so the reloaded model is "
                "close to, not bit-identical with, the fake-quant model")
    return _int_args(spec, strategy, dynamic=spec.dynamic), note


@dataclass
class ExportPlan:
    """What the export writes: each quantized linear's (weights, inputs) compressed-tensors args, the float
    linears (``ignore``), the fused groups promoted to float and the notes to print."""

    schemes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    promoted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _describe(mq: ModuleQuant) -> str:
    if mq.is_float:
        return "float"
    parts = []
    for slot in ("weights", "inputs", "outputs"):
        spec = getattr(mq, slot)
        if spec is not None:  # weights are quantized from their own values: no dynamic/static mode
            label = spec.label.replace("-dyn", "").replace("-static", "") if slot == "weights" else spec.label
            parts.append(f"{slot} {label}")
    return ", ".join(parts)


def plan_export(plan: dict[str, ModuleQuant], arch: ArchSpec, num_layers: int,
                promote_fused: bool = False) -> ExportPlan:
    """Map a resolved spikequant plan to compressed-tensors args; refuse (one line) what has no equivalent
    and fused groups (``arch.fused_groups``) whose parts differ, unless ``promote_fused`` keeps them in float."""
    out = ExportPlan()
    mapped: dict[str, tuple[Any, Any] | None] = {}
    for name, mq in plan.items():
        if mq.outputs is not None:
            raise ExportError(f"{name}: output quantizer ({mq.outputs.label}) is not exported; vLLM quantizes "
                              "linear inputs and weights only")
        if mq.is_float:
            mapped[name] = None
            continue
        w = None if mq.weights is None else weight_args(mq.weights, f"{name}.weights")
        if mq.weights is not None and not mq.weights.symmetric and mq.inputs is None:
            # Weight-only int goes to pack-quantized, whose packed zero points compressed-tensors 0.20.1
            # writes in a shape transformers 5.24 refuses to load (tried; int-quantized W8A8 reloads fine).
            raise ExportError(f"{name}.weights: asymmetric weight-only quantization is not exported (the "
                              "pack-quantized zero points do not reload in transformers); use symmetric weights")
        a = None
        if mq.inputs is not None:
            a, note = input_args(mq.inputs, f"{name}.inputs")
            if note and note not in out.notes:
                out.notes.append(note)
        mapped[name] = (w, a)

    for i in range(num_layers):
        for roles in arch.fused_groups:
            names = [arch.linear_name(i, r) for r in roles]
            present = [n for n in names if n in plan]
            if not present:
                continue
            keys = [mapped.get(n) for n in names]  # a linear outside the plan is float
            if all(k == keys[0] for k in keys):
                continue
            group = f"{arch.layer_path(i)}.{{{','.join(roles)}}}"
            if not promote_fused:
                parts = "; ".join(f"{r}: {_describe(plan[n]) if n in plan else 'float'}"
                                  for r, n in zip(roles, names, strict=True))
                raise ExportError(f"fused group {group} mixes precisions ({parts}); vLLM runs it as one matmul: "
                                  "give its parts one scheme in the recipe, or pass --promote-fused to keep the "
                                  "group in float")
            for n in names:
                mapped[n] = None
            out.promoted.append(f"fused group {group} kept in float (its parts differed; weights keep their "
                                f"quantized values, activations are no longer quantized)")
    for name, m in mapped.items():
        if m is None:
            out.ignore.append(name)
        else:
            out.schemes[name] = m
    if not out.schemes:
        raise ExportError("no linear is quantized in this model: nothing to export to compressed-tensors")
    return out


def check_transforms(transforms: dict[str, Any] | None, where: str) -> None:
    """Refuse (one line, naming every part) the transforms compressed-tensors cannot carry. Fused
    rotations (R1, R2) and fused norms are ordinary weights and pass."""
    if not transforms:
        return
    bad = []
    if transforms.get("expansion"):
        sizes = ", ".join(f"{k} {a}->{b}" for k, (a, b) in transforms["expansion"].items())
        bad.append(f"Dimension Expansion ({sizes}; transformers builds the model at the config's sizes and "
                   "normalises by the full width)")
    if transforms.get("r4"):
        bad.append("the online Hadamard on down_proj inputs (R4)")
    if transforms.get("o_online"):
        bad.append("the online Hadamard on o_proj inputs")
    if transforms.get("r3"):
        bad.append("the online rotation of Q/K after RoPE (R3)")
    kv = [x for layer in transforms.get("kv") or [] for x in (layer.get("k"), layer.get("v")) if x]
    if kv:
        spec = QuantSpec.from_dict(kv[0])
        bad.append(f"our KV-cache quantizers ({spec.label}; vLLM takes only static FP8 KV-cache scales from "
                   "a compressed-tensors kv_cache_scheme)")
    if bad:
        raise ExportError(f"{where}: cannot export to {FORMAT}: {'; '.join(bad)} (no equivalent that "
                          "transformers applies on load)")


# -- the export ----------------------------------------------------------------------------------------

def _source_manifest(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise ExportError(f"{src} is not a directory")
    if not is_quantized_dir(src):
        if is_compressed_tensors_dir(src):
            raise ExportError(f"{src} is already a {FORMAT} checkpoint")
        kind = "an unquantized model directory" if (src / "config.json").is_file() else "not a model directory"
        raise ExportError(f"{src} is {kind} (no {MANIFEST}); export reads a folder written by "
                          "`spikequant quantize --output`")
    try:
        manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{src / MANIFEST} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("plan"), dict):
        raise ExportError(f"{src / MANIFEST} has no plan: not written by spikequant quantize")
    if not (src / QPARAMS).is_file():
        raise ExportError(f"{src} has no {QPARAMS}: the save was interrupted or the file was removed")
    return manifest


def _arch_of(src: Path) -> tuple[ArchSpec, int]:
    try:
        cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{src / 'config.json'} is unreadable: {e}") from None
    cls = (cfg.get("architectures") or ["?"])[0]
    if cls not in ARCHITECTURES:
        raise ExportError(f"{src}: model class {cls} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[cls], int(cfg["num_hidden_layers"])


def _check_output(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise ExportError(f"output {out} is the source directory; choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ExportError(f"output {out} exists and is not empty; pass --overwrite to replace it")


def _strip_spikequant_state(linear: nn.Module) -> None:
    """Remove our quantization state from a linear (its values were read already), so compressed-tensors
    can register its own ``weight_scale`` / ``weight_zero_point`` parameters under the same names."""
    for h in getattr(linear, HOOKS, []):
        h.remove()
    for attr in (HOOKS, SCHEME):
        if attr in linear.__dict__:
            delattr(linear, attr)
    for key in ("weight_scale", "weight_zero_point"):
        linear._buffers.pop(key, None)
    for key in (INPUT_QUANTIZER, OUTPUT_QUANTIZER):
        linear._modules.pop(key, None)


def _signed_zero(zero: torch.Tensor | None, bits: int, like: torch.Tensor) -> torch.Tensor:
    """Our unsigned zero point as compressed-tensors' signed one (zeros for symmetric)."""
    if zero is None:
        return torch.zeros_like(like)
    return (zero - 2 ** (bits - 1)).reshape(like.shape).to(like.dtype)


def _copy_param(module: nn.Module, name: str, value: torch.Tensor, where: str) -> None:
    p = getattr(module, name)
    if value.numel() != p.numel():
        raise ExportError(f"{where}: {name} has {value.numel()} values, compressed-tensors expects {tuple(p.shape)}")
    with torch.no_grad():
        p.copy_(value.reshape(p.shape).to(p.dtype))


@dataclass
class ExportResult:
    output: Path
    quantized: int
    ignored: list[str]
    promoted: list[str]
    notes: list[str]
    formats: str


def export_compressed(source: str | Path, output: str | Path, promote_fused: bool = False,
                      overwrite: bool = False, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> ExportResult:
    """Export the folder ``source`` (written by ``spikequant quantize --output``) to a compressed-tensors
    checkpoint in ``output``. Everything that can fail on the input fails first, with one line; the
    checkpoint is written to a temporary sibling folder and renamed into place, so ``output`` never holds
    a partial export."""
    src, out = Path(source), Path(output)
    manifest = _source_manifest(src)
    _check_output(src, out, overwrite)
    check_transforms(manifest.get("transforms"), str(src))
    arch, num_layers = _arch_of(src)
    try:
        plan = {n: ModuleQuant(**{s: QuantSpec.from_dict(v, f"{MANIFEST}: {n}.{s}") for s, v in slots.items()})
                for n, slots in manifest["plan"].items()}
    except SpikequantError as e:
        raise ExportError(str(e)) from None
    xplan = plan_export(plan, arch, num_layers, promote_fused)
    for line in xplan.promoted + [f"note: {n}" for n in xplan.notes]:
        (log or print)(line)

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    loaded, qm, recipe, _ = load_quantized(src, "float32", "cpu")
    model = loaded.model
    # Read our state from the modules before taking it off them.
    state: dict[str, dict[str, torch.Tensor | None]] = {}
    for name in xplan.schemes:
        lin = model.get_submodule(name)
        q_in = getattr(lin, INPUT_QUANTIZER, None)
        state[name] = {"weight_scale": lin._buffers.get("weight_scale"),
                       "weight_zero": lin._buffers.get("weight_zero_point"),
                       "input_scale": None if q_in is None else q_in.scale,
                       "input_zero": None if q_in is None else q_in.zero}
    _check_fused_input_scales(xplan, state, arch, num_layers)
    qm.remove_hooks()
    for name in qm.names:
        _strip_spikequant_state(model.get_submodule(name))

    # One scheme per distinct (weights, inputs) pair; the most common targets "Linear", the others their
    # exact module names (compressed-tensors and vLLM match exact names before class names).
    groups: dict[str, list[str]] = {}
    keys: dict[str, tuple[Any, Any]] = {}
    for name, (w, a) in xplan.schemes.items():
        k = json.dumps([None if w is None else w.model_dump(), None if a is None else a.model_dump()], sort_keys=True)
        groups.setdefault(k, []).append(name)
        keys[k] = (w, a)
    largest = max(groups, key=lambda k: len(groups[k]))
    ordered = [k for k in groups if k != largest] + [largest]  # exact names before "Linear" (see below)
    config_groups = {}
    for gi, k in enumerate(ordered):
        w, a = keys[k]
        targets = ["Linear"] if k == largest else sorted(groups[k])
        config_groups[f"group_{gi}"] = QuantizationScheme(targets=targets, weights=w, input_activations=a)
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ignore = sorted(linear_names - set(xplan.schemes))
    qconfig = QuantizationConfig(config_groups=config_groups, ignore=ignore,
                                 quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, qconfig, show_progress=progress)

    for name, (w, a) in xplan.schemes.items():
        lin = model.get_submodule(name)
        scheme = getattr(lin, "quantization_scheme", None)
        got = (scheme.weights, scheme.input_activations) if scheme is not None else None
        if got != (w, a):
            raise ExportError(f"{name}: compressed-tensors matched scheme {got} instead of {(w, a)}")
        st = state[name]
        if w is not None:
            if st["weight_scale"] is None:
                raise ExportError(f"{src}: {name} has quantized weights but no saved weight scale")
            _copy_param(lin, "weight_scale", st["weight_scale"], name)
            if hasattr(lin, "weight_zero_point"):
                _copy_param(lin, "weight_zero_point",
                            _signed_zero(st["weight_zero"], w.num_bits, lin.weight_zero_point), name)
            # Our weights already hold grid values: compressed-tensors' own quantizer must give them back
            # exactly, or the stored integers would not be ours.
            zp = getattr(lin, "weight_zero_point", None)
            again = fake_quantize(lin.weight.data, lin.weight_scale.data, None if zp is None else zp.data, w)
            if not torch.equal(again, lin.weight.data):
                diff = float((again - lin.weight.data).abs().max())
                raise ExportError(f"{name}: weights are not on the grid of their saved scale (max diff {diff:.3g}); "
                                  "re-save the model with spikequant quantize")
        if a is not None and not a.dynamic:
            if st["input_scale"] is None:
                raise ExportError(f"{src}: static input quantizer of {name} has no saved scale")
            _copy_param(lin, "input_scale", st["input_scale"], name)
            if hasattr(lin, "input_zero_point"):
                _copy_param(lin, "input_zero_point",
                            _signed_zero(st["input_zero"], a.num_bits, lin.input_zero_point), name)

    compressor = ModelCompressor.from_pretrained_model(model)
    qc = compressor.quantization_config
    # Groups matched by exact names first: compressed-tensors' matcher stops at the first target a module
    # matches in config order and would warn that an exact-name target after "Linear" matched nothing.
    # config.json is written with sorted keys, so the order lives in the names.
    ordered_groups = sorted(qc.config_groups.values(), key=lambda g: "Linear" in g.targets)
    qc.config_groups = {f"group_{i}": g for i, g in enumerate(ordered_groups)}
    compressor.compress_model(model)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        compressor.update_config(str(tmp))
        loaded.tokenizer.save_pretrained(tmp)
        provenance = {
            "source": str(src), "base_model": manifest.get("base_model"), "recipe": recipe.to_dict(),
            "attn_implementation": manifest.get("attn_implementation"), "format": FORMAT,
            "compressed_tensors": _ct_version(), "promoted": xplan.promoted, "notes": xplan.notes,
            "findings": manifest.get("findings", {}),
        }
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fmt = compressor.quantization_config.format if compressor.quantization_config is not None else "?"
    return ExportResult(output=out, quantized=len(xplan.schemes), ignored=ignore, promoted=xplan.promoted,
                        notes=xplan.notes, formats=str(getattr(fmt, "value", fmt)))


def _check_fused_input_scales(xplan: ExportPlan, state: dict, arch: ArchSpec, num_layers: int) -> None:
    """vLLM keeps one static input scale per fused matmul (the shards' maximum): shards with different
    scales would compute something else than our model, so refuse them."""
    for i in range(num_layers):
        for roles in arch.fused_groups:
            names = [arch.linear_name(i, r) for r in roles]
            scales = [state.get(n, {}).get("input_scale") for n in names]
            if any(s is None for s in scales):
                continue
            if not all(torch.equal(s, scales[0]) for s in scales):
                raise ExportError(f"fused group {arch.layer_path(i)}.{{{','.join(roles)}}} has different static input "
                                  f"scales ({', '.join(f'{float(s):.6g}' for s in scales)}); vLLM keeps one per "
                                  "fused matmul")


def _ct_version() -> str:
    from importlib.metadata import version

    return version("compressed-tensors")
