"""Hidden states of calibration or evaluation windows at a layer boundary, in memory or memory-mapped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spikequant.models.runner import LayerInputs, layer_output


@dataclass
class Stream:
    """Hidden states of a set of calibration windows at the current layer boundary, one tensor per batch."""

    name: str
    inputs: LayerInputs

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h, _ in self.inputs)

    def to_mmap(self, path: Path) -> None:
        """Move the hidden states into one memory-mapped file (written in place as layers run)."""
        total = sum(h.numel() for h, _ in self.inputs)
        dtype = self.inputs.batches[0][0].dtype
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = torch.from_file(str(path), shared=True, size=total, dtype=dtype)
        offset, batches = 0, []
        for h, kw in self.inputs:
            view = storage[offset:offset + h.numel()].view(h.shape)
            view.copy_(h)
            batches.append((view, kw))
            offset += h.numel()
        self.inputs = LayerInputs(batches)

    def propagate(self, layer: nn.Module) -> None:
        """Run every batch through ``layer``; its output replaces its input (batches are independent)."""
        for hidden, kw in self.inputs:
            hidden.copy_(layer_output(layer(hidden, **kw)))

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{self.name}.{b}": h.contiguous() for b, (h, _) in enumerate(self.inputs)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for b, (h, _) in enumerate(self.inputs):
            h.copy_(tensors[f"{self.name}.{b}"])
