"""Attach quantization to a model: weights fake-quantized in place, activations through hooks."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from spikequant.models.forward import forward_windows
from spikequant.quant.fake import compute_qparams, quantize_dequantize
from spikequant.quant.observers import ActivationQuantizer
from spikequant.quant.spec import QuantSpec

SLOTS = ("weights", "inputs", "outputs")


def matches(pattern: str, name: str) -> bool:
    """``re:<regex>`` matches the whole module name as a regex; anything else is an exact name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


@dataclass
class ModuleQuant:
    """The resolved quantization of one linear (None in a slot: left in the model's float dtype)."""

    weights: QuantSpec | None = None
    inputs: QuantSpec | None = None
    outputs: QuantSpec | None = None

    @property
    def is_float(self) -> bool:
        return self.weights is None and self.inputs is None and self.outputs is None


@dataclass
class QuantizedModel:
    """A model with quantization attached, and everything needed to save or undo it."""

    model: nn.Module
    plan: dict[str, ModuleQuant]
    inputs: dict[str, ActivationQuantizer] = field(default_factory=dict)
    outputs: dict[str, ActivationQuantizer] = field(default_factory=dict)
    weight_qparams: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def quantizers(self):
        yield from self.inputs.items()
        yield from self.outputs.items()

    @property
    def needs_calibration(self) -> bool:
        return any(q.needs_calibration and q.scale is None for _, q in self.quantizers())

    def set_observing(self, flag: bool) -> None:
        for _, q in self.quantizers():
            if q.needs_calibration:
                q.observing = flag

    @torch.inference_mode()
    def calibrate(self, windows: torch.Tensor, progress: bool = True) -> None:
        """Run calibration windows through the model and fix the static activation scales.

        Weights are already quantized, so the observers see the activations the deployed model sees.
        """
        self.set_observing(True)
        try:
            forward_windows(self.model, windows, "calibrating activation scales", progress)
        finally:
            self.set_observing(False)
        for _, q in self.quantizers():
            if q.needs_calibration:
                q.finalize()

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def high_precision_share(self, slots: tuple[str, ...] = ("weights",)) -> float:
        """Share of decoder-linear parameters in linears where any of ``slots`` (default: the weights) is
        not integer-quantized (float or FP8); ``("weights", "inputs")`` also counts float activations."""
        total = kept = 0
        for name, mq in self.plan.items():
            n = self.model.get_submodule(name).weight.numel()
            total += n
            if any(getattr(mq, slot) is None or getattr(mq, slot).format != "int" for slot in slots):
                kept += n
        return kept / total if total else 0.0

    def effective_weight_bits(self, float_bits: int = 16) -> float:
        total = bits = 0
        for name, mq in self.plan.items():
            n = self.model.get_submodule(name).weight.numel()
            total += n
            w = mq.weights
            bits += n * (float_bits if w is None else (w.bits if w.format == "int" else 8))
        return bits / total if total else 0.0


def resolve_plan(
    linear_names: list[str],
    targets: list[str],
    default: ModuleQuant,
    overrides: list[tuple[list[str], dict[str, QuantSpec | None]]],
) -> dict[str, ModuleQuant]:
    """The quantization of each targeted linear: the default, then every matching override in order."""
    plan: dict[str, ModuleQuant] = {}
    for name in linear_names:
        if not any(matches(p, name) for p in targets):
            continue
        mq = ModuleQuant(default.weights, default.inputs, default.outputs)
        for patterns, slots in overrides:
            if any(matches(p, name) for p in patterns):
                for slot, spec in slots.items():
                    setattr(mq, slot, spec)
        plan[name] = mq
    return plan


@torch.no_grad()
def quantize_weight_rtn(linear: nn.Linear, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Round-to-nearest fake quantization of a linear's weight, in place; returns its parameters."""
    w = linear.weight.data
    # Half-precision weights are quantized in float32 so scales are exact; float64 stays float64.
    wf = w if w.dtype == torch.float64 else w.float()
    scale, zero = compute_qparams(wf, spec, "weight")
    linear.weight.data = quantize_dequantize(wf, spec, scale, zero).to(w.dtype)
    out = {}
    if scale is not None:
        out["scale"] = scale.cpu()
    if zero is not None:
        out["zero"] = zero.cpu()
    return out


def attach(
    model: nn.Module,
    plan: dict[str, ModuleQuant],
    quantize_weights: bool = True,
    skip_weights: Collection[str] = (),
) -> QuantizedModel:
    """Quantize the planned weights (RTN, unless ``quantize_weights`` is False because they already
    are, or the module is in ``skip_weights`` because an algorithm such as GPTQ quantized it) and hook
    the activation quantizers in. Returns the handle; call ``remove_hooks`` to detach."""
    qm = QuantizedModel(model=model, plan=plan)
    skip = set(skip_weights)
    for name, mq in plan.items():
        linear = model.get_submodule(name)
        if mq.weights is not None and quantize_weights and name not in skip:
            qm.weight_qparams[name] = quantize_weight_rtn(linear, mq.weights)
        if mq.inputs is not None:
            q_in = ActivationQuantizer(mq.inputs)
            qm.inputs[name] = q_in

            def pre_hook(_m, args, q=q_in):
                return (q(args[0]),) + tuple(args[1:])

            qm.handles.append(linear.register_forward_pre_hook(pre_hook))
        if mq.outputs is not None:
            q_out = ActivationQuantizer(mq.outputs)
            qm.outputs[name] = q_out

            def post_hook(_m, _args, out, q=q_out):
                return q(out)

            qm.handles.append(linear.register_forward_hook(post_hook))
    return qm
