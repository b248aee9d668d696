"""GBS on the real default model (SmolLM2-135M), as small as a search gets: the first layer, one
iteration, one window of 64 validation tokens, through the command line."""

import json

import pytest

from spikequant.algorithms.clip_ratios import load_ratio_file
from spikequant.algorithms.gbs import SLOTS
from spikequant.cli import main

pytestmark = pytest.mark.integration


def test_search_command_writes_a_loadable_ratio_file(tmp_path, data_dir):
    out = tmp_path / "gbs"
    args = ["search", "--recipe", "quarot-rtn-w4a4kv4", "--data-dir", str(data_dir), "--calib-windows", "1",
            "--seqlen", "64", "--iterations", "1", "--layers", "1", "--output", str(out), "--no-progress"]
    assert main(args) == 0
    ratios = load_ratio_file(out / "ratios.json")
    assert list(ratios) == [0] and list(ratios[0]) == list(SLOTS)
    assert all(r in (0.25, 0.5, 0.75) for r in ratios[0].values())  # m = 0.5, one probe either side
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["name"] == "wikitext2:validation"
    assert report["result"]["probes"] == 16
    assert (out / "heatmap.png").stat().st_size > 1000
