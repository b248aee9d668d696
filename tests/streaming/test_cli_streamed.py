"""``spikequant quantize/eval --offload``: the streamed commands give the in-memory numbers, resume a
partial output, and ``auto`` streams only a model that does not fit."""

import json

import pytest
from transformers import AutoTokenizer

from spikequant.cli import main
from spikequant.models.loading import resolve_model_path
from spikequant.models.tiny import tiny_model
from spikequant.streaming.offload import should_stream

RECIPE = "spike-w8a8-tensor-static"


@pytest.fixture
def ckpt(tmp_path):
    """A tiny random Llama with SmolLM2's tokenizer (so WikiText-2 tokenizes as in the real runs)."""
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m")[0])
    except Exception as e:  # the GGUF package is part of `make setup`
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    path = tmp_path / "ckpt"
    tiny_model("llama", seed=3, vocab_size=len(tok), num_hidden_layers=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("recipe", [RECIPE, "smoothquant-ext-spike-w8a8-tensor-static"])
def test_streamed_quantize_and_eval_match_in_memory(tmp_path, ckpt, data_dir, capsys, recipe):
    common = ["--model", str(ckpt), "--recipe", recipe, "--data-dir", str(data_dir), "--no-progress"]
    assert main(["quantize", *common, "--output", str(tmp_path / "mem"), "--offload", "none"]) == 0
    assert main(["quantize", *common, "--output", str(tmp_path / "disk"), "--offload", "disk"]) == 0
    out = capsys.readouterr().out
    assert "streamed one layer at a time" in out and "peak RSS" in out
    reports = {}
    for name, offload in (("mem", "none"), ("disk", "disk")):
        js = tmp_path / f"{name}.json"
        assert main(["eval", "--model", str(tmp_path / name), "--offload", offload, "--data-dir", str(data_dir),
                     "--seqlen", "32", "--max-windows", "2", "--no-progress", "--json", str(js)]) == 0
        reports[name] = json.loads(js.read_text())
    assert reports["disk"]["model"]["offload"] == "disk"
    for k in ("ppl", "kl", "top1"):
        assert reports["disk"][k] == reports["mem"][k]
    assert reports["disk"]["quantization"] == reports["mem"]["quantization"]


def test_float_eval_streamed_matches(tmp_path, ckpt, data_dir, capsys):
    reps = {}
    for offload in ("none", "disk"):
        js = tmp_path / f"{offload}.json"
        assert main(["eval", "--model", str(ckpt), "--offload", offload, "--data-dir", str(data_dir),
                     "--seqlen", "32", "--max-windows", "2", "--no-progress", "--json", str(js)]) == 0
        reps[offload] = json.loads(js.read_text())
    assert reps["disk"]["ppl"] == reps["none"]["ppl"]


def test_eval_with_recipe_is_refused_streamed(ckpt, data_dir, capsys):
    assert main(["eval", "--model", str(ckpt), "--recipe", RECIPE, "--offload", "disk",
                 "--data-dir", str(data_dir)]) == 2
    assert "quantize" in capsys.readouterr().err


def test_auto_streams_only_what_does_not_fit(ckpt):
    size = 4 * sum(p.numel() for p in tiny_model("llama", vocab_size=49152, num_hidden_layers=3).parameters())
    assert should_stream("auto", str(ckpt), "float32", available=size) is True
    assert should_stream("auto", str(ckpt), "float32", available=100 * size) is False
    assert should_stream("none", str(ckpt), "float32", available=1) is False
    assert should_stream("disk", str(ckpt), "float32", available=1 << 60) is True
