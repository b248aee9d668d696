"""Where the activation spikes are: per-linear statistics over calibration tokens, and detection."""

from __future__ import annotations

import heapq
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from spikequant.errors import SpikequantError
from spikequant.models import decoder_linears, linear_role
from spikequant.models.forward import forward_windows


@dataclass
class TokenHit:
    """One token's largest |input| to a linear: how big, and where (window, position) and what it is."""

    value: float
    window: int
    position: int
    token_id: int
    token: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LinearStats:
    """Activation magnitudes of one decoder linear over all calibration tokens."""

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
    token_id: int = -1
    max_in_rest: float = 0.0  # max |input| over all positions but the first of each window
    max_in_bulk: float = 0.0  # max |input| once the ``outliers`` largest tokens of each window are left out
    top_tokens: list[TokenHit] = field(default_factory=list)  # largest per-token maxima, largest first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _decode(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


@torch.inference_mode()
def collect_stats(
    model: nn.Module, windows: torch.Tensor, tokenizer: Any = None, percentile: float = 99.9,
    progress: bool = True, top_tokens: int = 8, outliers: int = 4,
) -> list[LinearStats]:
    """Run ``windows`` (N, seqlen) through ``model`` one at a time and record, for every decoder linear,
    input/output magnitudes, the location of the input maximum (window, position, channel, token) and
    the ``top_tokens`` tokens with the largest max |input|, and the max |input| left once the ``outliers``
    largest tokens of every window are set aside (what ``QuantSpec.outlier_tokens`` does).

    Memory stays at one window's activations: the percentile is taken per window (and averaged), the
    rest are running maxima and a small heap per linear.
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise SpikequantError(f"windows must be a non-empty (N, seqlen) tensor of token ids, "
                              f"got shape {tuple(windows.shape)}")
    if outliers < 0:
        raise SpikequantError(f"outliers must be >= 0, got {outliers}")
    if not 0.0 < percentile <= 100.0:
        raise SpikequantError(f"percentile must be in (0, 100], got {percentile}")
    linears = decoder_linears(model)
    acc: dict[str, dict[str, Any]] = {
        n: {"max_in": -1.0, "max_out": 0.0, "rest": 0.0, "bulk": 0.0, "pct": [], "loc": (0, 0, 0), "heap": []}
        for n in linears
    }
    current = {"w": 0}

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            # (tokens, features) of the one window in the batch; float32 so percentiles are exact enough.
            x = args[0].detach().abs().float().reshape(-1, args[0].shape[-1])
            a = acc[name]
            flat = x.flatten()
            v, i = flat.max(0)
            if float(v) > a["max_in"]:
                a["max_in"] = float(v)
                a["loc"] = (current["w"], int(i) // x.shape[-1], int(i) % x.shape[-1])
            a["max_out"] = max(a["max_out"], float(out.detach().abs().max()))
            if x.shape[0] > 1:
                a["rest"] = max(a["rest"], float(x[1:].max()))
            k = max(1, min(flat.numel(), math.ceil(percentile / 100 * flat.numel())))
            a["pct"].append(float(flat.kthvalue(k).values))
            tok_max = x.amax(-1)
            if tok_max.numel() > outliers:
                a["bulk"] = max(a["bulk"], float(tok_max.topk(outliers + 1).values[-1]))
            vals, pos = tok_max.topk(min(top_tokens, tok_max.numel()))
            heap = a["heap"]
            for val, p in zip(vals.tolist(), pos.tolist(), strict=True):
                item = (val, -current["w"], -p)  # ties: earlier window/position first
                if len(heap) < top_tokens:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        forward_windows(model, windows, "collecting activation statistics", progress,
                        before=lambda i: current.__setitem__("w", i))
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, a in acc.items():
        layer, role = linear_role(model, name)  # type: ignore[misc]
        w, pos, ch = a["loc"]
        tid = int(windows[w, pos])
        hits = [TokenHit(v, -nw, -np_, int(windows[-nw, -np_]), _decode(tokenizer, int(windows[-nw, -np_])))
                for v, nw, np_ in sorted(a["heap"], reverse=True)]
        out.append(LinearStats(name, layer, role, a["max_in"], a["max_out"], sum(a["pct"]) / len(a["pct"]),
                               w, pos, ch, _decode(tokenizer, tid), tid, a["rest"], a["bulk"], hits))
    return out


def median_max_in(stats: list[LinearStats]) -> float:
    """The median over linears of their max |input|: the yardstick of the spike rule and the reports."""
    return statistics.median(s.max_in for s in stats)


@dataclass(frozen=True)
class SpikeRule:
    """A projection is a spike layer when its max |input| exceeds ``k`` x the median of the max |input|
    of all decoder linears, or exceeds ``abs_threshold`` (either condition suffices; leave one out with
    null). ``max_layers`` keeps only the largest ones.

    The default k = 50 sits in the gap measured on SmolLM2-135M (docs/spike-aware.md): the three spike
    layers are 80-550x the median, the next projections below 20x.
    """

    k: float | None = 50.0
    abs_threshold: float | None = None
    max_layers: int | None = None

    def __post_init__(self) -> None:
        if self.k is None and self.abs_threshold is None:
            raise SpikequantError("spike rule needs k or abs_threshold (or both)")
        if self.k is not None and not self.k > 0:
            raise SpikequantError(f"spike rule: k must be > 0, got {self.k}")
        if self.abs_threshold is not None and not self.abs_threshold > 0:
            raise SpikequantError(f"spike rule: abs_threshold must be > 0, got {self.abs_threshold}")
        if self.max_layers is not None and self.max_layers < 0:
            raise SpikequantError(f"spike rule: max_layers must be >= 0, got {self.max_layers}")

    def threshold(self, stats: list[LinearStats]) -> float:
        parts = []
        if self.k is not None:
            parts.append(self.k * median_max_in(stats))
        if self.abs_threshold is not None:
            parts.append(self.abs_threshold)
        return min(parts)

    def detect(self, stats: list[LinearStats]) -> list[str]:
        """Names of the spike layers, largest max |input| first."""
        t = self.threshold(stats)
        found = [s.name for s in sorted(stats, key=lambda s: -s.max_in) if s.max_in > t]
        return found if self.max_layers is None else found[: self.max_layers]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
