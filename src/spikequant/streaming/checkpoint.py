"""A model skeleton without weights whose decoder layers are read from the checkpoint on demand.

:class:`StreamedModel` builds the Hugging Face model on the meta device (accelerate's
``init_empty_weights``: parameters without storage, buffers such as RoPE frequencies real), loads the ends
(embeddings, final norm, lm_head) and registers itself as the model's layer source
(:data:`spikequant.models.runner.LAYER_SOURCE`), so the layer runner loads each decoder layer from the
safetensors shards before it runs and frees it after. Only the tensors read from the checkpoint come and
go: whatever a method puts on the modules (quantizers, weight scales, hooks, the attention wrapper) stays.
"""

from __future__ import annotations

import gc
import json
import resource
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from spikequant.errors import ModelLoadError
from spikequant.models.arch import decoder_layers, get_arch
from spikequant.models.loading import DTYPES, resolve_device, resolve_model_path
from spikequant.models.runner import LAYER_SOURCE

INDEX = "model.safetensors.index.json"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


class CheckpointReader:
    """Tensor name -> shard of a safetensors checkpoint (one ``model.safetensors`` or an index)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.path / f for k, f in weight_map.items()}
        elif (self.path / "model.safetensors").is_file():
            single = self.path / "model.safetensors"
            with safe_open(str(single), "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise ModelLoadError(f"{self.path} has no model.safetensors or {INDEX}: streaming reads safetensors only")

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), "pt") as f:  # memory-mapped; only this tensor is read
            return f.get_tensor(key)

    def size_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of all tensors (in ``dtype`` if given, else as stored)."""
        total = 0
        by_file: dict[Path, list[str]] = {}
        for k, f in self.files.items():
            by_file.setdefault(f, []).append(k)
        for f, keys in by_file.items():
            with safe_open(str(f), "pt") as h:
                for k in keys:
                    sl = h.get_slice(k)
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    item = (torch.empty((), dtype=dtype).element_size() if dtype is not None
                            else _SAFETENSORS_BYTES.get(sl.get_dtype(), 4))
                    total += n * item
        return total


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise ModelLoadError(f"checkpoint tensor {key} has no parameter or buffer in {type(model).__name__}")


class StreamedModel:
    """``model`` (a Hugging Face causal LM) with its decoder layers on the meta device until loaded.

    ``load(i)`` reads layer ``i``'s tensors (converted to ``dtype``) onto ``device``; ``release(i)`` puts
    them back on the meta device. ``hold`` keeps a layer loaded across runner passes (the streamed
    quantizer loads a layer once and runs several passes on it). The ends are loaded once, here.
    """

    def __init__(self, source: str, dtype: str | torch.dtype = "float32", device: str | None = None,
                 config_overrides: dict[str, Any] | None = None, attn_implementation: str | None = None) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ModelLoadError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        self.dtype = dtype
        self.device = torch.device(resolve_device(device))
        self.source = source
        path, _ = resolve_model_path(source)
        self.path = path
        if not Path(path).is_dir():
            raise ModelLoadError(f"streaming needs a local checkpoint directory, got {source!r}")
        self.reader = CheckpointReader(path)
        config = AutoConfig.from_pretrained(path)
        for k, v in (config_overrides or {}).items():
            setattr(config, k, v)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, **kwargs)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.arch = get_arch(self.model)
        n = len(decoder_layers(self.model))
        prefixes = [self.arch.layer_path(i) + "." for i in range(n)]
        self.layer_keys: list[list[str]] = [[] for _ in range(n)]
        self.end_keys: list[str] = []
        for k in self.reader.names():
            idx = _layer_index(k, self.arch.layers)
            if idx is None:
                self.end_keys.append(k)
            elif idx < n:
                self.layer_keys[idx].append(k)
        for i, keys in enumerate(self.layer_keys):
            if not keys:
                raise ModelLoadError(f"{path}: no tensors for decoder layer {i} ({prefixes[i]}*)")
        for k in self.end_keys:
            _set_tensor(self.model, k, self._read(k))
        # Tied embeddings are stored once, under either name (a GGUF conversion keeps lm_head's).
        embed, head = self.model.get_submodule(self.arch.embed), self.model.get_submodule(self.arch.lm_head)
        if head.weight.is_meta and not embed.weight.is_meta:
            head.weight = embed.weight
        elif embed.weight.is_meta and not head.weight.is_meta:
            embed.weight = head.weight
        missing = [n for n, p in self.model.named_parameters()
                   if p.is_meta and _layer_index(n, self.arch.layers) is None]
        if missing:
            raise ModelLoadError(f"{path}: the checkpoint has no tensor for {', '.join(missing)}")
        self._loaded: set[int] = set()
        self._held: set[int] = set()
        setattr(self.model, LAYER_SOURCE, self)

    def _read(self, key: str) -> torch.Tensor:
        t = self.reader.get(key)
        if t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    @property
    def num_layers(self) -> int:
        return len(self.layer_keys)

    def layer(self, i: int) -> nn.Module:
        return decoder_layers(self.model)[i]

    def load(self, i: int) -> None:
        if i in self._loaded:
            return
        for k in self.layer_keys[i]:
            _set_tensor(self.model, k, self._read(k))
        self._loaded.add(i)

    def release(self, i: int) -> None:
        if i not in self._loaded or i in self._held:
            return
        for k in self.layer_keys[i]:
            path, _, leaf = k.rpartition(".")
            module = self.model.get_submodule(path)
            old = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
            _set_tensor(self.model, k, torch.empty_like(old, device="meta"))
        self._loaded.discard(i)
        gc.collect()

    def hold(self, i: int) -> None:
        """Load layer ``i`` and keep it loaded until :meth:`unhold`."""
        self.load(i)
        self._held.add(i)

    def unhold(self, i: int) -> None:
        self._held.discard(i)
        self.release(i)

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s checkpoint tensors as they are now (after whatever a method did to them)."""
        prefix = self.arch.layer_path(i) + "."
        return {prefix + k: v.detach().contiguous() for k, v in self.layer(i).state_dict().items()}

    def status(self) -> str:
        return f"rss {rss_bytes() / 2**30:.2f} GiB, peak {peak_rss_bytes() / 2**30:.2f} GiB"


def _layer_index(key: str, layers: str) -> int | None:
    prefix = layers + "."
    if not key.startswith(prefix):
        return None
    head = key[len(prefix):].partition(".")[0]
    return int(head) if head.isdigit() else None
