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


def test_extends_merges_a_base_recipe(tmp_path):
    """``extends``: the base's keys, this file's keys on top (modifiers replaced whole), append_modifiers
    after the base's; a file base is found relative to the extending file; the result equals the recipe
    written out in full."""
    base = load_recipe("quarot-rtn-w4a4kv4")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "seed1.yaml").write_text("extends: quarot-rtn-w4a4kv4\nname: s1\nseed: 1\n")
    r = load_recipe(tmp_path / "sub" / "seed1.yaml")
    assert r.to_dict() == {**base.to_dict(), "name": "s1", "seed": 1}
    (tmp_path / "clip.yaml").write_text("extends: sub/seed1.yaml\nname: c\n"
                                        "append_modifiers:\n  - {type: clip_ratios, ratios: {0: {q_proj: 0.5}}}\n")
    c = load_recipe(tmp_path / "clip.yaml")
    assert c.seed == 1 and c.name == "c"
    assert [m.type for m in c.modifiers] == [m.type for m in base.modifiers] + ["clip_ratios"]
    (tmp_path / "nomods.yaml").write_text("extends: quarot-rtn-w4a4kv4\nname: n\nmodifiers: []\n")
    assert load_recipe(tmp_path / "nomods.yaml").modifiers == ()
    full = tmp_path / "full.yaml"
    save_recipe(c, full)
    assert load_recipe(full) == c


@pytest.mark.parametrize("files,needle", [
    ({"a.yaml": "extends: b.yaml\nname: a\n", "b.yaml": "extends: a.yaml\nname: b\n"}, "makes a cycle"),
    ({"a.yaml": "extends: a.yaml\nname: a\n"}, "makes a cycle"),
    ({"a.yaml": "extends: no-such-preset\nname: a\n"}, "unknown recipe preset 'no-such-preset'"),
    ({"a.yaml": "extends: missing.yaml\nname: a\n"}, "recipe file not found"),
    ({"a.yaml": "extends: fp\n"}, "needs its own 'name'"),
    ({"a.yaml": "extends: [fp]\nname: a\n"}, "extends must be a preset name"),
    ({"a.yaml": "name: a\nappend_modifiers: []\n"}, "append_modifiers needs extends"),
    ({"a.yaml": "extends: fp\nname: a\nappend_modifiers: {type: gptq}\n"}, "append_modifiers must be a list"),
    ({"a.yaml": "extends: fp\nname: a\nseeds: 2\n"}, "seeds"),
])
def test_bad_extends_fails_with_one_line(tmp_path, files, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(RecipeError, match=needle) as e:
        load_recipe(tmp_path / "a.yaml")
    assert "\n" not in str(e.value)


def test_every_recipe_file_in_the_repo_loads():
    """The recipe files the docs' commands use (docs/recipes, bench/recipes), several of them ``extends``
    variants of a preset, all load and name themselves after their file."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "docs" / "recipes").rglob("*.yaml")) + sorted((root / "bench" / "recipes").glob("*.yaml"))
    assert len(files) >= 20
    for f in files:
        assert load_recipe(f).name == f.stem, f
