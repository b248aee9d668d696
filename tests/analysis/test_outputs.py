import json

import pytest
import torch
import yaml

from spikequant.analysis import SpikeRule, analyze, write_analysis
from spikequant.analysis.report import is_delimiter, spike_recipe, token_summary
from spikequant.errors import RecipeError
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import build_plan
from spikequant.recipes import load_recipe

SPIKE = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def result():
    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.up_proj").weight[7] *= 1e5
    windows = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    return model, analyze(model, windows, rule=SpikeRule(k=20), progress=False)


def test_write_analysis_files_and_recipe_loads(tmp_path, result):
    model, res = result
    paths = write_analysis(res, tmp_path, load_recipe("w8a8-tensor-static"), "float",
                           {"model": "tiny", "data": {"name": "random", "windows": 2, "seqlen": 12}})
    assert {p.name for p in tmp_path.iterdir()} == {"spikes.json", "spikes.md", "spikes.png", "spike-recipe.yaml"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["detected"] == [SPIKE] and len(data["linears"]) == 21
    assert "environment" in data and data["model"] == "tiny"
    assert SPIKE in paths["markdown"].read_text()
    recipe = load_recipe(paths["recipe"])  # what analyze writes is a valid recipe as it stands
    assert recipe.inputs is not None and not recipe.inputs.dynamic  # the base recipe is kept
    plan = build_plan(model, recipe)
    assert plan[SPIKE].is_float
    assert sum(m.is_float for m in plan.values()) == 1
    # and the user can edit the list
    raw = yaml.safe_load(paths["recipe"].read_text())
    raw["overrides"][-1]["match"].append("model.layers.0.mlp.down_proj")
    assert build_plan(model, load_recipe(raw))["model.layers.0.mlp.down_proj"].is_float


def test_fp8_recipe_and_bad_precision(result):
    _, res = result
    data = spike_recipe(load_recipe("w8a8-tensor"), res.detected, "fp8_e4m3")
    ov = data["overrides"][-1]
    assert ov["match"] == [SPIKE] and ov["weights"]["format"] == ov["inputs"]["format"] == "fp8_e4m3"
    with pytest.raises(RecipeError, match="fp16"):
        spike_recipe(load_recipe("w8a8-tensor"), res.detected, "fp16")


def test_spike_recipe_drops_detection_modifiers():
    data = spike_recipe(load_recipe("spike-w8a8-tensor"), ["model.layers.0.mlp.down_proj"])
    assert all(m["type"] != "spike_exempt" for m in data["modifiers"])


def test_token_summary(result):
    _, res = result
    s = token_summary(res.stats, res.detected)
    assert s["spike_layers"] == 1 and s["top_tokens_considered"] == 8
    assert is_delimiter("\n") and is_delimiter(" .") and is_delimiter("@-@") and not is_delimiter(" the")


def test_written_recipe_keeps_spike_layers_float_on_every_side():
    """A base recipe that also quantizes linear outputs: the kept layer must not keep its output quantizer."""
    base = load_recipe({"name": "w8a8o8", "weights": {"bits": 8, "granularity": "channel"},
                        "inputs": {"bits": 8, "granularity": "tensor"}, "outputs": {"bits": 8, "granularity": "token"}})
    kept = "model.layers.0.mlp.down_proj"
    recipe = load_recipe(spike_recipe(base, [kept]))
    from spikequant.models.tiny import tiny_model
    from spikequant.pipeline import build_plan

    plan = build_plan(tiny_model("llama"), recipe)
    assert plan[kept].is_float
    assert plan["model.layers.1.mlp.down_proj"].outputs is not None
