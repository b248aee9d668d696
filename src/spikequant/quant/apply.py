"""Attach quantization to a model: the state lives on each linear (scheme, weight parameters, activation
quantizer submodules); weights are fake-quantized in place, activation quantizers run from forward hooks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from spikequant.models.forward import forward_windows
from spikequant.quant.fake import compute_qparams, quantize_dequantize
from spikequant.quant.observers import ActivationQuantizer, QuantStatus
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


INPUT_QUANTIZER = "input_quantizer"
OUTPUT_QUANTIZER = "output_quantizer"
SCHEME = "spikequant_scheme"
HOOKS = "_spikequant_hooks"


def scheme_of(linear: nn.Module) -> ModuleQuant | None:
    """The quantization of one linear as it stands on the module (None: not planned). The weight spec is
    the scheme's; the activation specs are the live quantizers' (a clip-ratio change shows at once)."""
    scheme = getattr(linear, SCHEME, None)
    if scheme is None:
        return None
    q_in, q_out = getattr(linear, INPUT_QUANTIZER, None), getattr(linear, OUTPUT_QUANTIZER, None)
    return ModuleQuant(scheme.weights, None if q_in is None else q_in.spec, None if q_out is None else q_out.spec)


def set_weight_qparams(linear: nn.Module, scale: torch.Tensor | None, zero: torch.Tensor | None) -> None:
    """Record the quantization parameters of a linear's (already quantized) weight on the module."""
    for key, value in (("weight_scale", scale), ("weight_zero_point", zero)):
        if key in linear._buffers:
            del linear._buffers[key]
        linear.register_buffer(key, None if value is None else value.detach(), persistent=False)


def weight_qparams_of(linear: nn.Module) -> dict[str, torch.Tensor] | None:
    """The recorded weight parameters (``scale``, ``zero``), or None if the weight was not quantized here."""
    if "weight_scale" not in linear._buffers:
        return None
    out = {}
    for key, name in (("scale", "weight_scale"), ("zero", "weight_zero_point")):
        v = linear._buffers.get(name)
        if v is not None:
            out[key] = v.cpu()
    return out


@dataclass
class QuantizedModel:
    """A view of a model whose planned linears carry their quantization state (scheme, weight
    parameters, activation quantizers: see :func:`attach`). Everything here is read from the modules,
    so saving, export and kernel backends see one truth. ``names`` are the planned linears in order."""

    model: nn.Module
    names: list[str]
    handles: list = field(default_factory=list)

    @classmethod
    def from_model(cls, model: nn.Module) -> QuantizedModel:
        """Rebuild the view from the state on the modules (hooks stay where they are)."""
        names = [n for n, m in model.named_modules() if getattr(m, SCHEME, None) is not None]
        return cls(model=model, names=names)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    @property
    def plan(self) -> dict[str, ModuleQuant]:
        return {n: scheme_of(self.module(n)) for n in self.names}  # type: ignore[misc]

    def _quantizers(self, attr: str) -> dict[str, ActivationQuantizer]:
        out = {}
        for n in self.names:
            q = getattr(self.module(n), attr, None)
            if q is not None:
                out[n] = q
        return out

    @property
    def inputs(self) -> dict[str, ActivationQuantizer]:
        return self._quantizers(INPUT_QUANTIZER)

    @property
    def outputs(self) -> dict[str, ActivationQuantizer]:
        return self._quantizers(OUTPUT_QUANTIZER)

    @property
    def weight_qparams(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for n in self.names:
            p = weight_qparams_of(self.module(n))
            if p is not None:
                out[n] = p
        return out

    def quantizers(self):
        yield from self.inputs.items()
        yield from self.outputs.items()

    @property
    def needs_calibration(self) -> bool:
        return any(q.needs_calibration and q.status is not QuantStatus.FROZEN for _, q in self.quantizers())

    def set_observing(self, flag: bool) -> None:
        for _, q in self.quantizers():
            if q.needs_calibration:
                q.observing = flag

    @torch.inference_mode()
    def calibrate(self, windows: torch.Tensor, progress: bool = True) -> None:
        """Run calibration windows through the model and freeze the static activation quantizers.

        Weights are already quantized, so the observers see the activations the deployed model sees.
        """
        self.set_observing(True)
        try:
            forward_windows(self.model, windows, "calibrating activation scales", progress)
        except BaseException:
            self.set_observing(False)
            raise
        for _, q in self.quantizers():
            if q.needs_calibration:
                q.freeze()

    def remove_hooks(self) -> None:
        """Detach the activation quantizers from the forward pass (their state stays on the modules)."""
        for n in self.names:
            for h in getattr(self.module(n), HOOKS, []):
                h.remove()
            setattr(self.module(n), HOOKS, [])
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def high_precision_share(self, slots: tuple[str, ...] = ("weights",)) -> float:
        """Share of decoder-linear parameters in linears where any of ``slots`` (default: the weights) is
        not integer-quantized (float or FP8); ``("weights", "inputs")`` also counts float activations."""
        total = kept = 0
        for name, mq in self.plan.items():
            n = self.module(name).weight.numel()
            total += n
            if any(getattr(mq, slot) is None or getattr(mq, slot).format != "int" for slot in slots):
                kept += n
        return kept / total if total else 0.0

    def effective_weight_bits(self, float_bits: int = 16) -> float:
        total = bits = 0
        for name, mq in self.plan.items():
            n = self.module(name).weight.numel()
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
    """Round-to-nearest fake quantization of a linear's weight, in place; records its parameters on the
    module (:func:`set_weight_qparams`) and returns them."""
    w = linear.weight.data
    # Half-precision weights are quantized in float32 so scales are exact; float64 stays float64.
    wf = w if w.dtype == torch.float64 else w.float()
    scale, zero = compute_qparams(wf, spec, "weight")
    linear.weight.data = quantize_dequantize(wf, spec, scale, zero).to(w.dtype)
    set_weight_qparams(linear, scale, zero)
    return weight_qparams_of(linear) or {}


def _input_hook(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, INPUT_QUANTIZER)(args[0]),) + tuple(args[1:])


def _output_hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return getattr(module, OUTPUT_QUANTIZER)(out)


def attach(model: nn.Module, plan: dict[str, ModuleQuant], quantize_weights: bool = True) -> QuantizedModel:
    """Put each planned linear's quantization state on the module: its scheme (``spikequant_scheme``),
    its weight quantized by RTN with ``weight_scale``/``weight_zero_point`` buffers (unless
    ``quantize_weights`` is False because the weights already hold quantized values, or an algorithm
    such as GPTQ already recorded parameters on it), and ``input_quantizer``/``output_quantizer``
    submodules run by forward hooks. Returns the view; ``remove_hooks`` detaches the quantizers."""
    for name, mq in plan.items():
        linear = model.get_submodule(name)
        setattr(linear, SCHEME, ModuleQuant(mq.weights, mq.inputs, mq.outputs))
        if mq.weights is not None and quantize_weights and weight_qparams_of(linear) is None:
            quantize_weight_rtn(linear, mq.weights)
        hooks = []
        for attr, spec in ((INPUT_QUANTIZER, mq.inputs), (OUTPUT_QUANTIZER, mq.outputs)):
            if attr in linear._modules:
                del linear._modules[attr]
            if spec is not None:
                linear.add_module(attr, ActivationQuantizer(spec))
        if mq.inputs is not None:
            hooks.append(linear.register_forward_pre_hook(_input_hook))
        if mq.outputs is not None:
            hooks.append(linear.register_forward_hook(_output_hook))
        for h in getattr(linear, HOOKS, []):
            h.remove()
        setattr(linear, HOOKS, hooks)
    return QuantizedModel(model=model, names=list(plan))
