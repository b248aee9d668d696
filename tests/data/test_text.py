import pytest
import torch

from spikequant.data import calibration_windows, eval_windows, load_text
from spikequant.errors import DataError


def test_eval_windows_are_consecutive_and_limited():
    ids = torch.arange(1000)
    w = eval_windows(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w.flatten(), ids[:896])
    assert eval_windows(ids, 128, max_windows=2).shape == (2, 128)
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(ids[:10], 128)
    with pytest.raises(DataError, match="max_windows must be >= 1, got 0"):
        eval_windows(ids, 128, max_windows=0)


def test_calibration_is_seeded():
    ids = torch.arange(5000)
    a = calibration_windows(ids, 64, 8, seed=3)
    assert torch.equal(a, calibration_windows(ids, 64, 8, seed=3))
    assert not torch.equal(a, calibration_windows(ids, 64, 8, seed=4))
    assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 64)) for r in a)


def test_local_wikitext(data_dir):
    t = load_text("wikitext2", "test", data_dir)
    assert t.sha256.startswith("bbf94c53") and t.sha256.endswith("574a")
    # the folder holding wikitext-2/ and the wikitext-2 folder itself both work
    assert load_text("wikitext2", "validation", data_dir / "wikitext-2").name == "wikitext2:validation"


def test_missing_dir_and_files(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data directory not found: /nope"):
        load_text("wikitext2", "test", "/nope")
    with pytest.raises(DataError, match="holds no WikiText-2 files"):
        load_text("wikitext2", "test", tmp_path)
    monkeypatch.setenv("SPIKEQUANT_DATA_DIR", "/also/nope")
    with pytest.raises(DataError, match=r"\$SPIKEQUANT_DATA_DIR"):
        load_text("wikitext2", "test")


def test_local_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world")
    t = load_text(str(p))
    assert t.text == "hello world" and len(t.sha256) == 64
    with pytest.raises(DataError, match="unknown dataset"):
        load_text(str(tmp_path / "missing.txt"))
