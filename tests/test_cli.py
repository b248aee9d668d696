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
    assert code != 0
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
