"""``analyze`` and ``compare``: user errors are one line, exit 2, and leave no output behind."""

import pytest

from spikequant.cli import main


@pytest.mark.parametrize("extra,needle", [
    (["--k", "0"], "--k must be positive"),
    (["--percentile", "120"], "--percentile"),
    (["--precision", "fp16"], "fp16"),
    (["--base-recipe", "w9a9"], "unknown recipe preset 'w9a9'"),
    (["--max-layers", "-1"], "max_layers"),
    (["--data-dir", "/nowhere"], "data directory not found"),
])
def test_analyze_errors(tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    code = main(["analyze", "--output", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_analyze_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "spikes.json").write_text("{}")
    assert main(["analyze", "--output", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "spikes.json").read_text() == "{}"


@pytest.mark.parametrize("recipes,needle", [
    (["fp", "w9a9"], "w9a9"),
    (["fp", "fp"], "twice"),
    (["fp", "missing.yaml"], "recipe file not found"),
])
def test_compare_errors(tmp_path, capsys, recipes, needle):
    out = tmp_path / "out"
    code = main(["compare", "--recipes", *recipes, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_compare_bad_data_dir_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--recipes", "fp", "--output", str(out), "--data-dir", str(tmp_path / "no")]) == 2
    assert "data directory not found" in capsys.readouterr().err
    assert not out.exists()
