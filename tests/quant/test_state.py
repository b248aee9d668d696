"""Quantization state lives on the modules, typed, with a lifecycle; static quantizers keep their observed
range, so a clip ratio changes their scale (it used to change the plan and nothing else)."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from spikequant.algorithms.clip_ratios import clip_ratios, set_clip_ratio
from spikequant.export import load_quantized, save_quantized
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.quant import ActivationQuantizer, QuantizedModel, QuantSpec, QuantStatus
from spikequant.recipes import load_recipe

WINDOWS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(2))
O_PROJ = "model.layers.1.self_attn.o_proj"


def _tokenizer():
    vocab = {f"t{i}": i for i in range(96)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   unk_token="t0")


def test_static_quantizer_lifecycle_and_clip_ratio():
    spec = QuantSpec(bits=8, granularity="tensor", dynamic=False)
    q = ActivationQuantizer(spec)
    assert q.status is QuantStatus.INITIALIZED
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.ones(2, 3))
    x = torch.tensor([[0.5, -3.0, 1.0], [2.0, 0.25, -1.5]])
    q.start_calibration()
    assert torch.equal(q(x), x)  # observing passes through
    q.freeze()
    assert q.status is QuantStatus.FROZEN
    assert q.scale == pytest.approx(3.0 / 127)
    q.spec = QuantSpec(bits=8, granularity="tensor", dynamic=False, clip_ratio=0.5)
    assert q.scale == pytest.approx(1.5 / 127)  # recomputed from the kept range
    ref = torch.clamp(torch.round(x / (1.5 / 127)), -128, 127) * (1.5 / 127)
    assert torch.allclose(q(x), ref)


def test_state_is_on_the_modules():
    model = tiny_model("llama", seed=1)
    qm, _ = quantize(model, load_recipe("w8a8-tensor-static"), WINDOWS, progress=False)
    lin = model.get_submodule(O_PROJ)
    assert isinstance(lin.input_quantizer, ActivationQuantizer)
    assert lin.input_quantizer.status is QuantStatus.FROZEN
    # The recorded weight scale reproduces the fake-quantized weight from its integer grid.
    grid = lin.weight / lin.weight_scale
    assert torch.allclose(grid, grid.round(), atol=1e-4)
    assert grid.abs().max() <= 127.5
    view = QuantizedModel.from_model(model)
    assert view.plan == qm.plan and list(view.inputs) == list(qm.inputs)
    model.double()
    assert lin.input_quantizer.scale.dtype == torch.float64 and lin.weight_scale.dtype == torch.float64


def test_clip_ratio_on_static_quantizer_changes_logits_and_reloads(tmp_path):
    model = tiny_model("llama", seed=1)
    recipe = load_recipe("w8a8-tensor-static")
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    with torch.no_grad():
        before = model(WINDOWS).logits
    set_clip_ratio(qm, 1, "o_proj", 0.3)
    assert qm.plan[O_PROJ].inputs.clip_ratio == 0.3
    with torch.no_grad():
        clipped = model(WINDOWS).logits
    assert (clipped - before).abs().max() > 1e-3
    save_quantized(qm, _tokenizer(), recipe, "tiny", tmp_path / "q", findings)
    loaded, qm2, _, _ = load_quantized(tmp_path / "q", device="cpu")
    with torch.no_grad():
        after = loaded.model(WINDOWS).logits
    assert torch.equal(clipped, after)
    assert clip_ratios(qm2)[1]["o_proj"] == 0.3


def test_clip_ratios_modifier_on_static_recipe_matches_setting_it_by_hand():
    data = load_recipe("w8a8-tensor-static").to_dict()
    data["modifiers"] = [{"type": "clip_ratios", "ratios": {"1": {"o_proj": 0.3}}}]
    by_recipe = tiny_model("llama", seed=1)
    quantize(by_recipe, load_recipe(data), WINDOWS, progress=False)
    by_hand = tiny_model("llama", seed=1)
    qm, _ = quantize(by_hand, load_recipe("w8a8-tensor-static"), WINDOWS, progress=False)
    set_clip_ratio(qm, 1, "o_proj", 0.3)
    with torch.no_grad():
        assert torch.equal(by_recipe(WINDOWS).logits, by_hand(WINDOWS).logits)
