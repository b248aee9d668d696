"""Perplexity (paper protocol) and agreement with the unquantized model (KL divergence, top-1)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class EvalResult:
    ppl: float
    kl: float | None  # mean KL(P_reference || P_model) per predicted token, nats
    top1: float | None  # share of positions where both models' most likely next token agree
    windows: int
    tokens: int  # predicted tokens (seqlen - 1 per window)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    return model(window.unsqueeze(0).to(_device_of(model)), use_cache=False).logits[0, :-1].float()


def flush_denormal_enabled() -> bool:
    """Whether float32 denormals are flushed to zero on this thread (torch has a setter, no getter)."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


@contextmanager
def flushing_denormals(enabled: bool = True) -> Iterator[None]:
    """``torch.set_flush_denormal(enabled)`` for the block, then the previous state again (the flag is
    process-global CPU state: a library call must not leave it changed)."""
    previous = flush_denormal_enabled()
    torch.set_flush_denormal(enabled)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | Sequence[torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "evaluating",
) -> EvalResult:
    """Perplexity over ``windows`` (N, seqlen): each window is scored on its own, no overlap, and the
    NLL of all predicted tokens is averaged before exponentiating.

    ``reference`` (the unquantized model, or its precomputed log-probabilities per window) adds the
    mean KL divergence and top-1 agreement of next-token distributions on the same positions.
    """
    # Fake-quantized layers next to float ones produce denormals that slow CPU math ~10x: flush them while
    # evaluating, and leave the caller's setting as it was.
    with flushing_denormals(_device_of(model).type == "cpu" or flush_denormal_enabled()):
        return _evaluate(model, windows, reference, progress, desc)


def _evaluate(model: nn.Module, windows: torch.Tensor, reference: nn.Module | Sequence[torch.Tensor] | None,
              progress: bool, desc: str) -> EvalResult:
    return score_windows(windows, lambda _i, w: _logits(model, w), reference, progress, desc)


def score_windows(windows: torch.Tensor, logits_of: Callable[[int, torch.Tensor], torch.Tensor],
                  reference: nn.Module | Sequence[torch.Tensor] | None, progress: bool = True,
                  desc: str = "evaluating", start: float | None = None) -> EvalResult:
    """The metrics of :func:`evaluate` from ``logits_of(i, window)``: the next-token logits (seqlen - 1,
    vocab) of window ``i``, however they were computed (a whole model, or a streamed one layer by layer).
    ``start``: the clock reading the timing counts from (default: now)."""
    start = time.perf_counter() if start is None else start
    nll = 0.0
    kl_sum = 0.0
    agree = 0
    count = 0
    for i, w in enumerate(tqdm(windows, desc=desc, disable=not progress, leave=False)):
        logits = logits_of(i, w)
        target = w[1:].to(logits.device)
        logp = F.log_softmax(logits, dim=-1)
        nll += float(-logp.gather(-1, target.unsqueeze(-1)).sum(dtype=torch.float64))
        if reference is not None:
            if isinstance(reference, nn.Module):
                ref_logp = F.log_softmax(_logits(reference, w).to(logits.device), dim=-1)
            else:
                ref_logp = reference[i].to(logits.device).float()
            kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum(dtype=torch.float64))
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        count += target.numel()
    has_ref = reference is not None
    return EvalResult(
        ppl=math.exp(nll / count),
        kl=kl_sum / count if has_ref else None,
        top1=agree / count if has_ref else None,
        windows=len(windows),
        tokens=count,
        seconds=time.perf_counter() - start,
    )


@torch.inference_mode()
def reference_logprobs(
    model: nn.Module, windows: torch.Tensor, progress: bool = True, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Log-probabilities of the unquantized model, kept on CPU so several recipes can share one pass."""
    return [
        F.log_softmax(_logits(model, w), dim=-1).to("cpu", dtype)
        for w in tqdm(windows, desc="reference pass", disable=not progress, leave=False)
    ]
