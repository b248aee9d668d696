"""Where the activation spikes are: per-linear statistics over calibration tokens, and detection."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from spikequant.models import decoder_linears, linear_role


@dataclass
class LinearStats:
    name: str
    layer: int
    role: str
    max_in: float  # max |input| over all calibration tokens
    max_out: float  # max |output|
    pct_in: float  # mean over windows of the per-window percentile of |input|
    window: int  # where max |input| sits
    position: int
    channel: int
    token: str  # the text of the token at that position

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def collect_stats(
    model: nn.Module, windows: torch.Tensor, tokenizer=None, percentile: float = 99.9, progress: bool = True
) -> list[LinearStats]:
    """Run ``windows`` (N, seqlen) through ``model`` and record input/output magnitudes of every decoder
    linear, with the location of each input maximum (window, token position, channel)."""
    linears = decoder_linears(model)
    acc: dict[str, dict] = {n: {"max_in": -1.0, "max_out": 0.0, "pct": [], "loc": (0, 0, 0)} for n in linears}
    current = {"w": 0}

    def hook(name: str):
        def fn(_m, args, out):
            x = args[0].detach()[0].abs().float()  # (T, d_in), batch of one window
            a = acc[name]
            flat = x.flatten()
            v, i = flat.max(0)
            if float(v) > a["max_in"]:
                a["max_in"] = float(v)
                a["loc"] = (current["w"], int(i) // x.shape[-1], int(i) % x.shape[-1])
            a["max_out"] = max(a["max_out"], float(out.detach().abs().max()))
            k = max(1, min(flat.numel(), math.ceil(percentile / 100 * flat.numel())))
            a["pct"].append(float(flat.kthvalue(k).values))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    device = next(model.parameters()).device
    try:
        for w_idx, w in enumerate(tqdm(windows, desc="collecting activation statistics", disable=not progress,
                                       leave=False)):
            current["w"] = w_idx
            model(w.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, a in acc.items():
        layer, role = linear_role(model, name)  # type: ignore[misc]
        w, pos, ch = a["loc"]
        tok = tokenizer.decode([int(windows[w, pos])]) if tokenizer is not None else str(int(windows[w, pos]))
        out.append(LinearStats(name, layer, role, a["max_in"], a["max_out"], sum(a["pct"]) / len(a["pct"]),
                               w, pos, ch, tok))
    return out


@dataclass(frozen=True)
class SpikeRule:
    """A projection is a spike layer when max |input| > k · median(max |input| of all decoder linears),
    or > ``abs_threshold`` when one is given."""

    k: float = 50.0
    abs_threshold: float | None = None

    def threshold(self, stats: list[LinearStats]) -> float:
        t = self.k * statistics.median(s.max_in for s in stats)
        return t if self.abs_threshold is None else min(t, self.abs_threshold)

    def detect(self, stats: list[LinearStats]) -> list[str]:
        t = self.threshold(stats)
        return [s.name for s in sorted(stats, key=lambda s: -s.max_in) if s.max_in > t]
