"""SmoothQuant (Xiao et al., 2023) as a baseline: migrate activation range into the weights.

For a linear fed by x, per input channel j: s_j = max|x_j|^α / max|W_{:,j}|^(1-α); x_j / s_j and
W_{:,j} · s_j leave the product unchanged. The division is folded into whatever produces x — the RMSNorm
weight (q/k/v, gate/up), the up_proj rows (down_proj, since act(gate)·up is linear in up) and the v_proj
rows (o_proj, per KV head, shared by the query heads of a GQA group) — so the FP model is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spikequant.algorithms.base import Modifier, QuantContext, register, require_positive_int
from spikequant.models import decoder_layers, get_arch, model_dims
from spikequant.models.forward import forward_windows


@torch.inference_mode()
def channel_maxima(model: nn.Module, windows: torch.Tensor, paths: list[str], progress: bool = True) -> dict:
    """Per-input-channel max |x| of the given layer-relative linear paths, for every decoder layer."""
    layers = decoder_layers(model)
    stats: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        for path in paths:
            def hook(_m, args, key=(i, path)):
                a = args[0].detach().abs().flatten(0, -2).amax(0).float()
                stats[key] = a if key not in stats else torch.maximum(stats[key], a)

            handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
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
def smooth_model(model: nn.Module, windows: torch.Tensor, alpha: float = 0.5, smooth_o: bool = True,
                 progress: bool = True) -> dict[str, float]:
    """Fold SmoothQuant scales into ``model`` in place; returns the largest scale per linear group."""
    arch = get_arch(model)
    dims = model_dims(model)
    # the first reader of each norm stands for all of them (they read the same tensor)
    paths = [c[0] for _, c in arch.norm_consumers] + [arch.down_proj] + ([arch.o_proj] if smooth_o else [])
    stats = channel_maxima(model, windows, paths, progress)
    report: dict[str, float] = {}
    for i, layer in enumerate(decoder_layers(model)):
        def lin(path: str, layer: nn.Module = layer) -> nn.Linear:
            return layer.get_submodule(path)  # type: ignore[return-value]

        for norm_path, consumers in arch.norm_consumers:
            ws = [lin(p).weight for p in consumers]
            s = _scales(stats[(i, consumers[0])], ws, alpha)
            norm = layer.get_submodule(norm_path)
            norm.weight.div_(s.to(norm.weight.dtype))
            for w in ws:
                w.mul_(s.to(w.dtype))
            report[f"{i}.{norm_path}"] = float(s.max())
        # down_proj: x = act(gate) * up, so dividing up's output rows divides x.
        up, down = lin(arch.up_proj), lin(arch.down_proj)
        s = _scales(stats[(i, arch.down_proj)], [down.weight], alpha)
        up.weight.div_(s.to(up.weight.dtype)[:, None])
        if up.bias is not None:
            up.bias.div_(s.to(up.bias.dtype))
        down.weight.mul_(s.to(down.weight.dtype))
        report[f"{i}.{arch.down_proj}"] = float(s.max())
        if smooth_o:
            # o_proj input channel (head h, d) is V channel (h // group, d): one scale per KV channel.
            v, o = lin(arch.v_proj), lin(arch.o_proj)
            group = dims.num_heads // dims.num_kv_heads
            a = stats[(i, arch.o_proj)].view(dims.num_kv_heads, group, dims.head_dim).amax(1)
            wm = o.weight.detach().abs().amax(0).float().view(dims.num_kv_heads, group, dims.head_dim).amax(1)
            s_kv = (a.clamp(min=1e-5).pow(alpha) / wm.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
            v.weight.div_(s_kv.flatten().to(v.weight.dtype)[:, None])
            if v.bias is not None:
                v.bias.div_(s_kv.flatten().to(v.bias.dtype))
            o.weight.mul_(s_kv.repeat_interleave(group, 0).flatten().to(o.weight.dtype))
            report[f"{i}.{arch.o_proj}"] = float(s_kv.max())
    return report


@register
@dataclass
class SmoothQuant(Modifier):
    """Fold SmoothQuant scales (migration strength ``alpha``) from ``num_samples`` calibration windows."""

    type = "smoothquant"
    alpha: float = 0.5
    num_samples: int = 16
    smooth_o: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        require_positive_int(self.num_samples, "num_samples")

    def apply(self, ctx: QuantContext) -> None:
        rep = smooth_model(ctx.model, ctx.calibration_windows()[: self.num_samples], self.alpha, self.smooth_o,
                           ctx.progress)
        ctx.findings["smoothquant"] = {"alpha": self.alpha, "max_scale": max(rep.values())}
