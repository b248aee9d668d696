import json

import pytest

from spikequant.errors import RecipeError
from spikequant.recipes import list_presets, load_recipe, save_recipe


def test_core_presets_load():
    names = list_presets()
    for n in ("fp", "w8a8-tensor", "w8a8-tensor-static", "w8a8-token"):
        assert n in names
    for n in names:
        r = load_recipe(n)
        assert r.name == n, f"preset file {n}.yaml names itself {r.name}"
    assert load_recipe("fp").is_float
    assert load_recipe("w8a8-token").inputs.granularity == "token"
    assert not load_recipe("w8a8-tensor-static").inputs.dynamic


def test_round_trip_yaml_and_json(tmp_path):
    r = load_recipe("w8a8-tensor-static")
    save_recipe(r, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == r
    (tmp_path / "r.json").write_text(json.dumps(r.to_dict()))
    assert load_recipe(str(tmp_path / "r.json")) == r


def test_overrides_parse(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: x\nweights: {bits: 8, granularity: channel}\noverrides:\n"
                 "  - match: 're:.*layers\\.11\\.mlp\\.down_proj'\n    weights: null\n    inputs: null\n")
    r = load_recipe(p)
    assert r.overrides[0].match == (r"re:.*layers\.11\.mlp\.down_proj",)
    assert r.overrides[0].slots == {"weights": None, "inputs": None}


@pytest.mark.parametrize("text,needle", [
    ("name: x\nwieghts: {bits: 8}\n", "wieghts"),
    ("name: x\nweights: {bits: 12}\n", "bits"),
    ("name: x\ninputs: {granularity: everything}\n", "granularity"),
    ("name: x\ncalibration: {num_samples: -1}\n", "num_samples"),
    ("name: x\nmodifiers: [{type: nonsense}]\n", "nonsense"),
    ("name: x\noverrides: [{weights: null}]\n", "match"),
    ("weights: {bits: 8}\n", "name"),
    ("name: x\nweights: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
])
def test_invalid_recipes_fail_with_one_line(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=needle) as e:
        load_recipe(p)
    assert "\n" not in str(e.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(RecipeError, match="unknown recipe preset 'w9a9'.*w8a8-tensor"):
        load_recipe("w9a9")
