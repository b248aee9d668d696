"""Save -> reload gives bit-identical logits for every preset family (static, FP8, sink, outliers, rotation,
GPTQ): the attention implementation, the quantizers' state and the weights all come back as they were."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from spikequant.export import load_quantized, save_quantized
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe

WINDOWS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))


def _tokenizer():
    vocab = {f"t{i}": i for i in range(96)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   unk_token="t0")


@pytest.mark.parametrize("preset", [
    "w8a8-tensor-static",            # static per-tensor scales
    "spike-w8a8-fp8-static",         # FP8 E4M3 exemptions with static scales
    "w8a8-tensor-sink",              # attention-sink tokens kept out of the scale
    "spike-w8a8-tensor-static-outliers",
    "quarot-rtn-w4a4kv4",            # rotations, online Hadamards, KV quantizers
    "quarot-w4a4kv4",                # GPTQ weights
])
def test_reload_is_bit_identical(tmp_path, preset):
    model = tiny_model("llama", seed=7)
    recipe = load_recipe(preset)
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    with torch.no_grad():
        before = model(WINDOWS).logits
    save_quantized(qm, _tokenizer(), recipe, "tiny", tmp_path / "q", findings)
    loaded, qm2, _, manifest = load_quantized(tmp_path / "q", device="cpu")
    assert manifest["attn_implementation"] == "eager"
    with torch.no_grad():
        after = loaded.model(WINDOWS).logits
    assert torch.equal(before, after), float((before - after).abs().max())
    assert qm2.plan == qm.plan
