"""Real int8 compute on CPU for W8A8 models quantized by spikequant.

A frozen linear carries, on the module, everything its int8 kernel needs (see docs/architecture.md): the
fake-quantized weight (exactly ``q * weight_scale`` with ``q`` an int8 grid), per-output-row
``weight_scale``, and an ``input_quantizer`` whose frozen static per-tensor ``scale`` quantizes its input.
:func:`convert_to_int8` swaps each such linear for an :class:`Int8Linear` (int8 weights, int32 accumulation
in oneDNN, one rescale of the output), a local operation per module; linears the recipe keeps in float stay
``nn.Linear``. The fake-quantized model stays the reference: the two compute the same integers, and differ
only by the float rounding of the fake path's accumulation (see tests/backends).

Checkpoint (``save_int8`` / ``load_int8``): a folder with the HF ``config.json``, tokenizer,
``model.safetensors`` (float tensors of the float modules; int8 ``weight`` plus float32 ``weight_scale``
and ``input_scale`` of every int8 linear) and ``spikequant-int8.json`` (format version, the int8 module
names, their schemes). It is this backend's own simple format; the compressed-tensors export that serving
stacks read is separate work (``spikequant export``).
"""

from __future__ import annotations

import json
import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spikequant.errors import ModelLoadError, SpikequantError
from spikequant.quant.apply import HOOKS, INPUT_QUANTIZER, OUTPUT_QUANTIZER, SCHEME
from spikequant.quant.observers import QuantStatus
from spikequant.quant.spec import QuantSpec

KERNELS = ("auto", "onednn", "int_mm")
DEFAULT_KERNEL = "auto"
# "auto": oneDNN's qlinear for prefill-sized inputs, torch._int_mm for decode steps (a few tokens), where
# qlinear was measured pathologically slow on some shapes here (k/v_proj, 192 x 576: milliseconds per call;
# docs/inference.md); _int_mm for every size on a CPU where qlinear is slow altogether (onednn_usable).
AUTO_SMALL_M = 16
# onednn_usable: qlinear must be within this factor of _int_mm on the probe product (plus 0.1 ms); the slow
# path it was measured falling into on an AMD EPYC (Zen 5, torch 2.13) is 5,000-7,000x slower.
ONEDNN_SLOWDOWN = 3.0
_ONEDNN_INPUT: str | None = None  # "s8", "u8" or "none" once timed
# How the float input is quantized for prefill-sized inputs (more than AUTO_SMALL_M tokens): "eager" (four
# ATen ops: divide, round, clamp, cast: each a pass over memory, as costly as the int8 matmul itself at
# SmolLM2's sizes), "compiled" (the same expression through torch.compile: one fused loop, identical
# results), "auto" ("compiled" where inductor works here, else "eager"). Decode steps always run eager
# (a compiled call's guards cost more than the four small ops). $SPIKEQUANT_INT8_QUANT sets the default.
QUANT_MODES = ("auto", "eager", "compiled")
INT8_MANIFEST = "spikequant-int8.json"
INT8_FORMAT_VERSION = 1


class Int8BackendError(SpikequantError):
    """The model holds quantization the int8 backend cannot run (named in the message)."""


def _quantize_input(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Division, not a multiplication by 1/scale: the same rounding decisions as the fake-quant forward
    # (quant/fake.py:int_qdq), in float32 whatever the activation dtype.
    return torch.round(x.float() / scale).clamp(-128, 127).to(torch.int8)


def _swiglu_quantize(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8(round(silu(gate) * up / scale)) with the roundings of the eager MLP: ``silu`` and the product
    each rounded to the activation dtype (bfloat16 or float32), then quantized as :func:`_quantize_input`."""
    s = F.silu(gate.float()).to(gate.dtype)
    h = (s.float() * up.float()).to(gate.dtype)
    return torch.round(h.float() / scale).clamp(-128, 127).to(torch.int8)


def _norm_quantize(x: torch.Tensor, variance: torch.Tensor, weight: torch.Tensor, eps: float,
                   scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise rest of an RMSNorm (as HF's LlamaRMSNorm computes it, from the float32 ``variance``
    of the float32 input) and the int8 quantization of its output: (output in x's dtype, int8)."""
    y = weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    return y, torch.round(y.float() / scale).clamp(-128, 127).to(torch.int8)


_COMPILED: dict[str, Any] = {}


def default_quant_mode() -> str:
    mode = os.environ.get("SPIKEQUANT_INT8_QUANT", "auto")
    if mode not in QUANT_MODES:
        raise Int8BackendError(f"SPIKEQUANT_INT8_QUANT={mode!r}; choose from {', '.join(QUANT_MODES)}")
    return mode


def onednn_usable() -> bool:
    """Whether ``--kernel auto`` uses oneDNN's qlinear for prefill-sized inputs on this CPU: where its int8
    (s8) input is fast (:func:`onednn_input`'s timing), as on the Intel Xeon with AMX, where qlinear with
    its fused rescale beat ``_int_mm`` (docs/inference.md). Where only the uint8 route is fast (the AMD
    EPYC), ``auto`` keeps ``_int_mm``: there qlinear was as fast per product but the compiled model ran
    slower with it (docs/inference.md, "On an AMD EPYC"). ``$SPIKEQUANT_INT8_ONEDNN`` ``1`` / ``s8`` /
    ``u8`` make ``auto`` use qlinear, ``0`` never."""
    forced = _onednn_forced()
    if forced is not None:
        return forced != "0"
    return _onednn_timing() == "s8"


def onednn_input() -> str:
    """How oneDNN's qlinear gets its int8 input on this CPU: ``"s8"`` (the int8 tensor as it is) or ``"u8"``
    (shifted to uint8 with zero point 128: the same integers, ``x + 128`` against a compensation oneDNN
    folds into the packed weight). s8 unless the timing finds s8 slow and u8 fast: on an AMD EPYC (Zen 5,
    AVX512-VNNI, no AMX; torch 2.13, oneDNN 3.12) an s8 input runs oneDNN's reference kernel (``ref_int8`` in
    ``ONEDNN_VERBOSE``), about four seconds per 512-token product of SmolLM2's shapes, and a u8 input its
    VNNI kernel (``brg_matmul:avx512_core_vnni``) in about a millisecond, like ``_int_mm``.
    ``$SPIKEQUANT_INT8_ONEDNN=s8`` / ``u8`` choose instead."""
    forced = _onednn_forced()
    if forced in ("s8", "u8"):
        return forced
    return "u8" if _onednn_timing() == "u8" else "s8"


def _onednn_forced() -> str | None:
    forced = os.environ.get("SPIKEQUANT_INT8_ONEDNN")
    if forced is not None and forced not in ("0", "1", "s8", "u8"):
        raise Int8BackendError(f"SPIKEQUANT_INT8_ONEDNN={forced!r}; use 1 (oneDNN allowed), 0 (_int_mm only), "
                               "s8 or u8 (oneDNN with that input type)")
    return forced


def _onednn_timing() -> str:
    """Decided once per process: qlinear timed against ``torch._int_mm`` on a probe product (64 x 256 by
    256 x 256, best of 3 after a warm-up) with an s8 and then a u8 input; the first at most
    ``ONEDNN_SLOWDOWN`` x ``_int_mm`` (``"s8"`` / ``"u8"``), else ``"none"``. Runs eagerly
    (``prepare_traced`` packs before tracing)."""
    global _ONEDNN_INPUT
    if _ONEDNN_INPUT is None:
        gen = torch.Generator().manual_seed(0)
        qx = torch.randint(-128, 128, (64, 256), generator=gen, dtype=torch.int8)
        w = torch.randint(-128, 128, (256, 256), generator=gen, dtype=torch.int8)
        try:
            packed, w_t = torch.ops.onednn.qlinear_prepack(w, None), w.t().contiguous()
            ws, wz = torch.ones(256), torch.zeros(256, dtype=torch.int64)

            def best(fn: Any) -> float:
                fn()
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                return min(times)

            limit = ONEDNN_SLOWDOWN * best(lambda: torch._int_mm(qx, w_t)) + 1e-4
            _ONEDNN_INPUT = "none"
            for kind in ("s8", "u8"):
                x, zero = onednn_operand(qx, kind)
                if best(lambda x=x, zero=zero: torch.ops.onednn.qlinear_pointwise(
                        x, 1.0, zero, packed, ws, wz, None, 1.0, 0, torch.float32, "none", [], "")) <= limit:
                    _ONEDNN_INPUT = kind
                    break
        except (RuntimeError, AttributeError):  # no oneDNN int8 ops in this torch build
            _ONEDNN_INPUT = "none"
    return _ONEDNN_INPUT


def onednn_operand(qx: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """qlinear's input and zero point for an int8 tensor: as it is (s8, zero point 0), or its bits with
    the sign bit flipped, i.e. ``qx + 128`` as uint8 (u8, zero point 128): the same integers."""
    if kind == "u8":
        return torch.bitwise_xor(qx.view(torch.uint8), 128), 128
    return qx, 0


def _compiled(eager: Any) -> Any | None:
    """``eager`` through torch.compile (dynamic shapes), or None where inductor cannot build it here (e.g.
    no C++ compiler) or its result differs from the eager ops on a probe: then the eager ops run."""
    if eager.__name__ not in _COMPILED:
        fn = torch.compile(eager, dynamic=True, options={"emulate_precision_casts": True})
        scale = torch.tensor(0.37)
        ok = True
        try:
            for dtype in (torch.float32, torch.bfloat16):  # bfloat16: intermediate roundings kept
                probe = torch.linspace(-300, 300, 4 * 33).reshape(4, 33).to(dtype)
                if eager is _quantize_input:
                    args = (probe, scale)
                elif eager is _swiglu_quantize:
                    args = (probe / 50, probe.flip(-1) / 3, scale)
                else:
                    var = probe.float().pow(2).mean(-1, keepdim=True)
                    args = (probe, var, torch.linspace(0.5, 2, 33).to(dtype), 1e-5, scale)
                out, ref = fn(*args), eager(*args)
                ok = ok and all(torch.equal(o, r) for o, r in zip(out, ref, strict=True)) \
                    if isinstance(ref, tuple) else ok and torch.equal(out, ref)
        except Exception:  # noqa: BLE001 - any inductor/toolchain failure means: use the eager ops
            ok = False
        _COMPILED[eager.__name__] = fn if ok else None
    return _COMPILED[eager.__name__]


def _compiled_quantize() -> Any | None:
    return _compiled(_quantize_input)


def _compiled_swiglu_quantize() -> Any | None:
    return _compiled(_swiglu_quantize)


def _compiled_norm_quantize() -> Any | None:
    return _compiled(_norm_quantize)


class _SharedInput:
    """The quantized input of linears that read the same tensor with the same static scale (q/k/v,
    gate/up): the first quantizes, the others reuse it while the input is the very same tensor object,
    unchanged (its version counter, where it has one)."""

    __slots__ = ("ref", "version", "qx")

    def __init__(self) -> None:
        self.ref, self.version, self.qx = None, None, None

    @staticmethod
    def _version(x: torch.Tensor) -> int | None:
        try:
            return x._version
        except RuntimeError:  # inference tensors keep no version counter (they cannot be modified in place
            return None       # outside inference mode; inside, the model code between q/k/v does not)

    def get(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.ref is not None and self.ref() is x and self.version == self._version(x):
            return self.qx
        return None

    def put(self, x: torch.Tensor, qx: torch.Tensor) -> None:
        self.ref, self.version, self.qx = weakref.ref(x), self._version(x), qx


class Int8Linear(nn.Module):
    """y = int8(x / s_x) @ W_q^T * (s_x * s_w) + b, the integer product in int32 by an int8 kernel.

    Buffers: ``weight`` (out, in) int8, ``weight_scale`` (out,) float32, ``input_scale`` () float32,
    ``bias`` (out,) or None. ``kernel``: ``onednn`` (``torch.ops.onednn.qlinear_pointwise`` on a weight
    prepacked once, with the rescale and bias fused; the plain int8 weight is kept for saving),
    ``int_mm`` (``torch._int_mm`` int8 x int8 -> int32, then the rescale in float32), or ``auto``
    (``int_mm`` for at most ``AUTO_SMALL_M`` tokens, else ``onednn``; ``int_mm`` throughout where
    :func:`onednn_usable` finds qlinear slow on this CPU).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = DEFAULT_KERNEL,
                 quant: str | None = None) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise Int8BackendError(f"unknown int8 kernel {kernel!r}; choose from {', '.join(KERNELS)}")
        quant = default_quant_mode() if quant is None else quant
        if quant not in QUANT_MODES:
            raise Int8BackendError(f"unknown int8 input quantization {quant!r}; choose from {', '.join(QUANT_MODES)}")
        self.in_features, self.out_features, self.kernel, self.quant = in_features, out_features, kernel, quant
        self.shared: _SharedInput | None = None  # set by share_inputs for linears reading one tensor
        self.traced = False  # set by prepare_traced: the packed weights then include the traced path's
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: dict[str, Any] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = DEFAULT_KERNEL, name: str = "linear",
                    quant: str | None = None) -> Int8Linear:
        """The kernel module of a frozen W8A8 linear (:func:`check_int8_linear` says which ones are)."""
        check_int8_linear(linear, name)
        w_scale = linear.weight_scale.detach().float().reshape(-1)
        if w_scale.numel() == 1:
            w_scale = w_scale.expand(linear.out_features).contiguous()
        grid = linear.weight.detach().float() / w_scale[:, None]
        q = torch.round(grid)
        # The weights hold q * scale exactly up to float rounding; anything else is not an int8 grid.
        off = float((grid - q).abs().max()) if q.numel() else 0.0
        if off > 1e-2 or float(q.abs().max()) > 128:
            raise Int8BackendError(f"{name}: weight is not on its int8 grid (weight / weight_scale is {off:.3g} "
                                   "from an integer); the saved weights and scales disagree")
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel, quant)
        mod.weight.copy_(q.clamp(-128, 127).to(torch.int8))
        mod.weight_scale.copy_(w_scale)
        mod.input_scale.copy_(getattr(linear, INPUT_QUANTIZER).scale.detach().float().reshape(()))
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        scheme = getattr(linear, SCHEME, None)
        if scheme is not None:
            setattr(mod, SCHEME, scheme)
        return mod.to(linear.weight.device)

    def _pack(self) -> dict[str, Any]:
        # Rebuilt when the buffers change identity (load_state_dict, .to()) or the kernels needed change:
        # the cache is derived state.
        onednn = self.kernel == "onednn" or (self.kernel == "auto" and onednn_usable())
        kind = onednn_input() if onednn else None
        int_mm = self.kernel in ("int_mm", "auto") or self.traced  # traced: int_mm for decode-sized inputs
        key = (self.weight.data_ptr(), self.weight_scale.data_ptr(), self.input_scale.data_ptr(),
               None if self.bias is None else (self.bias.data_ptr(), self.bias.dtype), kind, int_mm)
        if self._packed is None or self._packed["key"] != key:
            p: dict[str, Any] = {"key": key, "x_scale": float(self.input_scale)}
            if onednn:
                p["w"] = torch.ops.onednn.qlinear_prepack(self.weight, None)
                p["w_zero"] = torch.zeros(self.out_features, dtype=torch.int64)
                p["x_kind"] = kind
            if int_mm:
                p["w_t"] = self.weight.t().contiguous()
                p["rescale"] = (self.input_scale.float() * self.weight_scale.float())
            self._packed = p
        return self._packed

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """int8(round(x / input_scale)), shared with the other linears of this input where set."""
        if self.shared is not None:
            qx = self.shared.get(x)
            if qx is not None:
                return qx
        fn = None
        if self.quant != "eager" and x.numel() // self.in_features > AUTO_SMALL_M:
            fn = _compiled_quantize()
            if fn is None and self.quant == "compiled":
                raise Int8BackendError("int8 input quantization 'compiled': torch.compile does not work here "
                                       "(e.g. no C++ compiler); use 'eager' or 'auto'")
        qx = (fn or _quantize_input)(x, self.input_scale)
        if self.shared is not None:
            self.shared.put(x, qx)
        return qx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        return self.forward_int8(self.quantize_input(x), x.dtype)

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same integers as :meth:`forward`, in ops torch.compile traces whole (no shared-input cache,
        no nested compiled call, the packed weights prepared beforehand by :func:`prepare_traced`): inductor
        fuses the input quantization into the op that produces ``x`` and the rescale into what follows.
        oneDNN's qlinear needs its prepacked weight to be a graph constant, which only inductor's freezing
        makes it; without freezing (e.g. ``generate``'s compiled decode steps) ``_int_mm`` runs."""
        import torch._inductor.config as inductor_config

        p = self._packed
        if p is None or not self.traced:
            raise Int8BackendError("Int8Linear under torch.compile: prepare the model with "
                                   "spikequant.backends.compile_model or prepare_traced first")
        m = x.numel() // self.in_features
        if "w" in p and m > AUTO_SMALL_M and inductor_config.freezing:
            return self._product(_quantize_input(x, self.input_scale), p, "onednn", x.dtype, x.shape[:-1])
        # Reshaped to 2-D before quantizing: quantizing a (1, 1, K) decode-step input and reshaping the
        # int8 result gave _int_mm a wrongly laid out buffer under inductor (torch 2.13, CPU; wrong
        # products, found by tests/backends/test_generate.py::test_compiled_decoding_generates_what_eager_does).
        qx = _quantize_input(x.reshape(-1, self.in_features), self.input_scale)
        return self._product(qx, p, "int_mm", x.dtype, x.shape[:-1])

    def forward_int8(self, qx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The linear on an input already quantized with ``input_scale`` (int8, shape (..., in)); the output
        in ``dtype``."""
        p = self._pack()
        kernel = self.kernel
        if kernel == "auto":
            kernel = "int_mm" if qx.numel() // self.in_features <= AUTO_SMALL_M or "w" not in p else "onednn"
        return self._product(qx, p, kernel, dtype, qx.shape[:-1])

    def _product(self, qx: torch.Tensor, p: dict[str, Any], kernel: str, dtype: torch.dtype,
                 shape: torch.Size) -> torch.Tensor:
        """The integer product of ``qx`` with the packed weights ``p`` on ``kernel`` (onednn or int_mm), rescaled
        (+ bias), in ``dtype`` and of shape ``(*shape, out_features)``: shared by the eager and traced paths."""
        if kernel == "onednn":
            bias = None if self.bias is None else self.bias.to(dtype)
            qx, zero = onednn_operand(qx, p["x_kind"])
            y = torch.ops.onednn.qlinear_pointwise(qx, p["x_scale"], zero, p["w"], self.weight_scale, p["w_zero"],
                                                   bias, 1.0, 0, dtype, "none", [], "")
            return y.reshape(*shape, self.out_features)
        acc = torch._int_mm(qx.reshape(-1, self.in_features), p["w_t"])
        y = torch.mul(acc, p["rescale"])  # int32 * float32 -> float32, one op
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(dtype).reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}, quant={self.quant}, "
                f"shared_input={self.shared is not None}")


def share_inputs(model: nn.Module) -> int:
    """Let the int8 linears of each input group (q/k/v, gate/up: :attr:`ArchSpec.input_groups`) quantize a
    shared input once, where their static input scales are equal. Returns the number of groups shared;
    0 for a model whose architecture spikequant does not know."""
    from spikequant.models.arch import get_arch

    try:
        arch = get_arch(model)
    except SpikequantError:
        return 0
    n_layers = len(model.get_submodule(arch.layers))
    shared = 0
    for i in range(n_layers):
        layer = model.get_submodule(arch.layer_path(i))
        for group in arch.input_groups:
            mods = [layer.get_submodule(p) for p in group]
            if len(mods) < 2 or not all(isinstance(m, Int8Linear) for m in mods):
                continue
            if not all(torch.equal(m.input_scale, mods[0].input_scale) for m in mods):
                continue
            holder = _SharedInput()
            for m in mods:
                m.shared = holder
            shared += 1
    return shared


def prepare_traced(model: nn.Module) -> int:
    """Let the model's int8 linears run inside torch.compile (their packed weights built now, outside the
    trace). Returns the number of int8 linears."""
    n = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.traced = True
            m._pack()
            n += 1
    return n


RECOMPILE_LIMIT = 64  # graphs per code object for a CompiledModel's calls (dynamo's default is 8)


class CompiledModel:
    """``torch.compile(model)`` (static shapes: one graph per input shape) called with inductor's freezing
    on, so parameters are graph constants (weights prepacked for oneDNN, int8 linears on oneDNN's qlinear
    for prefill-sized inputs). A float model compiles the same way, so float and int8 compare alike.
    Each new input shape compiles again (minutes for a 30-layer model on 2 cores): meant for repeated
    calls of one shape (benchmarks, batch serving), not one-off prompts."""

    def __init__(self, model: nn.Module, freezing: bool = True, fullgraph: bool = False,
                 options: dict[str, Any] | None = None, attention: str | None = None) -> None:
        prepare_traced(model)
        self.model, self.freezing, self.attention = model, freezing, attention
        self._fn = torch.compile(model, dynamic=False, fullgraph=fullgraph, options=options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        # dynamo keeps compiled graphs per code object, shared with every other torch.compile of the same
        # model (transformers' compiled decode step too); past its recompile limit (8) it silently runs the
        # frame eagerly, which computes with other roundings (a PPL measured "compiled" was the eager one's,
        # seen with flex_attention). A higher limit, and an error rather than a silent fallback.
        limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        with (inductor_config.patch(freezing=self.freezing),
              torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True),
              attention_implementation(self.model, self.attention)):
            return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # config, device, ... of the wrapped model
        return getattr(self.__dict__["model"], name)


ATTENTIONS = ("sdpa", "eager", "flex_attention")


@contextmanager
def attention_implementation(model: nn.Module, attention: str | None) -> Iterator[None]:
    """Run the block with the model's attention set to ``attention`` (a transformers attention
    implementation; None: unchanged), then set it back. :class:`CompiledModel` uses it so that a compiled
    forward can run e.g. ``flex_attention`` (which inductor turns into one fused C++ kernel on the CPU:
    measured faster than SDPA in float32 there, docs/inference.md) while the same model's eager and
    cached-decoding calls keep the attention they were loaded with (``flex_attention`` in eager mode, or
    in transformers' compiled decode step with a static cache, is slow or fails to compile on the CPU)."""
    if attention is None:
        yield
        return
    if attention not in ATTENTIONS:
        raise SpikequantError(f"unknown attention implementation {attention!r}; choose from {', '.join(ATTENTIONS)}")
    before = model.config._attn_implementation
    if before and before.startswith("spikequant_"):
        raise SpikequantError(f"the model's attention ({before}) carries spikequant's KV-cache quantization; "
                              f"it cannot run as {attention}")
    if before == attention:
        yield
        return
    model.set_attn_implementation(attention)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def compile_model(model: nn.Module, **kwargs: Any) -> CompiledModel:
    """The model (float or int8) compiled for repeated forwards; see :class:`CompiledModel`."""
    return CompiledModel(model, **kwargs)


class Int8GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with int8 gate / up / down linears, where the product and the
    quantization of ``down``'s input run as one loop (compiled; prefill-sized inputs only) instead of four
    passes over the intermediate tensor. The submodules keep their names, so the state dict and the
    checkpoint are those of the unfused MLP; the result equals the unfused module's bit for bit (tested)."""

    def __init__(self, mlp: nn.Module, parts: tuple[str, ...]) -> None:
        """``parts``: the MLP's attribute names of gate, up, down and the activation (from ``ArchSpec``)."""
        super().__init__()
        self._parts = parts
        for name in parts:
            setattr(self, name, getattr(mlp, name))
        self._hf_forward = type(mlp).forward  # the HF module's own forward (a plain function), on these parts

    def unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._hf_forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self._parts[:3])
        if torch.compiler.is_compiling() or down.quant == "eager" or x.numel() // x.shape[-1] <= AUTO_SMALL_M:
            return self.unfused_forward(x)
        fn = _compiled_swiglu_quantize()
        if fn is None:
            if down.quant == "compiled":
                raise Int8BackendError("int8 input quantization 'compiled': torch.compile does not work here "
                                       "(e.g. no C++ compiler); use 'eager' or 'auto'")
            return self.unfused_forward(x)
        return down.forward_int8(fn(gate(x), up(x), down.input_scale), x.dtype)


class Int8QuantNorm(nn.Module):
    """An RMSNorm whose output feeds int8 linears sharing one input scale (q/k/v, gate/up): for
    prefill-sized inputs, the norm's elementwise part and the quantization of its output run as one loop
    (compiled), and the int8 tensor is handed to the linears through their shared input, so they do not
    quantize it again. The variance is computed by the same ops as the norm's own forward, and the output
    equals it bit for bit (checked on a probe when fused, and tested); ``weight`` keeps its name, so the
    state dict is the unfused model's."""

    def __init__(self, norm: nn.Module, linear: Int8Linear) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)
        self._hf_forward = type(norm).forward
        self.linear = [linear]  # in a list: not a submodule (no second copy in the state dict)

    def unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._hf_forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear[0]
        if (torch.compiler.is_compiling() or lin.quant == "eager" or lin.shared is None
                or x.numel() // x.shape[-1] <= AUTO_SMALL_M):
            return self.unfused_forward(x)
        fn = _compiled_norm_quantize()
        if fn is None:
            return self.unfused_forward(x)
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        y, qx = fn(x, variance, self.weight, self.variance_epsilon, lin.input_scale)
        lin.shared.put(y, qx)
        return y


def _is_silu(act: nn.Module) -> bool:
    probe = torch.linspace(-6, 6, 25)
    try:
        return torch.equal(act(probe), F.silu(probe))
    except Exception:  # noqa: BLE001 - any other activation module: not fused
        return False


def _norm_matches(norm: nn.Module) -> bool:
    """Whether ``norm`` computes what :class:`Int8QuantNorm` fuses (HF's Llama-style RMSNorm), on a probe."""
    if not isinstance(getattr(norm, "weight", None), torch.Tensor) or not hasattr(norm, "variance_epsilon"):
        return False
    dtype = norm.weight.dtype
    probe = torch.linspace(-40, 40, 3 * norm.weight.numel(), dtype=torch.float32).reshape(3, -1).to(dtype)
    var = probe.to(torch.float32).pow(2).mean(-1, keepdim=True)
    try:
        with torch.no_grad():
            mine = _norm_quantize(probe, var, norm.weight, float(norm.variance_epsilon), torch.tensor(1.0))[0]
            return torch.equal(norm(probe), mine)
    except Exception:  # noqa: BLE001 - anything else: not fused
        return False


def fuse_norms(model: nn.Module) -> int:
    """Put an :class:`Int8QuantNorm` in place of each pre-attention / pre-MLP RMSNorm whose output feeds
    a shared group of int8 linears (q/k/v, gate/up). Returns the number fused."""
    from spikequant.models.arch import get_arch

    try:
        arch = get_arch(model)
    except SpikequantError:
        return 0
    fused = 0
    for i in range(len(model.get_submodule(arch.layers))):
        layer = model.get_submodule(arch.layer_path(i))
        for norm_path, first in ((arch.input_norm, arch.q_proj), (arch.post_attn_norm, arch.gate_proj)):
            norm, lin = layer.get_submodule(norm_path), layer.get_submodule(first)
            if isinstance(norm, Int8QuantNorm):
                fused += 1
            elif isinstance(lin, Int8Linear) and lin.shared is not None and _norm_matches(norm):
                _set_module(layer, norm_path, Int8QuantNorm(norm, lin))
                fused += 1
    return fused


def fuse_mlps(model: nn.Module) -> int:
    """Put an :class:`Int8GatedMLP` in place of every gated SiLU MLP whose three linears are int8 (layers
    with a spike-exempt float ``down_proj`` keep their MLP). Returns the number fused."""
    from spikequant.models.arch import get_arch

    try:
        arch = get_arch(model)
    except SpikequantError:
        return 0
    if not arch.gated_mlp:
        return 0
    mlp_path = arch.gate_proj.rsplit(".", 1)[0]
    parts = tuple(p.rsplit(".", 1)[1] for p in (arch.gate_proj, arch.up_proj, arch.down_proj, arch.act_fn))
    if any(p.rsplit(".", 1)[0] != mlp_path for p in (arch.up_proj, arch.down_proj, arch.act_fn)):
        return 0  # not one MLP module holding the three linears and the activation
    fused = 0
    for i in range(len(model.get_submodule(arch.layers))):
        name = f"{arch.layer_path(i)}.{mlp_path}"
        mlp = model.get_submodule(name)
        if isinstance(mlp, Int8GatedMLP):
            fused += 1
            continue
        mods = [getattr(mlp, k, None) for k in parts]
        if not all(isinstance(m, Int8Linear) for m in mods[:3]) or not _is_silu(mods[3]):
            continue
        _set_module(model, name, Int8GatedMLP(mlp, parts))
        fused += 1
    return fused


def scheme_problem(weights: QuantSpec | None, inputs: QuantSpec | None, outputs: QuantSpec | None) -> str | None:
    """Why a linear quantized this way cannot run as int8 W8A8 static per-tensor (None: it can)."""
    if outputs is not None:
        return "output quantization (the int8 kernel produces float outputs)"
    if weights is None or inputs is None:
        return ("weight-only quantization" if inputs is None else "activation-only quantization") + \
            " (the int8 backend runs W8A8 only)"
    w, a = weights, inputs
    if w.format != "int" or w.bits != 8 or not w.symmetric or w.granularity not in ("channel", "tensor"):
        return f"weights {w.label} (needs int8 symmetric per-channel or per-tensor)"
    if a.format != "int" or a.bits != 8 or not a.symmetric:
        return f"inputs {a.label} (needs int8 symmetric)"
    if a.dynamic or a.granularity != "tensor":
        return f"inputs {a.label} (needs static per-tensor scales; dynamic / per-token are not supported)"
    if a.keep_first_tokens or a.outlier_tokens:
        return f"inputs {a.label} (tokens kept out of the shared scale are not supported)"
    return None


def transforms_problem(state: dict[str, Any] | None) -> str | None:
    """Which model-level transforms (as ``transform_state`` records them) the int8 backend cannot run."""
    if not state:
        return None
    parts = [k for k, v in (("online R4 Hadamard", state.get("r4")), ("online o_proj Hadamard", state.get("o_online")),
                            ("R3 rotation of Q/K", state.get("r3")),
                            ("KV-cache quantization", any(e["k"] or e["v"] for e in state.get("kv") or [])),
                            ("dimension expansion", state.get("expansion"))) if v]
    return None if not parts else f"it has {', '.join(parts)} (W8A8 static models without online transforms only)"


def _why_not_int8(linear: nn.Module) -> str | None:
    """Why a planned linear cannot run as int8 W8A8 static per-tensor (None: it can)."""
    scheme = getattr(linear, SCHEME, None)
    q_in, q_out = getattr(linear, INPUT_QUANTIZER, None), getattr(linear, OUTPUT_QUANTIZER, None)
    why = scheme_problem(None if scheme is None else scheme.weights, None if q_in is None else q_in.spec,
                         None if q_out is None else q_out.spec)
    if why is not None:
        return why
    if q_in.status is not QuantStatus.FROZEN or q_in.scale is None or q_in.scale.numel() != 1:
        return "an input quantizer that is not calibrated (no frozen scale)"
    if getattr(linear, "weight_zero_point", None) is not None or getattr(linear, "weight_scale", None) is None:
        return "weights without symmetric weight_scale parameters"
    if any(k.startswith("spikequant_online") or k == "spikequant_r4_handle" for k in vars(linear)):
        return "an online Hadamard on its input"
    return None


def check_manifest(manifest: dict[str, Any], where: str) -> None:
    """The int8 checks on a saved quantized model's manifest (``spikequant.json``), before it is loaded."""
    why = transforms_problem(manifest.get("transforms"))
    if why is not None:
        raise Int8BackendError(f"int8 backend cannot run {where}: {why}")
    quantized = 0
    for name, slots in manifest.get("plan", {}).items():
        specs = {k: QuantSpec.from_dict(v, f"{where}: {name}.{k}") for k, v in slots.items()}
        if all(v is None for v in specs.values()):
            continue
        quantized += 1
        why = scheme_problem(specs.get("weights"), specs.get("inputs"), specs.get("outputs"))
        if why is not None:
            raise Int8BackendError(f"int8 backend cannot run {name}: {why}")
    if not quantized:
        raise Int8BackendError(f"int8 backend: {where} has no quantized linears")


def check_int8_linear(linear: nn.Module, name: str = "linear") -> None:
    why = _why_not_int8(linear)
    if why is not None:
        raise Int8BackendError(f"int8 backend cannot run {name}: {why}")


def check_int8_model(model: nn.Module) -> list[str]:
    """The linears to convert (everything with a non-float scheme); raises naming the first one the int8
    backend cannot run, or a model-level transform (online rotation, KV-cache quantization) it cannot."""
    from spikequant.transforms import transform_state

    why = transforms_problem(transform_state(model))
    if why is not None:
        raise Int8BackendError(f"int8 backend cannot run this model: {why}")
    names = []
    for name, m in model.named_modules():
        scheme = getattr(m, SCHEME, None)
        if scheme is None or scheme.is_float:
            continue
        check_int8_linear(m, name)
        names.append(name)
    if not names:
        raise Int8BackendError("int8 backend: the model has no quantized linears (quantize it with a W8A8 "
                               "static recipe, e.g. --recipe spike-w8a8-tensor-static)")
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _strip_fake_quant(linear: nn.Module) -> None:
    for h in getattr(linear, HOOKS, []):
        h.remove()
    setattr(linear, HOOKS, [])


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every floating-point parameter and buffer to ``dtype`` except those of :class:`Int8Linear`
    modules (their scales stay float32: an int8 grid times a rounded scale would no longer be exact) and
    the tables :func:`store_embeddings` keeps in their own dtype."""
    skip = {id(t) for m in model.modules() if isinstance(m, Int8Linear) or getattr(m, EMBEDDING_HOOKS, None)
            for t in [*m.buffers(), *m.parameters()]}
    done: dict[int, torch.Tensor] = {}  # one new tensor per old one: tied weights stay tied
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Int8Linear):
                if m.bias is not None:
                    m.bias = m.bias.to(dtype)  # added to the output, in the activation dtype
                continue
            for k, p in m._parameters.items():
                if p is not None and p.is_floating_point() and p.dtype != dtype and id(p) not in skip:
                    if id(p) not in done:
                        done[id(p)] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
                    m._parameters[k] = done[id(p)]
            for k, b in m._buffers.items():
                if b is not None and b.is_floating_point() and b.dtype != dtype and id(b) not in skip:
                    if id(b) not in done:
                        done[id(b)] = b.to(dtype)
                    m._buffers[k] = done[id(b)]
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype
    return model


EMBEDDING_HOOKS = "_spikequant_embedding_hooks"


def store_embeddings(model: nn.Module, dtype: torch.dtype, activations: torch.dtype) -> nn.Module:
    """Store the input embedding table and ``lm_head`` (tied or not) in ``dtype`` while the rest of the
    model computes in ``activations``: the lookup's output is cast to ``activations``, ``lm_head``'s input
    to ``dtype`` and its logits back to ``activations`` (hooks on the two modules; calling it again with
    ``dtype == activations`` removes them). What it is for: the int8 backend with float32 activations,
    where SmolLM2's float32 table (21 % of its parameters) alone keeps the weights above 1/3 of fp32."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    # a quantized lm_head (an Int8Linear: int8 weight buffer) is not a float table: left as it is
    tables = [m for m in (emb, head) if m is not None and not isinstance(m, Int8Linear)]
    for m in tables:
        for h in getattr(m, EMBEDDING_HOOKS, []):
            h.remove()
        setattr(m, EMBEDDING_HOOKS, [])
    done: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for m in tables:
            w = m.weight
            if id(w) not in done:
                done[id(w)] = nn.Parameter(w.to(dtype), requires_grad=False) if w.dtype != dtype else w
            m.weight = done[id(w)]
    if tied:
        head.weight = emb.weight
    if dtype == activations:
        return model

    def to_activations(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return out.to(activations)

    def to_table(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].to(dtype), *args[1:])

    if emb in tables:
        setattr(emb, EMBEDDING_HOOKS, [emb.register_forward_hook(to_activations)])
    if head in tables:
        setattr(head, EMBEDDING_HOOKS, [head.register_forward_pre_hook(to_table),
                                        head.register_forward_hook(to_activations)])
    return model


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its first floating-point parameter outside the embedding table
    and ``lm_head`` (which :func:`store_embeddings` may keep in another dtype)."""
    tables = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in tables:
            return p.dtype
    return next(model.parameters()).dtype


def convert_to_int8(model: nn.Module, kernel: str = DEFAULT_KERNEL, dtype: torch.dtype = torch.float32,
                    progress: bool = False, quant: str | None = None) -> list[str]:
    """Swap every quantized linear of a W8A8 static model for an :class:`Int8Linear` (in place); float
    linears (spike-exempt ones) stay as they are. ``dtype``: the activations and float modules (float32 as
    the fake-quant reference, or bfloat16). Returns the converted names. Checks the whole model first, so
    a model it cannot run is left unchanged."""
    if kernel not in KERNELS:
        raise Int8BackendError(f"unknown int8 kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    names = check_int8_model(model)
    tied = _tied_lm_head(model)
    for name in names:
        linear = model.get_submodule(name)
        _strip_fake_quant(linear)
        _set_module(model, name, Int8Linear.from_linear(linear, kernel, name, quant))
    share_inputs(model)
    cast_float_parts(model, dtype)
    if tied:
        model.tie_weights()
    fuse_mlps(model)
    fuse_norms(model)
    return names


def _tied_lm_head(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent weight buffers in memory (a tied tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for m in model.modules() if isinstance(m, Int8Linear) for b in m.buffers()]:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def save_int8(model: nn.Module, tokenizer: Any, output: str | Path, source: str | None = None) -> Path:
    """Write a converted model (see the module docstring for the format). Returns the folder."""
    from safetensors.torch import save_model

    int8 = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if not int8:
        raise Int8BackendError("save_int8: the model has no Int8Linear modules; convert it first")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "spikequant-int8"})
    schemes = {}
    for n in int8:
        s = getattr(model.get_submodule(n), SCHEME, None)
        schemes[n] = None if s is None else {k: (None if getattr(s, k) is None else getattr(s, k).to_dict())
                                             for k in ("weights", "inputs", "outputs")}
    manifest = {"format": "spikequant-int8", "format_version": INT8_FORMAT_VERSION, "source": source,
                "dtype": str(activation_dtype(model)).removeprefix("torch."),
                "embedding_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
                "attn_implementation": (model.config._attn_implementation or "sdpa").removeprefix("spikequant_"),
                "int8_linears": int8, "schemes": schemes}
    (out / INT8_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def is_int8_dir(path: str | Path) -> bool:
    return (Path(path) / INT8_MANIFEST).is_file()


def load_int8(path: str | Path, kernel: str = DEFAULT_KERNEL, dtype: torch.dtype | None = None,
              quant: str | None = None, embedding_dtype: torch.dtype | None = None):
    """Load a folder written by :func:`save_int8`: the model is built from its config, the int8 linears
    put in place, then the tensors loaded (no float copy of the int8 weights is ever made). ``dtype``:
    the activations and float modules (default: as saved); ``embedding_dtype``: the embedding table and
    ``lm_head`` (default: as saved if the checkpoint stores them apart, else ``dtype``; see
    :func:`store_embeddings`). Returns (model, tokenizer, manifest)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spikequant.models.loading import DTYPES

    path = Path(path)
    try:
        manifest = json.loads((path / INT8_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path / INT8_MANIFEST} is unreadable: {e}") from None
    if manifest.get("format_version") != INT8_FORMAT_VERSION:
        raise ModelLoadError(f"{path}: unsupported spikequant-int8 format version {manifest.get('format_version')}")
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"{path} has no model.safetensors")
    saved_dtype = DTYPES[manifest.get("dtype", "float32")]
    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = manifest.get("attn_implementation") or "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    state = load_file(str(path / "model.safetensors"))
    for name in manifest["int8_linears"]:
        lin = model.get_submodule(name)
        mod = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, kernel, quant)
        scheme = (manifest.get("schemes") or {}).get(name)
        if scheme is not None:
            from spikequant.quant import ModuleQuant

            setattr(mod, SCHEME, ModuleQuant(**{k: QuantSpec.from_dict(v) for k, v in scheme.items()}))
        _set_module(model, name, mod)
    model.load_state_dict(state, strict=False, assign=True)
    if _tied_in_config(model):
        # safetensors stores a tied tensor once, under either name: point both modules at the loaded one.
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if emb.weight.is_meta and not head.weight.is_meta:
            emb.weight = head.weight
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    # Non-persistent buffers (rotary inv_freq) are not saved: rebuild them on the CPU from the config.
    rebuilt = {n for n in missing if n.endswith("inv_freq") or n.endswith("original_inv_freq")}
    if rebuilt:
        _rebuild_rotary(model, config)
        missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(f"{path / 'model.safetensors'} lacks {missing[0]} (and {len(missing) - 1} more)")
    saved_table = DTYPES[manifest.get("embedding_dtype", manifest.get("dtype", "float32"))]
    act = saved_dtype if dtype is None else dtype
    table = embedding_dtype or (saved_table if saved_table != saved_dtype else act)
    if table != act:  # first, so that the cast below leaves the table as stored (no float32 round trip)
        store_embeddings(model, table, act)
    cast_float_parts(model, act)
    share_inputs(model)
    fuse_mlps(model)
    fuse_norms(model)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, manifest


def _tied_in_config(model: nn.Module) -> bool:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(cfg, "tie_word_embeddings", False))


def _rebuild_rotary(model: nn.Module, config: Any) -> None:
    for name, m in model.named_modules():
        if getattr(m, "inv_freq", None) is not None and m.inv_freq.is_meta:
            fresh = type(m)(config=config)  # built outside the meta context: on the CPU
            _set_module(model, name, fresh)
