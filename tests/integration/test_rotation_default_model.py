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
    quarot = session.run(load_recipe("quarot-rtn-w4a4kv4"))[0]["ppl"]
    assert quarot < norot / 10
