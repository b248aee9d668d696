"""User errors: non-zero exit, one line naming the problem, and no report written."""

import pytest

from spikequant.cli import main


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("make_args,needle", [
    (lambda d, t: ["--recipe", str(t / "bad.yaml"), "--data-dir", str(d)], "bad.yaml"),
    (lambda d, t: ["--recipe", "w9a9", "--data-dir", str(d)], "unknown recipe preset 'w9a9'"),
    (lambda d, t: ["--recipe", "fp", "--data-dir", str(t / "nowhere")], "data directory not found"),
    (lambda d, t: ["--recipe", str(t / "missing.yaml"), "--data-dir", str(d)], "recipe file not found"),
])
def test_eval_errors(tmp_path, capsys, make_args, needle):
    (tmp_path / "bad.yaml").write_text("name: bad\ninputs: {bits: 8, granularty: tensor}\n")
    out = tmp_path / "report.json"
    code, err = _run(["eval", *make_args(tmp_path, tmp_path), "--json", str(out)], capsys)
    assert code == 2
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_malformed_recipe_names_the_key(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: bad\ninputs: {bits: 8, granularty: tensor}\n")
    code, err = _run(["eval", "--recipe", str(tmp_path / "bad.yaml")], capsys)
    assert code == 2 and "granularty" in err[0]


def test_recipes_lists_presets(capsys):
    assert main(["recipes"]) == 0
    assert "w8a8-tensor-static" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--max-windows", "--seqlen"])
def test_non_positive_window_flags_fail_on_parsing(capsys, flag):
    with pytest.raises(SystemExit) as exc:
        main(["eval", flag, "0"])
    assert exc.value.code == 2
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_unavailable_device_fails_before_the_model_loads(tmp_path, capsys, data_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "report.json"
    code, err = _run(["eval", "--device", "cuda", "--data-dir", str(data_dir), "--json", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "CUDA is not available" in err[0], err
    assert not out.exists()


@pytest.fixture
def tiny_session(monkeypatch):
    """``eval`` on a tiny random model and random windows: no model file, no text, no tokenizer."""
    import torch

    from spikequant.data import Text
    from spikequant.models import LoadedModel
    from spikequant.models.tiny import tiny_model
    from spikequant.pipeline import Session

    def load(self):
        if self._loaded is None:
            self._loaded = LoadedModel(tiny_model("llama"), None, "tiny", "")
            self._text = Text("random", "tiny", "generated")
            self._windows = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))

    monkeypatch.setattr(Session, "load", load)
    monkeypatch.setattr(Session, "calibration", lambda self, recipe: torch.randint(0, 96, (4, 16)))


@pytest.mark.parametrize("recipe,needle", [
    ("weights: {bits: 4, granularity: group, group_size: 32}",
     "model.layers.0.self_attn.q_proj.weights: group_size 32 does not divide its width 48"),
    ("weights: {bits: 4, granularity: group, group_size: 32}\nmodifiers: [{type: gptq}]",
     "model.layers.0.self_attn.q_proj.weights: group_size 32 does not divide its width 48"),
    ("inputs: {bits: 8, granularity: group, group_size: 24}",
     "model.layers.0.mlp.down_proj.inputs: group_size 24 does not divide its width 80"),
    ("weights: {bits: 4, granularity: channel}\nmodifiers: [{type: gptq, num_samples: 0}]",
     "gptq): num_samples must be a positive integer, got 0"),
    ("weights: {bits: 4, granularity: channel}\nmodifiers: [{type: gptq, num_samples: -4}]",
     "gptq): num_samples must be a positive integer, got -4"),
    ("modifiers: [{type: kv_cache, bits: 4, k_group: 7}]",
     "kv_cache: k_group 7 does not divide the 24 values per token of the K/V cache (2 KV heads x head_dim 12)"),
], ids=["weight-group", "gptq-weight-group", "input-group", "gptq-samples-0", "gptq-samples-neg", "kv-group"])
def test_bad_group_size_or_sample_count_is_exit_2_naming_value_and_layer(tmp_path, capsys, tiny_session,
                                                                         recipe, needle):
    """Before: a traceback from the middle of the forward (ValueError in fake.py) or of GPTQ (AssertionError)."""
    (tmp_path / "r.yaml").write_text(f"name: r\n{recipe}\n")
    out = tmp_path / "report.json"
    code, err = _run(["eval", "--recipe", str(tmp_path / "r.yaml"), "--no-progress", "--no-kl", "--json", str(out)],
                     capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_tiny_session_fixture_runs_a_good_recipe(tmp_path, capsys, tiny_session):
    """The fixture above is a working eval (so the errors it shows come from the recipe)."""
    (tmp_path / "r.yaml").write_text("name: r\nweights: {bits: 4, granularity: group, group_size: 16}\n")
    out = tmp_path / "report.json"
    code = main(["eval", "--recipe", str(tmp_path / "r.yaml"), "--no-progress", "--no-kl", "--json", str(out)])
    assert code == 0 and out.exists()
