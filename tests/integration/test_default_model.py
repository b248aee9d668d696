"""A few end-to-end checks on the real default model (SmolLM2-135M) with few tokens."""

import hashlib
import json
import math

import pytest
import torch

from spikequant.cli import main
from spikequant.recipes import load_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def session(make_session):
    return make_session(256, 4)


def test_fp_ppl_matches_hf_loss(session):
    rep, _ = session.run(load_recipe("fp"))
    model = session.loaded.model
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in session.windows]
    assert math.isclose(rep["ppl"], math.exp(sum(losses) / len(losses)), rel_tol=1e-4)
    assert 20 < rep["ppl"] < 60
    # the evaluated string: the shared wiki.test.raw (sha256 bbf94c53...) as the hub's "\n\n".join(rows)
    assert rep["data"]["source"].endswith("wiki.test.raw")
    assert rep["data_sha256"] == hashlib.sha256(session._text.text.encode()).hexdigest()
    assert session._text.text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is")


def test_spikes_break_per_tensor_but_not_per_token(session):
    fp = session.run(load_recipe("fp"))[0]["ppl"]
    tensor = session.run(load_recipe("w8a8-tensor"))[0]
    token = session.run(load_recipe("w8a8-token"))[0]
    assert tensor["ppl"] > 1.4 * fp
    assert token["ppl"] < 1.1 * fp
    assert token["kl"] < tensor["kl"] and token["top1"] > tensor["top1"]


def test_quantize_save_reload_reproduces(tmp_path, data_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: small-static\nweights: {bits: 8, granularity: channel}\n"
        "inputs: {bits: 8, granularity: tensor, dynamic: false}\n"
        "calibration: {num_samples: 4, seqlen: 128}\n"
    )
    common = ["--data-dir", str(data_dir), "--seqlen", "128", "--max-windows", "2", "--no-progress"]
    out = tmp_path / "q"
    assert main(["quantize", "--recipe", str(recipe), "--output", str(out), *common]) == 0
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", "--recipe", str(recipe), "--json", str(a), *common]) == 0
    assert main(["eval", "--model", str(out), "--json", str(b), *common]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["ppl"] == rb["ppl"] and ra["kl"] == rb["kl"]  # reload is exact
    assert rb["recipe"]["name"] == "small-static" and rb["model"]["base_model"] == "smollm2-135m"
