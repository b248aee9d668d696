"""SmoothQuant (Xiao et al., 2023) as a baseline: migrate activation range into the weights.

For a linear fed by x, per input channel j: s_j = max|x_j|^α / max|W_{:,j}|^(1-α); x_j / s_j and
W_{:,j} · s_j leave the product unchanged. The division is folded into whatever produces x, so the FP
model is unchanged.

The paper's setting (``mit-han-lab/smoothquant``, ``smoothquant/smooth.py``, ``smooth_lm``, which the
spike-aware paper's code calls) folds only the two RMSNorms: ``input_layernorm`` into q/k/v and
``post_attention_layernorm`` into gate/up. That is the default here. Two further folds are ours and
opt-in: ``down`` (the up_proj rows, since act(gate)·up is linear in up) and ``o`` (the v_proj rows, per KV
head, shared by the query heads of a GQA group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spikequant.algorithms.base import Modifier, QuantContext, register, require_positive_int
from spikequant.models import decoder_layers, get_arch, model_dims
from spikequant.models.forward import forward_windows


def channel_max_hooks(layer: nn.Module, i: int, paths: list[str], stats: dict[tuple[int, str], torch.Tensor]) -> list:
    """Forward pre-hooks on decoder layer ``i``'s linears at ``paths`` that keep the running per-input-channel
    max |x| in ``stats[(i, path)]``; returns the handles (remove them when done)."""
    handles = []
    for path in paths:
        def hook(_m, args, key=(i, path)):
            a = args[0].detach().abs().flatten(0, -2).amax(0).float()
            stats[key] = a if key not in stats else torch.maximum(stats[key], a)

        handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
    return handles


def smooth_paths(model: nn.Module, down: bool = False, o: bool = False) -> list[str]:
    """The layer-relative linears whose input statistics the folds need (the first reader of each norm
    stands for all of them: they read the same tensor)."""
    arch = get_arch(model)
    return ([c[0] for _, c in arch.norm_consumers] + ([arch.down_proj] if down else [])
            + ([arch.o_proj] if o else []))


@torch.inference_mode()
def channel_maxima(model: nn.Module, windows: torch.Tensor, paths: list[str], progress: bool = True) -> dict:
    """Per-input-channel max |x| of the given layer-relative linear paths, for every decoder layer."""
    stats: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        handles += channel_max_hooks(layer, i, paths, stats)
    try:
        forward_windows(model, windows, "smoothquant statistics", progress)
    finally:
        for h in handles:
            h.remove()
    return stats


def _scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth_model(model: nn.Module, windows: torch.Tensor, alpha: float = 0.5, down: bool = False,
                 o: bool = False, progress: bool = True) -> dict[str, float]:
    """Fold SmoothQuant scales into ``model`` in place; returns the largest scale per linear group.

    Always the two norm folds (the paper's ``smooth_lm``); ``down`` / ``o`` add ours into up_proj / v_proj.
    All statistics come from the model before any fold.
    """
    stats = channel_maxima(model, windows, smooth_paths(model, down, o), progress)
    report: dict[str, float] = {}
    for i, layer in enumerate(decoder_layers(model)):
        report.update(smooth_layer(model, i, layer, stats, alpha, down, o))
    return report


@torch.no_grad()
def smooth_layer(model: nn.Module, i: int, layer: nn.Module, stats: dict[tuple[int, str], torch.Tensor],
                 alpha: float = 0.5, down: bool = False, o: bool = False) -> dict[str, float]:
    """Fold decoder layer ``i``'s SmoothQuant scales from its statistics ``stats[(i, path)]`` (what
    :func:`smooth_model` does for each layer, and a streamed run for the layer it holds); returns the
    largest scale per linear group."""
    arch = get_arch(model)
    dims = model_dims(model)
    report: dict[str, float] = {}

    def lin(path: str) -> nn.Linear:
        return layer.get_submodule(path)  # type: ignore[return-value]

    for norm_path, consumers in arch.norm_consumers:
        ws = [lin(p).weight for p in consumers]
        s = _scales(stats[(i, consumers[0])], ws, alpha)
        norm = layer.get_submodule(norm_path)
        norm.weight.div_(s.to(norm.weight.dtype))
        for w in ws:
            w.mul_(s.to(w.dtype))
        report[f"{i}.{norm_path}"] = float(s.max())
    if down:
        # down_proj: x = act(gate) * up, so dividing up's output rows divides x.
        up, dn = lin(arch.up_proj), lin(arch.down_proj)
        s = _scales(stats[(i, arch.down_proj)], [dn.weight], alpha)
        up.weight.div_(s.to(up.weight.dtype)[:, None])
        if up.bias is not None:
            up.bias.div_(s.to(up.bias.dtype))
        dn.weight.mul_(s.to(dn.weight.dtype))
        report[f"{i}.{arch.down_proj}"] = float(s.max())
    if o:
        # o_proj input channel (head h, d) is V channel (h // group, d): one scale per KV channel.
        v, op = lin(arch.v_proj), lin(arch.o_proj)
        group = dims.num_heads // dims.num_kv_heads
        a = stats[(i, arch.o_proj)].view(dims.num_kv_heads, group, dims.head_dim).amax(1)
        wm = op.weight.detach().abs().amax(0).float().view(dims.num_kv_heads, group, dims.head_dim).amax(1)
        s_kv = (a.clamp(min=1e-5).pow(alpha) / wm.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        v.weight.div_(s_kv.flatten().to(v.weight.dtype)[:, None])
        if v.bias is not None:
            v.bias.div_(s_kv.flatten().to(v.bias.dtype))
        op.weight.mul_(s_kv.repeat_interleave(group, 0).flatten().to(op.weight.dtype))
        report[f"{i}.{arch.o_proj}"] = float(s_kv.max())
    return report


@register
@dataclass
class SmoothQuant(Modifier):
    """``{type: smoothquant, alpha: 0.5, num_samples: null, down: false, o: false}``

    Fold SmoothQuant scales (migration strength ``alpha``) computed as the per-channel max |x| over
    ``num_samples`` calibration windows (default ``null``: all of the recipe's calibration windows, 32 x
    512 tokens by default; the paper's code used 512 x 512 tokens of the Pile validation set). The
    default folds are the paper's two (norms into q/k/v and gate/up); ``down: true`` and ``o: true`` add
    ours (down_proj through up_proj rows, o_proj through v_proj rows)."""

    type = "smoothquant"
    alpha: float = 0.5
    num_samples: int | None = None
    down: bool = False
    o: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.num_samples is not None:
            require_positive_int(self.num_samples, "num_samples")
        for name in ("down", "o"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def windows(self, ctx: QuantContext) -> torch.Tensor:
        windows = ctx.calibration_windows()
        return windows if self.num_samples is None else windows[: self.num_samples]

    def apply(self, ctx: QuantContext) -> None:
        windows = self.windows(ctx)
        rep = smooth_model(ctx.model, windows, self.alpha, self.down, self.o, ctx.progress)
        self.record(ctx, rep, windows)

    def paths(self, model: nn.Module) -> list[str]:
        """The layer-relative linears whose input statistics this modifier's folds need."""
        return smooth_paths(model, self.down, self.o)

    def smooth_layer(self, ctx: QuantContext, i: int, layer: nn.Module,
                     stats: dict[tuple[int, str], torch.Tensor]) -> dict[str, float]:
        """Fold layer ``i`` alone from its statistics with this modifier's settings (the streamed step)."""
        return smooth_layer(ctx.model, i, layer, stats, self.alpha, self.down, self.o)

    def record(self, ctx: QuantContext, report: dict[str, float], windows: torch.Tensor) -> None:
        ctx.findings["smoothquant"] = {"alpha": self.alpha, "max_scale": max(report.values()),
                                       "windows": int(windows.shape[0]), "tokens": int(windows.numel()),
                                       "folds": ["qkv", "gate_up"] + ["down"] * self.down + ["o"] * self.o}
