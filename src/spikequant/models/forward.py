"""Running calibration windows through a model, the loop every statistics pass shares."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def forward_windows(model: nn.Module, windows: torch.Tensor, desc: str, progress: bool = True,
                    before: Callable[[int], None] | None = None) -> None:
    """Run each window (one row of ``windows``) through ``model`` alone, without a KV cache, on the
    model's device, with a progress bar; hooks on the model see the activations. ``before(i)`` runs
    ahead of window i (e.g. to tell a hook which window it is in)."""
    device = next(model.parameters()).device
    for i, w in enumerate(tqdm(windows, desc=desc, disable=not progress, leave=False)):
        if before is not None:
            before(i)
        model(w.unsqueeze(0).to(device), use_cache=False)
