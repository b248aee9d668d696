"""Spike-aware mixed precision on the real default model (SmolLM2-135M), with few tokens."""

import json

import pytest

from spikequant.cli import main
from spikequant.pipeline import Session
from spikequant.recipes import load_recipe

pytestmark = pytest.mark.integration

KNOWN = {"model.layers.11.mlp.down_proj", "model.layers.28.mlp.down_proj"}


def test_analyze_detects_the_known_spikes_and_writes_a_runnable_recipe(tmp_path, data_dir, capsys):
    out = tmp_path / "spikes"
    args = ["--data-dir", str(data_dir), "--seqlen", "128", "--max-windows", "2", "--no-progress"]
    assert main(["analyze", "--output", str(out), *args]) == 0
    data = json.loads((out / "spikes.json").read_text())
    assert set(data["detected"]) >= KNOWN
    assert data["token_summary"]["max_on_first_token"] >= 2  # the attention-sink position carries them
    assert (out / "spikes.png").stat().st_size > 10_000
    report = tmp_path / "eval.json"
    assert main(["eval", "--recipe", str(out / "spike-recipe.yaml"), "--json", str(report), *args]) == 0
    rep = json.loads(report.read_text())
    assert set(rep["quantization"]["float_linears"]) >= KNOWN
    assert 0 < rep["quantization"]["high_precision_share"] < 0.05


def test_spike_exemptions_beat_rtn_and_random(data_dir):
    s = Session(data_dir=str(data_dir), seqlen=128, max_windows=2, progress=False)
    rtn = s.run(load_recipe("w8a8-tensor"))[0]
    spike = s.run(load_recipe("spike-w8a8-tensor"))[0]
    rand = s.run(load_recipe("random-exempt"))[0]
    found = spike["quantization"]["findings"]["spike_layers"]
    assert set(found) >= KNOWN
    assert not set(found) & set(rand["quantization"]["findings"]["random_layers"])
    assert spike["quantization"]["high_precision_share"] == rand["quantization"]["high_precision_share"]
    assert spike["kl"] < rand["kl"] and spike["kl"] < rtn["kl"]
