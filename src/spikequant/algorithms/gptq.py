"""GPTQ (Frantar et al., 2023) weight quantization, calibrated layer by layer on the (rotated) model.

For one linear with calibration inputs X, GPTQ quantizes the weight one input column at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse of
H = 2·XᵀX/N (damped by ``damp`` x mean(diag H)); the inverse is taken once through a Cholesky factor
and applied block-wise (``block_size`` columns at a time, lazy batch updates). Options: act-order
(columns by decreasing diag H), per-channel or per-group scales (static groups, so a group is a
contiguous run of original columns whatever the order), symmetric or asymmetric, and the MSE clip grid
(per output row and group: shrink factors 1 − i/100, i < 80, error norm 2.4).

The model driver captures the inputs of decoder layer 0 (a hook that raises stops the forward), then runs
layer by layer: each layer is calibrated on the outputs of the already-quantized layers before it, and,
with ``true_sequential``, inside a layer o_proj sees quantized q/k/v, and so on. Online transforms on the
linears (R4) are active, so GPTQ sees the rotated inputs; activations and the KV cache stay in float
during calibration, as in QuaRot. lm_head is never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spikequant.algorithms.base import Modifier, QuantContext, register, require_positive_int
from spikequant.errors import RecipeError
from spikequant.models import get_arch
from spikequant.models.runner import LayerInputs, run_layers, stopped, stopping_at
from spikequant.quant.apply import set_weight_qparams, weight_qparams_of
from spikequant.quant.fake import int_qdq, int_qparams
from spikequant.quant.spec import QuantSpec


def check_weight_spec(spec: QuantSpec, where: str = "gptq") -> None:
    if spec.format != "int":
        raise RecipeError(f"{where}: GPTQ needs an int weight format, got {spec.format}")
    if spec.granularity not in ("channel", "group"):
        raise RecipeError(f"{where}: GPTQ weight granularity must be channel or group, got {spec.granularity}")


def weight_qparams(
    w: torch.Tensor, spec: QuantSpec, mse_clip: bool = False, norm: float = 2.4, grid: int = 100,
    max_shrink: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) per row (``channel``: shape (rows, 1)) or per row and group ((rows, groups, 1)).

    With ``mse_clip``, each row/group picks the shrink factor p = 1 − i/grid (i < max_shrink·grid) of
    its range that minimises Σ|q(w) − w|^norm; otherwise p = ``spec.clip_ratio``.
    """
    wv = w.unflatten(-1, (-1, spec.group_size)) if spec.granularity == "group" else w
    unit = QuantSpec(bits=spec.bits, symmetric=spec.symmetric)  # clip handled here
    if spec.symmetric:
        amax = wv.abs().amax(-1, keepdim=True)
        stats: dict[str, torch.Tensor] = {"amax": amax}
    else:
        stats = {"xmin": wv.amin(-1, keepdim=True), "xmax": wv.amax(-1, keepdim=True)}

    def params(p: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if spec.symmetric:
            return int_qparams(unit, amax=stats["amax"] * p)
        return int_qparams(unit, xmin=stats["xmin"] * p, xmax=stats["xmax"] * p)

    if not mse_clip:
        return params(spec.clip_ratio)
    best_err = torch.full(wv.shape[:-1] + (1,), math.inf, dtype=w.dtype, device=w.device)
    best_p = torch.ones_like(best_err)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, zero = params(p)
        err = (int_qdq(wv, unit, scale, zero) - wv).abs().pow(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return params(best_p)


@dataclass
class GPTQResult:
    weight: torch.Tensor  # quantized, dequantized values, same shape/dtype as the input weight
    scale: torch.Tensor
    zero: torch.Tensor | None
    loss: float  # Σ (w − q)² / [H⁻¹]_jj / 2, the objective GPTQ minimises greedily


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01, block_size: int = 128,
    act_order: bool = True, mse_clip: bool = False,
) -> GPTQResult:
    """GPTQ of one weight (out, in) given H = 2·XᵀX/N (in, in). Pure function: inputs are not modified."""
    check_weight_spec(spec)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float64).clone()
    rows, cols = w.shape
    if spec.granularity == "group" and cols % spec.group_size:  # type: ignore[operator]
        raise RecipeError(f"gptq: in_features {cols} is not divisible by group_size {spec.group_size}")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zero = weight_qparams(w, spec, mse_clip)  # static: from the weight before any update
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols, device=h.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    h += damp * torch.mean(torch.diagonal(h)) * torch.eye(cols, dtype=h.dtype, device=h.device)
    # Upper Cholesky factor of H⁻¹: row j holds the update weights for the columns after j.
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise RecipeError(f"gptq: the Hessian of a {rows}x{cols} weight is not positive definite with "
                          f"damp={damp}; raise damp (e.g. 0.01-0.1) or use more calibration samples") from None
    hinv = hinv.to(torch.float32)
    unit = QuantSpec(bits=spec.bits, symmetric=spec.symmetric)
    g = spec.group_size if spec.granularity == "group" else None

    def col_params(j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if g is None:
            return scale[:, 0], None if zero is None else zero[:, 0]
        k = int(perm[j]) // g
        return scale[:, k, 0], None if zero is None else zero[:, k, 0]

    q = torch.zeros_like(w)
    loss = torch.zeros((), dtype=torch.float32, device=w.device)  # one host sync at the end, not per column
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            d = h1[i, i]
            s, z = col_params(i1 + i)
            qc = int_qdq(col, unit, s, z)
            q[:, i1 + i] = qc
            e = (col - qc) / d
            loss += (col - qc).pow(2).sum() / d**2 / 2
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    return GPTQResult(out.to(weight.dtype), scale, zero, float(loss))


class Hessian:
    """Running H = 2·XᵀX/N over the rows of every batch seen by a forward pre-hook."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.n = 0

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
        n = self.n + x.shape[0]
        xx = (x.T @ x) * (2.0 / n)
        self.h = xx if self.h is None else self.h * (self.n / n) + xx
        self.n = n


@torch.no_grad()
def gptq_model(
    model: nn.Module, windows: torch.Tensor, specs: dict[str, QuantSpec], damp: float = 0.01,
    block_size: int = 128, act_order: bool = True, mse_clip: bool = False, true_sequential: bool = True,
    batch_size: int = 8, progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Quantize, in place, the weights of the decoder linears named in ``specs`` (full module name ->
    weight spec) with GPTQ on ``windows`` (N, seqlen), layer by layer on the shared runner: each layer's
    Hessians come from the outputs of the already quantized layers before it. Returns name -> {scale,
    zero, loss}."""
    arch = get_arch(model)
    for name, spec in specs.items():
        check_weight_spec(spec, f"gptq: {name}")
    results: dict[str, dict[str, Any]] = {}

    def quantize_layer(i: int, layer: nn.Module, inputs: LayerInputs) -> None:
        results.update(gptq_layer(arch, i, layer, inputs, specs, damp, block_size, act_order, mse_clip,
                                  true_sequential))

    run_layers(model, windows, quantize_layer, batch_size=batch_size, desc="gptq", progress=progress)
    return results


@torch.no_grad()
def gptq_layer(
    arch: Any, i: int, layer: nn.Module, inputs: LayerInputs, specs: dict[str, QuantSpec], damp: float = 0.01,
    block_size: int = 128, act_order: bool = True, mse_clip: bool = False, true_sequential: bool = True,
) -> dict[str, dict[str, Any]]:
    """GPTQ of decoder layer ``i`` (in place) on the inputs that enter it; what :func:`gptq_model` runs
    for each layer and a streamed run calls when the layer is loaded. Returns name -> {scale, zero, loss}."""
    results: dict[str, dict[str, Any]] = {}
    prefix = arch.layer_path(i) + "."
    for step in arch.gptq_steps(true_sequential):
        groups = [[p for p in g if prefix + p in specs] for g in step]
        groups = [g for g in groups if g]
        if not groups:
            continue
        hessians = {g[0]: Hessian() for g in groups}
        handles = [layer.get_submodule(p).register_forward_pre_hook(h) for p, h in hessians.items()]
        try:
            # Nothing after the last input we need matters: stop the layer's forward there.
            with stopping_at(layer.get_submodule(groups[-1][0])):
                for hidden, kw in inputs:
                    with stopped():
                        layer(hidden, **kw)
        finally:
            for hd in handles:
                hd.remove()
        for g in groups:
            h = hessians[g[0]].h
            assert h is not None
            for p in g:
                lin = layer.get_submodule(p)
                res = gptq_quantize(lin.weight, h, specs[prefix + p], damp, block_size, act_order, mse_clip)
                lin.weight.data = res.weight
                results[prefix + p] = {"scale": res.scale.cpu(), "loss": res.loss,
                                       **({} if res.zero is None else {"zero": res.zero.cpu()})}
    return results


@register
@dataclass
class GPTQ(Modifier):
    """Quantize the planned decoder-linear weights with GPTQ (instead of the pipeline's RTN), using the
    recipe's weight spec (and overrides) per module, on ``num_samples`` calibration windows (default: the
    recipe's calibration set). List it after ``rotate`` so it calibrates on the rotated model."""

    type = "gptq"
    stage = "weights"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    mse_clip: bool = True
    true_sequential: bool = True
    num_samples: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        require_positive_int(self.block_size, "block_size")
        require_positive_int(self.batch_size, "batch_size")
        if self.num_samples is not None:
            require_positive_int(self.num_samples, "num_samples")

    def specs(self, ctx: QuantContext) -> dict[str, QuantSpec]:
        """Full name -> weight spec of the decoder linears this modifier quantizes."""
        assert ctx.plan is not None, "the pipeline sets QuantContext.plan"
        decoder = set(_decoder_linear_names(ctx.model))
        specs = {n: mq.weights for n, mq in ctx.plan.items()
                 if mq.weights is not None and n in decoder and weight_qparams_of(ctx.model.get_submodule(n)) is None}
        for name, spec in specs.items():
            check_weight_spec(spec, f"gptq: {name}")
        return specs

    def windows(self, ctx: QuantContext) -> torch.Tensor:
        windows = ctx.calibration_windows()
        return windows if self.num_samples is None else windows[: self.num_samples]

    def apply(self, ctx: QuantContext) -> None:
        specs = self.specs(ctx)
        if not specs:
            return
        windows = self.windows(ctx)
        res = gptq_model(ctx.model, windows, specs, self.damp, self.block_size, self.act_order, self.mse_clip,
                         self.true_sequential, self.batch_size, ctx.progress)
        self.record(ctx, res, windows)

    def quantize_layer(self, ctx: QuantContext, i: int, layer: nn.Module, inputs: LayerInputs,
                       specs: dict[str, QuantSpec]) -> dict[str, dict[str, Any]]:
        """GPTQ of layer ``i`` alone with this modifier's settings (the streamed pipeline's step)."""
        return gptq_layer(get_arch(ctx.model), i, layer, inputs, specs, self.damp, self.block_size, self.act_order,
                          self.mse_clip, self.true_sequential)

    def record(self, ctx: QuantContext, res: dict[str, dict[str, Any]], windows: torch.Tensor) -> None:
        """Put the weight parameters on the modules and the summary in the findings."""
        for name, r in res.items():
            set_weight_qparams(ctx.model.get_submodule(name), r["scale"], r.get("zero"))
        ctx.findings["gptq"] = {"windows": int(len(windows)), "seqlen": int(windows.shape[1]),
                                "linears": len(res), "mean_loss": sum(r["loss"] for r in res.values()) / len(res)}


def _decoder_linear_names(model: nn.Module) -> list[str]:
    from spikequant.models import decoder_linears

    return list(decoder_linears(model))
