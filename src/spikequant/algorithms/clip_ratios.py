"""Per-quantizer activation clip ratios, addressable by (layer, name), loadable from a file.

Eight quantizers per decoder layer, in the order Gradual Binary Search visits them (METHODS §B.3):
``q_proj``, ``k_proj``, ``v_proj`` (the input quantizer of each linear: q/k/v read the same tensor but,
as in the paper's code, each linear has its own input quantizer and ratio), ``k_cache`` (K after RoPE and
R3), ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``. As in the paper, ``v_proj``'s ratio also clips
the V cache; the optional ninth key ``v_cache`` sets the V cache alone.

Ratios live in the quantizer modules (``ActivationQuantizer.spec.clip_ratio``), never in weights, so a
search changes one with :func:`set_clip_ratio` and runs the next perplexity probe straight away; a static
quantizer keeps its observed range and recomputes its scale.

File format (JSON or YAML)::

    {"layers": {"0": {"q_proj": 0.9, "k_cache": 1.0, "o_proj": 0.3}, "1": {...}}}
"""

from __future__ import annotations

import json
from collections.abc import Container
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from spikequant.algorithms.base import Modifier, QuantContext, register
from spikequant.errors import RecipeError
from spikequant.models import decoder_layers, linear_role
from spikequant.models.arch import ROLES
from spikequant.quant import ActivationQuantizer, QuantizedModel
from spikequant.transforms import installed_attention_transforms

QUANTIZER_KEYS = ("q_proj", "k_proj", "v_proj", "k_cache", "o_proj", "gate_proj", "up_proj", "down_proj")
KEYS = (*QUANTIZER_KEYS, "v_cache")
LINEAR_KEYS = ROLES

Ratios = dict[int, dict[str, float]]


def _check_ratio(r: Any, where: str) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
        raise RecipeError(f"{where}: a clip ratio must be a number in (0, 1], got {r!r}")
    return float(r)


def parse_ratios(data: Any, where: str = "clip ratios") -> Ratios:
    """Validate ``{"layers": {"<i>": {"<key>": ratio}}}`` (or the inner mapping) into {i: {key: ratio}}."""
    if isinstance(data, dict) and "layers" in data:
        data = data["layers"]
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping {{layers: {{0: {{q_proj: 0.9}}}}}}")
    out: Ratios = {}
    for layer, entries in data.items():
        try:
            i = int(layer)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: layer key {layer!r} is not an integer") from None
        if not isinstance(entries, dict):
            raise RecipeError(f"{where}: layer {layer} must map quantizer names to ratios")
        for key, r in entries.items():
            if key not in KEYS:
                raise RecipeError(f"{where}: layer {layer}: unknown quantizer {key!r} (known: {', '.join(KEYS)})")
            out.setdefault(i, {})[key] = _check_ratio(r, f"{where}: layer {layer}.{key}")
    return out


def load_ratio_file(path: str | Path) -> Ratios:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"clip ratio file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError):
        raise RecipeError(f"clip ratio file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}") \
            from None
    return parse_ratios(data, str(path))


def save_ratio_file(ratios: Ratios, path: str | Path) -> None:
    data = {"layers": {str(i): dict(v) for i, v in sorted(ratios.items())}}
    Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")


def activation_quantizers(qm: QuantizedModel) -> dict[tuple[int, str], list[ActivationQuantizer]]:
    """(layer, key) -> the quantizer objects that key's ratio sets (``v_proj`` includes the V cache)."""
    out: dict[tuple[int, str], list[ActivationQuantizer]] = {}
    for name, q in qm.inputs.items():
        role = linear_role(qm.model, name)
        if role is not None:
            out.setdefault(role, []).append(q)
    attn = installed_attention_transforms(qm.model)
    for i, t in enumerate(attn or []):
        if t.k_quantizer is not None:
            out.setdefault((i, "k_cache"), []).append(t.k_quantizer)
        if t.v_quantizer is not None:
            out.setdefault((i, "v_cache"), []).append(t.v_quantizer)
            out.setdefault((i, "v_proj"), []).append(t.v_quantizer)
    return out


def set_clip_ratio(qm: QuantizedModel, layer: int, key: str, ratio: float,
                   index: dict[tuple[int, str], list[ActivationQuantizer]] | None = None) -> None:
    """Change one quantizer's ratio in place (cheap: the next forward uses it). Pass ``index`` (from
    :func:`activation_quantizers`) when calling this in a loop."""
    ratio = _check_ratio(ratio, f"layer {layer}.{key}")
    index = activation_quantizers(qm) if index is None else index
    if (layer, key) not in index:
        raise KeyError(f"no quantized activation {key!r} in layer {layer} (keys: {', '.join(KEYS)})")
    for q in index[(layer, key)]:
        q.spec = replace(q.spec, clip_ratio=ratio)  # a frozen static quantizer recomputes its scale


def in_key_order(entries: dict[str, float]) -> list[tuple[str, float]]:
    """A layer's ratios in :data:`KEYS` order, so an explicit ``v_cache`` (last) wins over ``v_proj``'s
    ratio for the V cache whatever order a file lists them in."""
    return [(k, entries[k]) for k in KEYS if k in entries]


def apply_clip_ratios(qm: QuantizedModel, ratios: Ratios,
                      index: dict[tuple[int, str], list[ActivationQuantizer]] | None = None) -> None:
    index = activation_quantizers(qm) if index is None else index
    for layer, entries in sorted(ratios.items()):
        for key, r in in_key_order(entries):
            set_clip_ratio(qm, layer, key, r, index)


def clip_ratios(qm: QuantizedModel) -> Ratios:
    """The current ratio of every quantizer, by layer and key (``v_cache`` only where it differs)."""
    out: Ratios = {}
    for (layer, key), qs in activation_quantizers(qm).items():
        out.setdefault(layer, {})[key] = qs[0].spec.clip_ratio
    for entries in out.values():
        if "v_cache" in entries and entries.get("v_proj") == entries["v_cache"]:
            del entries["v_cache"]
    return {i: {k: out[i][k] for k in KEYS if k in out[i]} for i in sorted(out)}


@register
@dataclass
class ClipRatios(Modifier):
    """Set per-quantizer clip ratios from ``file`` (JSON/YAML) and/or inline ``ratios`` (same format,
    applied after the file), on the quantizers themselves once they exist and are calibrated (a static
    quantizer recomputes its scale from its observed range)."""

    type = "clip_ratios"
    stage = "quantized"
    file: str | None = None
    ratios: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratios:
            parse_ratios(self.ratios, "clip_ratios.ratios")

    def resolved(self) -> Ratios:
        out: Ratios = {}
        for src in ([load_ratio_file(self.file)] if self.file else []) + [parse_ratios(self.ratios)]:
            for i, entries in src.items():
                out.setdefault(i, {}).update(entries)
        return out

    def apply(self, ctx: QuantContext) -> None:
        ratios = self.resolved()
        if not ratios:
            return
        qm = ctx.qm
        assert qm is not None, "clip_ratios runs at the quantized stage, after the quantizers exist"
        index = activation_quantizers(qm)
        check_ratio_targets(ratios, len(decoder_layers(ctx.model)), index)
        apply_clip_ratios(qm, ratios, index)
        self.record(ctx, ratios)

    def record(self, ctx: QuantContext, ratios: Ratios) -> None:
        ctx.findings["clip_ratios"] = {str(i): e for i, e in sorted(ratios.items())}


def check_ratio_targets(ratios: Ratios, n_layers: int, targets: Container[tuple[int, str]]) -> None:
    """Fail (one line naming the layer and key) where a ratio has no quantizer to set: a layer out of
    range, or a (layer, key) not in ``targets`` (the quantizers that exist or, streamed, will exist)."""
    for layer, entries in sorted(ratios.items()):
        if not 0 <= layer < n_layers:
            raise RecipeError(f"clip_ratios: layer {layer} out of range (model has {n_layers} layers)")
        for key, _ in in_key_order(entries):
            if (layer, key) not in targets:
                what = "no KV-cache quantizer (add a kv_cache modifier)" if key in ("k_cache", "v_cache") \
                    else "that linear's input is not quantized"
                raise RecipeError(f"clip_ratios: layer {layer}.{key}: {what}")
