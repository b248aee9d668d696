"""Running calibration windows through a model, the loop every statistics pass shares."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from spikequant.models.runner import run_layers


@torch.no_grad()
def forward_windows(model: nn.Module, windows: torch.Tensor, desc: str, progress: bool = True,
                    before: Callable[[int], None] | None = None) -> None:
    """Run each window (one row of ``windows``) through ``model`` alone, without a KV cache, on the
    model's device, layer by layer on the shared runner (:func:`~spikequant.models.runner.run_layers`,
    final norm and ``lm_head`` included); hooks on the model see the activations. ``before(i)`` runs
    ahead of window i in every module (e.g. to tell a hook which window it is in)."""
    run_layers(model, windows, batch_size=1, head=True, before_batch=before, desc=desc, progress=progress)
