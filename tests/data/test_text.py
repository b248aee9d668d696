import hashlib

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
    raw = (data_dir / "wikitext-2" / "wiki.test.raw").read_bytes()

    assert hashlib.sha256(raw).hexdigest().startswith("bbf94c53")  # the file, byte for byte
    assert len(t.text) == len(raw.decode()) + 2 * (2891 - 1)  # its 2,891 rows joined by "\n\n"
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


# Three rows of the original wiki.test.raw layout: a blank line (" "), a heading, a blank line, a paragraph,
# a blank line. The hub's rows for it are ["", " = A = \n", "", " b c .\n", ""] (each row keeps its
# newline, whitespace-only rows are empty), so "\n\n".join(rows) is, piece by piece:
#   "" + "\n\n" + " = A = \n" + "\n\n" + "" + "\n\n" + " b c .\n" + "\n\n" + ""
RAW_SAMPLE = " \n = A = \n \n b c .\n \n"
HUB_STRING = "\n\n = A = \n\n\n\n\n b c .\n\n\n"


def test_raw_file_gives_the_hub_join(tmp_path):
    from spikequant.data import hub_join, wikitext_rows

    assert wikitext_rows(RAW_SAMPLE) == ["", " = A = \n", "", " b c .\n", ""]
    assert hub_join(wikitext_rows(RAW_SAMPLE)) == HUB_STRING
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(RAW_SAMPLE)
    assert load_text("wikitext2", "test", tmp_path).text == HUB_STRING
    # the same file passed as a path, and a file without a final newline (its last row has none)
    assert load_text(str(folder / "wiki.test.raw")).text == HUB_STRING
    (folder / "wiki.valid.tokens").write_text(" = A = \n b")
    assert load_text("wikitext2", "validation", tmp_path).text == " = A = \n\n\n b"
    # any other local file is read as it is
    (tmp_path / "notes.raw").write_text(RAW_SAMPLE)
    assert load_text(str(tmp_path / "notes.raw")).text == RAW_SAMPLE


def test_shared_test_split_has_no_blank_rows(data_dir):
    """Our shared copy lost its blank lines: every row is non-empty, so its join differs from the hub's
    (4,358 rows, with empty ones) and absolute perplexities are not comparable to published ones."""
    from spikequant.data import wikitext_rows

    raw = (data_dir / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = wikitext_rows(raw)
    assert len(rows) == 2891 and all(rows)
    assert load_text("wikitext2", "test", data_dir).text == "\n\n".join(rows)


def test_eval_windows_protocol_cap():
    ids = torch.arange(1000)
    assert eval_windows(ids, 10, protocol_cap=256).shape == (100, 10)
    assert eval_windows(ids, 2, protocol_cap=256).shape == (256, 2)  # C4: the first 256 x seqlen tokens
    assert eval_windows(ids, 2, max_windows=3, protocol_cap=256).shape == (3, 2)


def test_unk_share_is_reported(tmp_path):
    p = tmp_path / "wiki.valid.tokens"
    p.write_text(" a <unk> b \n \n c <unk> d e f g h\n")
    t = load_text(str(p))
    assert t.unk_share == 0.2  # 2 of 10 words
