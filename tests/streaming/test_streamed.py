"""Streamed (layer by layer from disk) vs in memory: identical quantized weights, scales, plan, findings,
logits and perplexity, for a spike-aware recipe, a QuaRot RTN recipe, a GPTQ recipe, SmoothQuant (the
paper's folds, the extended folds with spike detection and static scales, with GPTQ) and clip ratios
(static and dynamic quantizers, KV cache); resume after a stop; memory-mapped streams; one-line refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from spikequant.algorithms.clip_ratios import clip_ratios
from spikequant.errors import SpikequantError
from spikequant.eval.perplexity import evaluate, reference_logprobs
from spikequant.export import load_quantized, save_quantized
from spikequant.export.saving import QPARAMS
from spikequant.models import load_model
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import Recipe, load_recipe
from spikequant.streaming import (
    StreamedModel,
    evaluate_streamed,
    logprobs_streamed,
    open_saved,
    quantize_streamed,
)

WINDOWS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
EVAL = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(2))


def _tokenizer():
    vocab = {f"t{i}": i for i in range(96)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   unk_token="t0")


def checkpoint(tmp_path, arch="llama", layers=3):
    path = tmp_path / f"ckpt-{arch}"
    tiny_model(arch, seed=7, num_hidden_layers=layers).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def spike_recipe() -> Recipe:
    """spike-w8a8-tensor-static with a rule loose enough to exempt layers of a random tiny model."""
    d = load_recipe("spike-w8a8-tensor-static").to_dict()
    d["modifiers"][0].update(k=1.0, max_layers=3)
    return Recipe.from_dict(d, "test")


def sq_ext_spike_recipe() -> Recipe:
    """smoothquant-ext-spike-w8a8-tensor-static (detection, the four folds, static scales) with the loose rule."""
    d = load_recipe("smoothquant-ext-spike-w8a8-tensor-static").to_dict()
    d["modifiers"][0].update(k=1.0, max_layers=3)
    return Recipe.from_dict(d, "test")


def sq_gptq_recipe() -> Recipe:
    """smoothquant-w8a8-tensor (the paper's folds, dynamic inputs) with GPTQ weights."""
    d = load_recipe("smoothquant-w8a8-tensor").to_dict()
    d["modifiers"].append({"type": "gptq", "batch_size": 2})
    return Recipe.from_dict(d, "test")


CLIP = {"layers": {"0": {"q_proj": 0.9, "o_proj": 0.5, "down_proj": 0.7, "k_cache": 0.6},
                   "2": {"gate_proj": 0.6, "k_proj": 0.8}}}


def clip_static_recipe(tmp_path) -> Recipe:
    """smoothquant-w8a8-tensor-static with a dynamic KV8 cache and clip ratios from a file (static scales
    recomputed; the K ratio is set after calibration, as in memory, so the later layers' scales are
    observed behind the unclipped K cache)."""
    (tmp_path / "ratios.json").write_text(json.dumps(CLIP))
    d = load_recipe("smoothquant-w8a8-tensor-static").to_dict()
    d["modifiers"] += [{"type": "kv_cache", "bits": 8},
                       {"type": "clip_ratios", "file": str(tmp_path / "ratios.json"),
                        "ratios": {"1": {"up_proj": 0.75}}}]
    return Recipe.from_dict(d, "test")


def clip_kv_recipe() -> Recipe:
    """quarot-rtn-w4a4kv4 with inline clip ratios on dynamic inputs and the K/V cache."""
    d = load_recipe("quarot-rtn-w4a4kv4").to_dict()
    d["modifiers"].append({"type": "clip_ratios", "ratios": {"0": {"k_cache": 0.9, "v_proj": 0.8, "v_cache": 0.7},
                                                             "1": {"down_proj": 0.85}}})
    return Recipe.from_dict(d, "test")


def sq_rotate_recipe(first: bool) -> Recipe:
    """quarot-w4a4kv4 (rotations, GPTQ, KV4) with SmoothQuant's paper folds before or after rotate (extended
    folds after: then o_proj's statistics are taken behind its online Hadamard, as in memory)."""
    d = load_recipe("quarot-w4a4kv4").to_dict()
    d["modifiers"].insert(0 if first else 1, {"type": "smoothquant", "alpha": 0.6, "num_samples": 3,
                                              "down": not first, "o": not first})
    return Recipe.from_dict(d, "test")


def make_recipe(preset, tmp_path) -> Recipe:
    makers = {"spike": spike_recipe, "sq-ext-spike-static": sq_ext_spike_recipe, "sq-gptq": sq_gptq_recipe,
              "clip-static": lambda: clip_static_recipe(tmp_path), "clip-kv": clip_kv_recipe,
              "sq-rotate": lambda: sq_rotate_recipe(True), "rotate-sq": lambda: sq_rotate_recipe(False)}
    return makers[preset]() if preset in makers else load_recipe(preset)


def all_weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != QPARAMS:
            out.update(load_file(str(f)))
    return out


def assert_same_dirs(a, b):
    wa, wb = all_weights(a), all_weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    qa, qb = load_file(str(a / QPARAMS)), load_file(str(b / QPARAMS))
    assert sorted(qa) == sorted(qb)
    for k in qa:
        assert torch.equal(qa[k], qb[k]), k
    ma, mb = (json.loads((p / "spikequant.json").read_text()) for p in (a, b))
    for key in ("plan", "findings", "transforms", "attn_implementation", "recipe"):
        assert ma.get(key) == mb.get(key), key


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied embeddings and q/k/v biases
def test_streamed_perplexity_equals_in_memory(tmp_path, arch):
    path = checkpoint(tmp_path, arch)
    model = load_model(str(path), device="cpu", attn_implementation="eager").model
    ref = evaluate(model, EVAL, progress=False)
    sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")
    got = evaluate_streamed(sm, EVAL, progress=False)
    assert got.ppl == ref.ppl and got.tokens == ref.tokens
    # the decoder layers hold no tensors between passes
    assert all(p.is_meta for p in sm.layer(0).parameters())
    assert all(torch.equal(a, b) for a, b in zip(logprobs_streamed(sm, EVAL, progress=False),
                                                 reference_logprobs(model, EVAL, progress=False), strict=True))


@pytest.mark.parametrize("preset", ["spike", "quarot-rtn-w4a4kv4", "quarot-w4a4kv4", "smoothquant-w8a8-tensor-static",
                                    "sq-ext-spike-static", "sq-gptq", "clip-static", "clip-kv", "sq-rotate",
                                    "rotate-sq"])
def test_streamed_quantize_equals_in_memory(tmp_path, preset):
    recipe = make_recipe(preset, tmp_path)
    path = checkpoint(tmp_path)
    lm = load_model(str(path), device="cpu", attn_implementation="eager")
    qm, findings = quantize(lm.model, recipe, WINDOWS, progress=False)
    if preset in ("spike", "sq-ext-spike-static"):
        assert findings["spike_layers"], "the test recipe should exempt some layers"
    if "sq" in preset or preset.startswith("smoothquant") or preset == "clip-static":
        assert findings["smoothquant"]["max_scale"] > 0
    if preset.startswith("clip"):
        # the ratios reached the quantizers (so the comparison below covers them)
        ratios = {(i, k): r for i, e in clip_ratios(qm).items() for k, r in e.items()}
        if preset == "clip-static":
            assert (ratios[(0, "o_proj")], ratios[(1, "up_proj")], ratios[(1, "o_proj")]) == (0.5, 0.75, 1.0)
        else:
            assert (ratios[(0, "k_cache")], ratios[(0, "v_cache")], ratios[(1, "k_cache")]) == (0.9, 0.7, 1.0)
    save_quantized(qm, lm.tokenizer, recipe, str(path), tmp_path / "mem", findings)

    sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")
    _, sfind = quantize_streamed(sm, recipe, WINDOWS, tmp_path / "disk", str(path), progress=False)
    assert sfind == json.loads(json.dumps(findings))
    assert not (tmp_path / "disk" / ".stream").exists()
    assert_same_dirs(tmp_path / "mem", tmp_path / "disk")

    # the streamed output loads in memory like any saved model, with the same logits
    a, _, _, _ = load_quantized(tmp_path / "mem", device="cpu")
    b, _, _, _ = load_quantized(tmp_path / "disk", device="cpu")
    with torch.no_grad():
        assert torch.equal(a.model(EVAL).logits, b.model(EVAL).logits)
    # and evaluates streamed with the in-memory perplexity and KL
    base = load_model(str(path), device="cpu", attn_implementation="eager").model
    reference = reference_logprobs(base, EVAL, progress=False)
    mem = evaluate(a.model, EVAL, reference, progress=False)
    ssm, _, _ = open_saved(tmp_path / "disk", device="cpu")
    disk = evaluate_streamed(ssm, EVAL, reference, progress=False)
    assert (disk.ppl, disk.kl, disk.top1) == (mem.ppl, mem.kl, mem.top1)


@pytest.mark.parametrize("preset", ["spike", "sq-ext-spike-static", "clip-static", "sq-rotate"])
def test_resume_after_a_stop_gives_the_same_result(tmp_path, preset):
    recipe = make_recipe(preset, tmp_path)
    path = checkpoint(tmp_path, layers=4)
    sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")
    quantize_streamed(sm, recipe, WINDOWS, tmp_path / "full", str(path), progress=False)

    out = tmp_path / "resumed"
    sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")
    quantize_streamed(sm, recipe, WINDOWS, out, str(path), progress=False, stop_after=2)
    state = json.loads((out / ".stream" / "state.json").read_text())
    assert state["done"] == 2 and not (out / "spikequant.json").exists()
    streams = {"spike": ["calib"], "sq-rotate": ["gptq"]}.get(preset, ["smooth", "calib"])
    assert state["streams"] == streams  # sq-rotate: the statistics were a pass ahead, kept in a file
    assert (out / ".stream" / "smooth-stats.safetensors").exists() == (preset == "sq-rotate")
    first = (out / "model-layer-00000.safetensors").stat().st_mtime_ns
    sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")  # a fresh process
    quantize_streamed(sm, recipe, WINDOWS, out, str(path), progress=False)
    assert (out / "model-layer-00000.safetensors").stat().st_mtime_ns == first  # not redone
    assert_same_dirs(tmp_path / "full", out)


@pytest.mark.parametrize("preset", ["spike", "sq-ext-spike-static"])  # the second adds the float stream
def test_memory_mapped_streams_give_the_same_result(tmp_path, preset):
    recipe = make_recipe(preset, tmp_path)
    path = checkpoint(tmp_path)
    sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")
    quantize_streamed(sm, recipe, WINDOWS, tmp_path / "ram", str(path), progress=False)
    sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")
    quantize_streamed(sm, recipe, WINDOWS, tmp_path / "mmap", str(path), progress=False, memory_limit=0)
    assert_same_dirs(tmp_path / "ram", tmp_path / "mmap")


def with_modifiers(preset: str, modifiers: list) -> Recipe:
    d = load_recipe(preset).to_dict()
    d["modifiers"] = modifiers
    return Recipe.from_dict(d, "test")


def test_refusals(tmp_path):
    path = checkpoint(tmp_path)
    sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")
    sq, rot = {"type": "smoothquant"}, {"type": "rotate"}
    for modifiers, match in [
        ([{"type": "gbs"}], "gbs modifier does not run inside a streamed quantize.*spikequant search"),
        ([sq, {"type": "spike_exempt"}], "spike_exempt after smoothquant"),
        ([rot, {"type": "spike_exempt"}], "spike_exempt after rotate"),
        ([sq, sq], "smoothquant listed twice"),
        # ratios are checked against the plan before anything is written
        ([{"type": "clip_ratios", "ratios": {"3": {"q_proj": 0.5}}}], r"layer 3 out of range \(model has 3"),
        ([{"type": "clip_ratios", "ratios": {"1": {"k_cache": 0.5}}}], "layer 1.k_cache: no KV-cache quantizer"),
        ([{"type": "clip_ratios", "file": str(tmp_path / "missing.json")}], "clip ratio file not found"),
    ]:
        with pytest.raises(SpikequantError, match=match):
            quantize_streamed(sm, with_modifiers("w8a8-tensor-static", modifiers), WINDOWS, tmp_path / "o",
                              str(path), progress=False)
        assert not (tmp_path / "o").exists()
    # a ratio on an input the plan leaves in float: refused the same way in memory and streamed
    float_q = with_modifiers("w8a8-tensor-static", [{"type": "clip_ratios", "ratios": {"0": {"o_proj": 0.5}}}])
    d = float_q.to_dict()
    d["overrides"] = [{"match": ["re:.*layers\\.0\\.self_attn\\.o_proj"], "inputs": None}]
    float_q = Recipe.from_dict(d, "test")
    lm = load_model(str(path), device="cpu", attn_implementation="eager")
    with pytest.raises(SpikequantError, match="layer 0.o_proj: that linear's input is not quantized"):
        quantize(lm.model, float_q, WINDOWS, progress=False)
    with pytest.raises(SpikequantError, match="layer 0.o_proj: that linear's input is not quantized"):
        quantize_streamed(sm, float_q, WINDOWS, tmp_path / "o", str(path), progress=False)
    assert not (tmp_path / "o").exists()
    quantize_streamed(sm, spike_recipe(), WINDOWS, tmp_path / "p", str(path), progress=False, stop_after=1)
    sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")
    with pytest.raises(SpikequantError, match="another recipe"):
        quantize_streamed(sm, load_recipe("w8a8-tensor-static"), WINDOWS, tmp_path / "p", str(path))
