"""Load a model for one backend and generate text with Hugging Face ``generate``, timing prefill and decode."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spikequant.backends import BACKENDS, PreparedModel, cached_decoding_problem, prepare
from spikequant.backends.int8 import DEFAULT_KERNEL, is_int8_dir, load_int8
from spikequant.errors import SpikequantError


@dataclass
class GenerationResult:
    text: str  # the prompt followed by the generated continuation
    completion: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    compiled: bool = False
    warmup_s: float | None = None  # compiled: the untimed first call (compilation) before the timed one

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tps(self) -> float:
        steps = self.new_tokens - 1  # the first new token comes out of the prefill pass
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


class _Clock:
    """A ``generate`` streamer that only notes when each step's tokens arrive (the prompt first)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_for_backend(model: str, backend: str, recipe: str | None = None, data_dir: str | None = None,
                     kernel: str = DEFAULT_KERNEL, int8_dtype: str = "float32",
                     progress: bool = True, int8_embeddings: str | None = None) -> PreparedModel:
    """``model``: a hub id / built-in name / local HF folder (optionally quantized here by ``recipe``, which
    then needs its calibration text under ``data_dir``), a folder written by ``spikequant quantize``, or an
    int8 folder written by :func:`~spikequant.backends.int8.save_int8`. Checks what can be checked before
    anything is loaded."""
    from spikequant.export import is_quantized_dir, load_quantized
    from spikequant.models import load_model
    from spikequant.models.loading import DTYPES

    if backend not in BACKENDS:
        raise SpikequantError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if int8_dtype not in ("float32", "bfloat16"):
        raise SpikequantError(f"int8 backend activations must be float32 or bfloat16, got {int8_dtype}")
    if int8_embeddings not in (None, "float32", "bfloat16"):
        raise SpikequantError(f"int8 backend embeddings must be float32 or bfloat16, got {int8_embeddings}")
    if int8_embeddings and backend != "int8":
        raise SpikequantError("--int8-embeddings is for --backend int8")
    dtype = DTYPES[int8_dtype]
    table = DTYPES[int8_embeddings] if int8_embeddings else None
    if is_int8_dir(model):
        if backend != "int8":
            raise SpikequantError(f"{model} is an int8 checkpoint; it runs on --backend int8 only")
        if recipe:
            raise SpikequantError(f"{model} is an int8 checkpoint; it carries its quantization, drop --recipe")
        m, tok, manifest = load_int8(model, kernel, dtype, embedding_dtype=table)
        return PreparedModel(m, tok, "int8", model, None, list(manifest["int8_linears"]), dtype)
    if is_quantized_dir(model):
        if recipe:
            raise SpikequantError(f"{model} is a saved quantized model; it carries its recipe, drop --recipe")
        if backend == "int8":
            import json

            from spikequant.backends.int8 import check_manifest
            from spikequant.export.saving import MANIFEST

            check_manifest(json.loads((Path(model) / MANIFEST).read_text(encoding="utf-8")), model)
        loaded, _qm, rec, _ = load_quantized(model, "float32", "cpu")
        return prepare(loaded.model, loaded.tokenizer, backend, model, rec.name, kernel, dtype, table)
    if Path(model).is_dir() and not (Path(model) / "config.json").exists():
        raise SpikequantError(f"{model} is not a model folder (no config.json, spikequant.json or "
                              "spikequant-int8.json)")
    if backend == "int8" and not recipe:
        raise SpikequantError(f"--backend int8 needs a W8A8 model: pass --recipe (e.g. spike-w8a8-tensor-static) "
                              f"or a folder written by spikequant quantize, not the float model {model}")
    rec = None
    if recipe:
        from spikequant.recipes import load_recipe

        rec = load_recipe(recipe)  # a bad recipe fails here, before the model loads
    loaded = load_model(model, "float32", "cpu")
    if rec is not None and not rec.is_float:
        from spikequant.data import recipe_calibration_windows
        from spikequant.pipeline import quantize

        quantize(loaded.model, rec, lambda: recipe_calibration_windows(rec, loaded.tokenizer, data_dir), progress)
    return prepare(loaded.model, loaded.tokenizer, backend, model, rec.name if rec else None, kernel, dtype, table)


@torch.inference_mode()
def generate(prepared: PreparedModel, prompt: str, max_new_tokens: int = 32, do_sample: bool = False,
             use_cache: bool = True, ignore_eos: bool = False, seed: int = 0,
             compile: bool = False) -> GenerationResult:
    """Greedy (or sampled) continuation of ``prompt``; prefill = the pass over the prompt that yields the
    first new token, decode = every later step.

    ``compile``: the decode steps run compiled (transformers' own path: a static KV cache and
    ``torch.compile`` of the one-token forward, enabled on the CPU too; the prompt pass stays eager). The
    first call compiles (minutes on a small CPU); it runs once untimed (``warmup_s``) before the timed one,
    and not again for later calls with the same prompt length and ``max_new_tokens`` (``warmup_s`` 0)."""
    from transformers import CompileConfig, GenerationConfig

    if not prompt:
        raise SpikequantError("--prompt is empty")
    if max_new_tokens < 1:
        raise SpikequantError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if use_cache and prepared.backend != "int8":
        problem = cached_decoding_problem(prepared.model)
        if problem is not None:
            raise SpikequantError(f"cached decoding would change what the model computes: {problem}; "
                                  "pass --no-cache (slower: every step reruns the whole sequence)")
    tok = prepared.tokenizer
    enc = tok(prompt, return_tensors="pt")
    eos = tok.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=use_cache,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                           eos_token_id=None if ignore_eos else eos,
                           min_new_tokens=max_new_tokens if ignore_eos else None)
    warmup_s = None
    if compile:
        if not use_cache:
            raise SpikequantError("--compile compiles the cached decode step; it cannot be combined with --no-cache")
        from spikequant.backends.int8 import prepare_traced

        prepare_traced(prepared.model)
        cc = CompileConfig(mode="default", dynamic=False)
        cc._compile_all_devices = True  # transformers compiles on accelerators only unless told
        cfg.cache_implementation, cfg.compile_config = "static", cc
        shapes = (*enc["input_ids"].shape, max_new_tokens)
        warmup_s = 0.0
        if shapes not in prepared.compiled_shapes:  # the first compiled generate compiles: run it untimed
            if do_sample:
                torch.manual_seed(seed)
            t = time.perf_counter()
            prepared.model.generate(**enc, generation_config=cfg)
            warmup_s = time.perf_counter() - t
            prepared.compiled_shapes.add(shapes)
    if do_sample:
        torch.manual_seed(seed)
    clock = _Clock()
    t0 = time.perf_counter()
    out = prepared.model.generate(**enc, generation_config=cfg, streamer=clock)
    n_prompt = enc["input_ids"].shape[1]
    new = out[0, n_prompt:]
    times = [t0] + clock.times[1:]  # clock.times[0] is the prompt, put before the prefill pass
    prefill_s = times[1] - times[0] if len(times) > 1 else float("nan")
    decode_s = times[-1] - times[1] if len(times) > 2 else 0.0
    return GenerationResult(text=tok.decode(out[0], skip_special_tokens=True),
                            completion=tok.decode(new, skip_special_tokens=True), prompt_tokens=n_prompt,
                            new_tokens=int(new.numel()), prefill_s=prefill_s, decode_s=decode_s,
                            compiled=compile, warmup_s=warmup_s)
