"""Perplexity of a model that does not fit in memory: all windows through one decoder layer at a time.

The windows' hidden states (in memory, or memory-mapped past a limit) go through each layer while it
is loaded; then the final norm and lm_head score each window with the in-memory code
(:func:`spikequant.eval.perplexity.score_windows`). The layer runner gives the activations of a full
forward bit for bit at the same batch size (one window), so the perplexity equals the in-memory one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from spikequant.eval.perplexity import EvalResult, flushing_denormals, score_windows
from spikequant.export.saving import MANIFEST, QPARAMS, read_manifest, restore_quantization
from spikequant.models.runner import capture_inputs, loaded_layer
from spikequant.quant import QuantizedModel
from spikequant.streaming.activations import Stream
from spikequant.streaming.checkpoint import StreamedModel, peak_rss_bytes
from spikequant.streaming.quantize import StreamingError
from spikequant.transforms import expanded_config


def open_saved(path: str | Path, dtype: str = "float32", device: str | None = None
               ) -> tuple[StreamedModel, QuantizedModel, dict[str, Any]]:
    """A directory written by ``quantize`` as a streamed model with its quantization state re-installed
    on the skeleton (the streamed twin of :func:`spikequant.export.load_quantized`)."""
    path = Path(path)
    manifest = read_manifest(path)
    sm = StreamedModel(str(path), dtype, device, config_overrides=expanded_config(manifest.get("transforms")) or None,
                       attn_implementation=manifest.get("attn_implementation"))
    qm = restore_quantization(sm.model, manifest, load_file(str(path / QPARAMS)), str(path / MANIFEST))
    return sm, qm, manifest


@torch.no_grad()
def final_hidden(sm: StreamedModel, windows: torch.Tensor, progress: bool = True, desc: str = "layers",
                 memory_limit: int = 2 << 30, mmap_path: Path | None = None) -> Stream:
    """Every window's hidden state after the last decoder layer (one window per batch)."""
    stream = Stream("eval", capture_inputs(sm.model, windows, 1))
    if stream.nbytes > memory_limit and mmap_path is not None:
        stream.to_mmap(mmap_path)
    bar = tqdm(range(sm.num_layers), desc=desc, unit="layer", disable=not progress, leave=False)
    for i in bar:
        with loaded_layer(sm.model, i):
            stream.propagate(sm.layer(i))
        bar.set_postfix_str(sm.status(), refresh=False)
    return stream


def _head_logits(sm: StreamedModel, hidden: torch.Tensor) -> torch.Tensor:
    norm, head = sm.model.get_submodule(sm.arch.final_norm), sm.model.get_submodule(sm.arch.lm_head)
    return head(norm(hidden))[0, :-1].float()


@torch.inference_mode()
def evaluate_streamed(sm: StreamedModel, windows: torch.Tensor, reference: list[torch.Tensor] | None = None,
                      progress: bool = True, desc: str = "evaluating (streamed)", **kw: Any) -> EvalResult:
    """:func:`spikequant.eval.perplexity.evaluate` on a streamed model; ``reference``: log-probs per window
    (:func:`logprobs_streamed` of the unquantized model) for KL and top-1."""
    start = time.perf_counter()
    with flushing_denormals(sm.device.type == "cpu"):
        stream = final_hidden(sm, windows, progress, desc, **kw)
        return score_windows(windows, lambda i, _w: _head_logits(sm, stream.inputs.batches[i][0]), reference,
                             progress, desc, start=start)


@torch.inference_mode()
def logprobs_streamed(sm: StreamedModel, windows: torch.Tensor, progress: bool = True,
                      dtype: torch.dtype = torch.float32, **kw: Any) -> list[torch.Tensor]:
    """:func:`spikequant.eval.perplexity.reference_logprobs` of a streamed model (like it, without
    flushing denormals)."""
    stream = final_hidden(sm, windows, progress, "reference pass (streamed)", **kw)
    return [F.log_softmax(_head_logits(sm, h), dim=-1).to("cpu", dtype) for h, _ in stream.inputs]


def _evaluation(res: EvalResult) -> dict[str, Any]:
    from spikequant.eval import PerplexityEvaluator

    cols = PerplexityEvaluator.columns
    metrics = {k: getattr(res, k) for k, _ in cols}
    details = {k: v for k, v in res.to_dict().items() if k not in dict(cols)}
    return {"metrics": metrics, "columns": [list(c) for c in cols], "details": {"perplexity": details},
            "seconds": round(res.seconds, 3)}


def _prepare_session(session: Any, sm: StreamedModel) -> torch.Tensor:
    from spikequant.data import eval_windows, load_text, tokenize
    from spikequant.models import LoadedModel

    if session.evaluators:
        names = ", ".join(ev.name for ev in session.evaluators)
        raise StreamingError(f"evaluators {names} run on a model in memory; drop them or use --offload none")
    text = load_text(session.dataset, session.split, session.data_dir)
    windows = eval_windows(tokenize(sm.tokenizer, text), session.seqlen, session.max_windows, text.max_windows)
    # The report reads the model's class and dtype from here: the skeleton (its ends hold real tensors).
    session._text, session._windows = text, windows
    session._loaded = LoadedModel(model=sm.model, tokenizer=sm.tokenizer, source=sm.source, path=sm.path)
    return windows


def run_saved_streamed(session: Any, path: str | Path) -> tuple[dict[str, Any], Any]:
    """:func:`spikequant.pipeline.run_saved` streamed: the saved model and, for KL, its base model, each
    one decoder layer at a time. Returns the report and the recipe."""
    from spikequant.recipes import Recipe

    t = time.perf_counter()
    sm, qm, manifest = open_saved(path, session.dtype, session.device)
    load_s = time.perf_counter() - t
    recipe = Recipe.from_dict(manifest["recipe"], str(Path(path) / MANIFEST))
    windows = _prepare_session(session, sm)
    reference = None
    if session.kl:
        base = StreamedModel(manifest["base_model"], session.dtype, session.device,
                             attn_implementation=manifest.get("attn_implementation"))
        reference = logprobs_streamed(base, windows, session.progress)
        del base
    res = evaluate_streamed(sm, windows, reference, session.progress, f"eval {recipe.name} (streamed)")
    evaluation = _evaluation(res)
    rep = session.report(recipe, evaluation, qm, manifest.get("findings", {}),
                         {"load_s": round(load_s, 3), "quantize_s": 0.0, "eval_s": evaluation["seconds"]})
    rep["model"].update(source=str(path), base_model=manifest["base_model"], offload="disk",
                        peak_rss_bytes=peak_rss_bytes())
    return rep, recipe


def run_float_streamed(session: Any) -> tuple[dict[str, Any], Any]:
    """``eval --recipe fp`` streamed: the perplexity of an unquantized checkpoint (KL is 0 by definition)."""
    from spikequant.recipes import load_recipe

    recipe = load_recipe("fp")
    t = time.perf_counter()
    sm = StreamedModel(session.model_source, session.dtype, session.device)
    load_s = time.perf_counter() - t
    windows = _prepare_session(session, sm)
    res = evaluate_streamed(sm, windows, None, session.progress, "eval fp (streamed)")
    evaluation = _evaluation(res)
    if session.kl:
        evaluation["metrics"].update(kl=0.0, top1=1.0)
    rep = session.report(recipe, evaluation, None, {},
                         {"load_s": round(load_s, 3), "quantize_s": 0.0, "eval_s": evaluation["seconds"]})
    rep["model"].update(offload="disk", peak_rss_bytes=peak_rss_bytes())
    return rep, recipe
