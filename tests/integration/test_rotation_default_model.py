"""Rotation on the real default model (SmolLM2-135M: hidden 576 = 36·16, MLP 1536 = 12·128), few tokens."""

import pytest

from spikequant.recipes import load_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def session(make_session):
    return make_session(256, 2)


def test_rotation_alone_keeps_the_model(session):
    fp = session.run(load_recipe("fp"))[0]
    rot = session.run(load_recipe({"name": "rotate-only", "modifiers": [{"type": "rotate"}]}))[0]
    assert abs(rot["ppl"] - fp["ppl"]) < 1e-3 * fp["ppl"]  # float32 rounding only
    assert rot["top1"] > 0.999


def test_hadamard_rotation_rescues_w4a4kv4(session):
    norot = session.run(load_recipe("norot-w4a4kv4"))[0]["ppl"]
    rep = session.run(load_recipe("quarot-rtn-w4a4kv4"))[0]
    assert rep["ppl"] < norot / 10
    # QuaRot's setting: the online o_proj Hadamard is on (9 heads x 64 = 576 has a Hadamard, 36·16)
    assert rep["quantization"]["findings"]["rotation"]["o_online_auto"] is True
