"""The one layer-by-layer runner: capture what enters decoder layer 0, then run each layer on the
cached outputs of the layer before it.

Every pass that needs activations uses it: GPTQ (Hessians of each layer on the outputs of the already
quantized layers before it), the statistics of spike detection and SmoothQuant, static calibration, and
what builds on those (a clip search). A streamed model (``spikequant.streaming``: layers without tensors
until loaded) runs through the same loop: each layer is loaded before it runs and freed after. A caller either hooks the
modules it wants to watch and lets :func:`run_layers` propagate, or passes ``on_layer`` to do its own
work on a layer's inputs (e.g. collect a Hessian and quantize) before they are propagated through it.

Each batch of windows goes through a layer exactly as it would through the whole model (the same hidden
states and the same keyword arguments: position embeddings, mask), so the results are those of
``model(windows)``, bit for bit at the same batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from spikequant.models.arch import decoder_layers, get_arch

# A model streamed from disk (``spikequant.streaming``) carries its layer source under this attribute: the
# runner loads each decoder layer's tensors before the layer runs and frees them after.
LAYER_SOURCE = "spikequant_layer_source"


class LayerSource(Protocol):
    """Loads decoder layer ``i``'s tensors into the model and frees them again."""

    def load(self, i: int) -> None: ...

    def release(self, i: int) -> None: ...

    def hold(self, i: int) -> None:
        """Load layer ``i`` and keep it loaded (``release`` leaves it) until :meth:`unhold`."""

    def unhold(self, i: int) -> None: ...

    def status(self) -> str: ...


def layer_source(model: nn.Module) -> LayerSource | None:
    """The model's layer source if it is streamed (its layers hold no tensors until loaded), else None."""
    return getattr(model, LAYER_SOURCE, None)


@contextlib.contextmanager
def loaded_layer(model: nn.Module, i: int):
    """Within the block decoder layer ``i`` holds its tensors (a no-op for a model in memory)."""
    source = layer_source(model)
    if source is not None:
        source.load(i)
    try:
        yield
    finally:
        if source is not None:
            source.release(i)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (nothing after that point is needed)."""


def stop_forward(_module: nn.Module, _args: tuple) -> None:
    """A forward pre-hook that ends the forward pass at this module (see :func:`stopping_at`)."""
    raise _Stop


@contextlib.contextmanager
def stopping_at(module: nn.Module):
    """Within the block, a forward pass that reaches ``module`` stops there; wrap the call in
    :func:`stopped` to swallow the stop."""
    handle = module.register_forward_pre_hook(stop_forward)
    try:
        yield
    finally:
        handle.remove()


def stopped():
    return contextlib.suppress(_Stop)


@dataclass
class LayerInputs:
    """What enters a decoder layer for each batch: hidden states and the layer's keyword arguments."""

    batches: list[tuple[torch.Tensor, dict[str, Any]]]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> LayerInputs:
    """Run ``windows`` (N, seqlen) through the model up to decoder layer 0 and keep its inputs per batch."""
    layer0 = decoder_layers(model)[0]
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_m, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for b in range(0, len(windows), batch_size):
            with stopped():
                model(windows[b:b + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return LayerInputs(captured)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs,
              before_batch: Callable[[int], None] | None = None) -> LayerInputs:
    """Propagate every batch through one decoder layer."""
    out = []
    for b, (hidden, kw) in enumerate(inputs):
        if before_batch is not None:
            before_batch(b)
        out.append((layer_output(layer(hidden, **kw)), kw))
    return LayerInputs(out)


@torch.no_grad()
def run_layers(
    model: nn.Module,
    windows: torch.Tensor,
    on_layer: Callable[[int, nn.Module, LayerInputs], None] | None = None,
    batch_size: int = 1,
    head: bool = False,
    before_batch: Callable[[int], None] | None = None,
    desc: str = "layers",
    progress: bool = True,
) -> LayerInputs:
    """Run ``windows`` through the model one decoder layer at a time; ``on_layer(i, layer, inputs)``
    runs before layer ``i`` propagates its inputs (it may change the layer). With ``head`` the final
    norm and ``lm_head`` run at the end too (so hooks on them fire); ``before_batch(b)`` runs ahead of
    batch ``b`` in every module, e.g. to tell a hook which window it sees. Returns the last outputs."""
    inputs = capture_inputs(model, windows, batch_size)
    layers = decoder_layers(model)
    source = layer_source(model)
    bar = tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress, leave=False)
    for i in bar:
        with loaded_layer(model, i):
            if on_layer is not None:
                on_layer(i, layers[i], inputs)
            inputs = run_layer(layers[i], inputs, before_batch)
        if source is not None:
            bar.set_postfix_str(source.status(), refresh=False)
    if head:
        arch = get_arch(model)
        norm, lm_head = model.get_submodule(arch.final_norm), model.get_submodule(arch.lm_head)
        for b, (hidden, _) in enumerate(inputs):
            if before_batch is not None:
                before_batch(b)
            lm_head(norm(hidden))
    return inputs
