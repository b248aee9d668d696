"""Save a fake-quantized model (safetensors + recipe + quantization parameters) and load it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from spikequant.errors import ModelLoadError
from spikequant.models import LoadedModel, load_model
from spikequant.quant import ModuleQuant, QuantizedModel, QuantSpec, attach, set_weight_qparams
from spikequant.quant.apply import SLOTS
from spikequant.quant.observers import STATE_KEYS
from spikequant.recipes import Recipe
from spikequant.transforms import expanded_config, original_sizes, restore_transforms, transform_state

MANIFEST = "spikequant.json"
QPARAMS = "quantization.safetensors"
FORMAT_VERSION = 1


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def save_quantized(
    qm: QuantizedModel, tokenizer: Any, recipe: Recipe, base_model: str, output: str | Path,
    findings: dict[str, Any] | None = None,
) -> Path:
    """Write ``output/``: the HF model (weights already fake-quantized, so loading gives the quantized
    values exactly), the tokenizer, ``quantization.safetensors`` (weight and static activation scales)
    and ``spikequant.json`` (recipe, resolved plan, base model, and under ``transforms`` the online
    rotations / KV quantizers / expansion to re-install; the fused rotations are in the weights)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with original_sizes(qm.model):
        qm.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    save_file(qparam_tensors(qm), str(out / QPARAMS), metadata={"format": "spikequant", "version": str(FORMAT_VERSION)})
    manifest = build_manifest(qm, recipe, base_model, findings)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def qparam_tensors(qm: QuantizedModel, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """What ``quantization.safetensors`` holds: weight parameters and activation quantizer state of the
    planned linears (``names``: only these)."""
    keep = None if names is None else set(names)
    tensors: dict[str, torch.Tensor] = {}
    for name, params in qm.weight_qparams.items():
        if keep is None or name in keep:
            for k, v in params.items():
                tensors[f"{name}.weight.{k}"] = v.contiguous()
    for kind, quantizers in (("input", qm.inputs), ("output", qm.outputs)):
        for name, q in quantizers.items():
            if keep is None or name in keep:
                for k, v in q.state().items():
                    tensors[f"{name}.{kind}.{k}"] = v.contiguous()
    return tensors


def build_manifest(qm: QuantizedModel, recipe: Recipe, base_model: str,
                   findings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``spikequant.json``: recipe, resolved plan, base model, findings, attention implementation and the
    online transforms to re-install (read from the modules)."""
    attn_impl = qm.model.config._attn_implementation or "eager"
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "recipe": recipe.to_dict(),
        "plan": {
            n: {s: (None if getattr(m, s) is None else getattr(m, s).to_dict()) for s in SLOTS}
            for n, m in qm.plan.items()
        },
        "findings": findings or {},
        # transformers does not save the attention implementation; without it a model saved under eager
        # reloads under sdpa, whose float rounding differs (and with it static scales' decisions).
        "attn_implementation": attn_impl.removeprefix("spikequant_"),
    }
    transforms = transform_state(qm.model)  # online rotations, KV quantizers, expansion (None if none)
    if transforms is not None:
        manifest["transforms"] = transforms
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checked manifest of a directory written by :func:`save_quantized` (one-line errors)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path / MANIFEST} is unreadable: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: unsupported spikequant format version {manifest.get('format_version')}")
    missing = [k for k in ("base_model", "recipe", "plan") if k not in manifest]
    if missing:
        raise ModelLoadError(f"{path / MANIFEST} lacks {', '.join(missing)}: not written by spikequant quantize")
    if not (path / QPARAMS).is_file():
        raise ModelLoadError(f"{path} has no {QPARAMS}: the save was interrupted or the file was removed")
    return manifest


def restore_quantization(model: torch.nn.Module, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                         where: str) -> QuantizedModel:
    """Re-install a saved model's online transforms and quantization state on ``model`` (its weights,
    already quantized, are loaded or streamed in separately). Works on a skeleton without weights."""
    try:
        restore_transforms(model, manifest.get("transforms"))  # before attach: R4 and KV quantizers come first
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    plan = {
        n: ModuleQuant(**{s: QuantSpec.from_dict(v, f"{MANIFEST}: {n}.{s}") for s, v in slots.items()})
        for n, slots in manifest["plan"].items()
    }
    qm = attach(model, plan, quantize_weights=False)
    for kind, quantizers in (("input", qm.inputs), ("output", qm.outputs)):
        for name, q in quantizers.items():
            state = {k: tensors[f"{name}.{kind}.{k}"] for k in STATE_KEYS if f"{name}.{kind}.{k}" in tensors}
            if q.needs_calibration and "scale" not in state:
                raise ModelLoadError(f"{where}: static quantizer {name}.{kind} has no saved scale")
            q.load_state(state)
    for n, mq in plan.items():
        if mq.weights is not None and f"{n}.weight.scale" in tensors:
            set_weight_qparams(model.get_submodule(n), tensors[f"{n}.weight.scale"], tensors.get(f"{n}.weight.zero"))
    return qm


def load_quantized(
    path: str | Path, dtype: str = "float32", device: str | None = None
) -> tuple[LoadedModel, QuantizedModel, Recipe, dict[str, Any]]:
    """Load a directory written by :func:`save_quantized` with its activation quantizers re-attached
    from the saved scales (no recalibration); weights are used as saved."""
    path = Path(path)
    manifest = read_manifest(path)
    transforms = manifest.get("transforms")
    loaded = load_model(str(path), dtype, device, config_overrides=expanded_config(transforms) or None,
                        attn_implementation=manifest.get("attn_implementation"))
    qm = restore_quantization(loaded.model, manifest, load_file(str(path / QPARAMS)), str(path / MANIFEST))
    return loaded, qm, Recipe.from_dict(manifest["recipe"], f"{path / MANIFEST}"), manifest
