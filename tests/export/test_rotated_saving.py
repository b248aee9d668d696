"""Saving a rotated (and expanded, GPTQ-quantized, clip-ratio-tuned) tiny model and reloading it gives the
same logits: fused rotations come back in the weights, online R3/R4, KV quantizers and the expansion
from the manifest."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from spikequant.algorithms.clip_ratios import clip_ratios, set_clip_ratio
from spikequant.export import load_quantized, save_quantized
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe
from spikequant.transforms import installed_attention_transforms

WINDOWS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
ODD = dict(hidden_size=50, intermediate_size=90, num_attention_heads=10, num_key_value_heads=5, head_dim=8)


def _tokenizer():
    vocab = {f"t{i}": i for i in range(96)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   unk_token="t0")


@pytest.mark.parametrize("arch,preset,overrides", [
    ("qwen2", "quarot-rtn-w4a4kv4", {}),
    ("qwen3", "random-rot-w4a4kv4", {}),
    ("llama", "quarot-w3a3kv3", ODD),  # automatic expansion 50 -> 52 (52 % 10 heads != 0), GPTQ weights
    ("mistral", "norot-w4a4kv4", {}),
])
def test_save_reload_reproduces_logits(tmp_path, arch, preset, overrides):
    model = tiny_model(arch, seed=3, **overrides)
    recipe = load_recipe(preset)
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    set_clip_ratio(qm, 1, "o_proj", 0.5)
    set_clip_ratio(qm, 0, "k_cache", 0.75)
    with torch.no_grad():
        before = model(WINDOWS).logits
    save_quantized(qm, _tokenizer(), recipe, "tiny", tmp_path / "q", findings)
    loaded, qm2, recipe2, manifest = load_quantized(tmp_path / "q", device="cpu")
    with torch.no_grad():
        after = loaded.model(WINDOWS).logits
    assert torch.equal(before, after), float((before - after).abs().max())
    assert recipe2 == recipe
    assert clip_ratios(qm2) == clip_ratios(qm)
    assert installed_attention_transforms(loaded.model)[0].k_quantizer.spec.clip_ratio == 0.75
    if overrides:
        assert loaded.model.config.hidden_size == 52 and loaded.model.config.intermediate_size == 96
        assert manifest["transforms"]["expansion"]["hidden_size"] == [50, 52]


def test_online_o_proj_hadamard_survives_save_reload(tmp_path):
    model = tiny_model("llama", seed=4)
    data = load_recipe("quarot-rtn-w4a4kv4").to_dict()
    data["name"] = "quarot-rtn-w4a4kv4-o"
    next(m for m in data["modifiers"] if m["type"] == "rotate")["o_online"] = True
    recipe = load_recipe(data)
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    assert findings["rotation"]["o_online"]
    with torch.no_grad():
        before = model(WINDOWS).logits
    save_quantized(qm, _tokenizer(), recipe, "tiny", tmp_path / "q", findings)
    loaded, _, _, manifest = load_quantized(tmp_path / "q", device="cpu")
    assert manifest["transforms"]["o_online"]
    with torch.no_grad():
        after = loaded.model(WINDOWS).logits
    assert torch.equal(before, after), float((before - after).abs().max())


def test_damaged_saved_directory_fails_with_a_load_error(tmp_path):
    import json

    from spikequant.errors import ModelLoadError

    model = tiny_model("mistral", seed=5)
    recipe = load_recipe("quarot-rtn-w4a4kv4")
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    save_quantized(qm, _tokenizer(), recipe, "tiny", tmp_path / "q", findings)
    manifest_path = tmp_path / "q" / "spikequant.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["transforms"]["version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="unsupported transform state version 99"):
        load_quantized(tmp_path / "q", device="cpu")
    (tmp_path / "q" / "quantization.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has no quantization.safetensors"):
        load_quantized(tmp_path / "q", device="cpu")
    del manifest["plan"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="lacks plan"):
        load_quantized(tmp_path / "q", device="cpu")
