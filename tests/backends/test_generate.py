"""``spikequant generate`` on tiny saved models: it prints text and tokens/s on every backend, the int8
backend greedy-decodes what the fake-quant model decodes, and bad input is one line (exit 2)."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spikequant.backends.generate import generate, load_for_backend
from spikequant.cli import main
from spikequant.export import save_quantized
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe

WINDOWS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
PROMPT = "t5 t17 t3 t40 t8 t9"


def _tokenizer():
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t95")


def _saved(tmp_path, preset="w8a8-tensor-static", name="q"):
    model = tiny_model("llama", seed=3)
    recipe = load_recipe(preset)
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    return str(save_quantized(qm, _tokenizer(), recipe, "tiny", tmp_path / name, findings))


@pytest.mark.parametrize("backend", ["float", "bf16", "int8"])
def test_generate_cli_prints_text_and_speeds(tmp_path, capsys, backend):
    q = _saved(tmp_path)
    rc = main(["generate", "--model", q, "--backend", backend, "--prompt", PROMPT, "--max-new-tokens", "5",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith(PROMPT)
    assert "prefill 6 tokens:" in out and "tokens/s" in out and f"[{backend}:" in out


def test_int8_greedy_tokens_equal_fake_quant(tmp_path):
    q = _saved(tmp_path)
    fake = generate(load_for_backend(q, "float"), PROMPT, 8, ignore_eos=True)
    real = generate(load_for_backend(q, "int8"), PROMPT, 8, ignore_eos=True)
    assert real.new_tokens == fake.new_tokens == 8
    assert real.completion == fake.completion


def test_int8_embeddings_in_bf16_are_said_and_saved(tmp_path, capsys):
    q = _saved(tmp_path)
    args = ["--prompt", PROMPT, "--max-new-tokens", "4", "--no-progress"]
    assert main(["generate", "--model", q, "--backend", "int8", "--int8-embeddings", "bfloat16",
                 "--save-int8", str(tmp_path / "i8"), *args]) == 0
    out = capsys.readouterr().out
    assert "float32 elsewhere (embedding table and lm_head bfloat16)" in out
    assert main(["generate", "--model", str(tmp_path / "i8"), "--backend", "int8", *args]) == 0
    again = capsys.readouterr().out
    assert "(embedding table and lm_head bfloat16)" in again
    assert again.splitlines()[0] == out.splitlines()[0]


def test_int8_checkpoint_generates_the_same(tmp_path, capsys):
    q = _saved(tmp_path)
    args = ["--prompt", PROMPT, "--max-new-tokens", "6", "--no-progress"]
    assert main(["generate", "--model", q, "--backend", "int8", "--save-int8", str(tmp_path / "i8"), *args]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert main(["generate", "--model", str(tmp_path / "i8"), "--backend", "int8", *args]) == 0
    assert capsys.readouterr().out.splitlines()[0] == first


def test_no_cache_decoding_equals_cached_for_static_models(tmp_path):
    prepared = load_for_backend(_saved(tmp_path), "float")
    a = generate(prepared, PROMPT, 6, ignore_eos=True)
    b = generate(prepared, PROMPT, 6, ignore_eos=True, use_cache=False)
    assert a.completion == b.completion


@pytest.mark.parametrize("make_args, needle", [
    (lambda q, t: ["--model", q, "--backend", "int8", "--prompt", ""], "--prompt is empty"),
    (lambda q, t: ["--model", "smollm2-135m", "--backend", "int8", "--prompt", "x"], "needs a W8A8 model"),
    (lambda q, t: ["--model", q, "--backend", "int8", "--recipe", "fp", "--prompt", "x"], "drop --recipe"),
    (lambda q, t: ["--model", str(t), "--backend", "float", "--prompt", "x"], "not a model folder"),
    (lambda q, t: ["--model", q, "--backend", "float", "--save-int8", str(t / "o"), "--prompt", "x"],
     "--save-int8 needs --backend int8"),
    (lambda q, t: ["--model", _saved(t, "w8a8-tensor", "dyn"), "--backend", "int8", "--prompt", "x"],
     "int8 backend cannot run model.layers.0.self_attn.q_proj: inputs int8-tensor-dyn"),
    (lambda q, t: ["--model", _saved(t, "w8a8-tensor", "dyn"), "--backend", "float", "--prompt", "x"],
     "pass --no-cache"),
    (lambda q, t: ["--model", q, "--backend", "int8", "--compile", "--no-cache", "--prompt", "x"],
     "cannot be combined with --no-cache"),
    (lambda q, t: ["--model", q, "--backend", "float", "--int8-embeddings", "bfloat16", "--prompt", "x"],
     "--int8-embeddings is for --backend int8"),
])
def test_bad_input_is_one_line(tmp_path, capsys, make_args, needle):
    q = _saved(tmp_path)
    (tmp_path / "empty").mkdir()
    args = make_args(q, tmp_path / "empty" if "not a model" in needle else tmp_path)
    capsys.readouterr()  # the saving above writes progress bars
    rc = main(["generate", *args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    # (transformers' own "Loading weights" bar may precede it where the check needs the loaded model)
    ours = [line for line in err.splitlines() if line.startswith("spikequant")]
    assert len(ours) == 1 and needle in ours[0] and err.endswith(ours[0]), err


def test_no_cache_runs_a_dynamic_per_tensor_model(tmp_path, capsys):
    q = _saved(tmp_path, "w8a8-tensor", "dyn")
    assert main(["generate", "--model", q, "--prompt", PROMPT, "--max-new-tokens", "3", "--no-cache",
                 "--no-progress"]) == 0


def test_eval_backend_int8_ppl_equals_fake_quant(tmp_path, capsys):
    """``spikequant eval --backend int8`` on a saved model: the same perplexity as the fake-quant model
    (within the float rounding discussed in test_int8.py), and the report records the backend."""
    import json

    q = _saved(tmp_path)
    words = torch.randint(1, 95, (400,), generator=torch.Generator().manual_seed(5)).tolist()
    (tmp_path / "text.txt").write_text(" ".join(f"t{i}" for i in words))
    ppl = {}
    for backend in ("float", "int8"):
        out = tmp_path / f"{backend}.json"
        assert main(["eval", "--model", q, "--backend", backend, "--dataset", str(tmp_path / "text.txt"),
                     "--seqlen", "32", "--no-kl", "--no-progress", "--json", str(out)]) == 0
        rep = json.loads(out.read_text())
        assert rep["model"]["backend"] == backend
        ppl[backend] = rep["ppl"]
    assert abs(ppl["int8"] / ppl["float"] - 1) < 1e-4, ppl
    capsys.readouterr()
    assert main(["eval", "--model", "smollm2-135m", "--backend", "int8", "--dataset", str(tmp_path / "text.txt"),
                 "--no-progress"]) == 2
    assert "is not one" in capsys.readouterr().err


def test_cached_decoding_of_a_rotated_kv_quantized_model_equals_no_cache(tmp_path):
    """Online Hadamards and the KV-cache quantizer work with the HF cache (they requantize the cache per
    token each step): greedy tokens with and without the cache agree."""
    prepared = load_for_backend(_saved(tmp_path, "quarot-rtn-w4a4kv4", "rot"), "float")
    a = generate(prepared, PROMPT, 6, ignore_eos=True)
    b = generate(prepared, PROMPT, 6, ignore_eos=True, use_cache=False)
    assert a.new_tokens == 6 and a.completion == b.completion


def test_compiled_decoding_generates_what_eager_does(tmp_path, capsys):
    """--compile: transformers' compiled decode step (static KV cache) on the int8 model greedy-decodes the
    eager model's tokens; the untimed first (compiling) run is reported."""
    from spikequant.backends.int8 import _compiled_quantize

    if _compiled_quantize() is None:
        pytest.skip("torch.compile does not work on this machine (no C++ compiler)")
    q = _saved(tmp_path)
    eager = generate(load_for_backend(q, "int8"), PROMPT, 8, ignore_eos=True)
    prepared = load_for_backend(q, "int8")
    compiled = generate(prepared, PROMPT, 8, ignore_eos=True, compile=True)
    assert compiled.new_tokens == eager.new_tokens == 8
    assert compiled.completion == eager.completion
    assert compiled.compiled and compiled.warmup_s > 0 and not eager.compiled
    # the same shapes again: no second warm-up, the same tokens; another length warms up once more
    again = generate(prepared, PROMPT, 8, ignore_eos=True, compile=True)
    assert again.warmup_s == 0.0 and again.completion == eager.completion
    assert generate(prepared, PROMPT, 5, ignore_eos=True, compile=True).warmup_s > 0
    assert main(["generate", "--model", q, "--backend", "int8", "--prompt", PROMPT, "--max-new-tokens", "3",
                 "--no-progress", "--compile"]) == 0
    assert "decode compiled; first, untimed run" in capsys.readouterr().out.splitlines()[-1]
