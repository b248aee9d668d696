import json

import pytest
import torch

from spikequant.compare import float_linear_share, resolve_recipes, run_compare
from spikequant.data import Text
from spikequant.errors import SpikequantError
from spikequant.models import LoadedModel
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import Session, quantize
from spikequant.recipes import load_recipe


def _session() -> Session:
    """A session over a tiny random model with its windows and calibration already in place."""
    model = tiny_model("llama")
    text = Text("random", "tiny", "generated")
    s = Session(model_source="tiny", seqlen=16, max_windows=2, progress=False)
    s._loaded = LoadedModel(model, None, "tiny", "")
    s._text = text
    s._windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    for r in ("spike-w8a8-tensor", "random-exempt"):
        c = load_recipe(r).calibration
        s._calib_cache[(c.dataset, c.split, c.num_samples, c.seqlen, load_recipe(r).seed)] = (calib, text)
    return s


def test_compare_writes_after_each_recipe_and_resumes(tmp_path):
    recipes = resolve_recipes(["fp", "w8a8-tensor", "spike-w8a8-tensor"])
    seen = []
    reports = run_compare(_session(), recipes, tmp_path, on_result=lambda r: seen.append(
        json.loads((tmp_path / "compare.json").read_text())["pending"]))
    assert seen == [["w8a8-tensor", "spike-w8a8-tensor"], ["spike-w8a8-tensor"], []]
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [r["recipe"] for r in data["rows"]] == ["fp", "w8a8-tensor", "spike-w8a8-tensor"]
    assert data["rows"][0]["ppl_vs_fp"] == 1.0 and data["rows"][1]["kl"] > 0
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "w8a8-tensor" in (tmp_path / "compare.md").read_text()
    with pytest.raises(SpikequantError, match="--resume"):
        run_compare(_session(), recipes, tmp_path)
    # resume: the three done are reused as they are, only the new one runs
    ran = []
    more = resolve_recipes(["fp", "w8a8-tensor", "spike-w8a8-tensor", "w8a8-token"])
    again = run_compare(_session(), more, tmp_path, resume=True, on_result=lambda r: ran.append(r["recipe"]["name"]))
    assert ran == ["w8a8-token"]
    assert [r["ppl"] for r in again[:3]] == [r["ppl"] for r in reports]
    other = _session()
    other.seqlen = 32
    with pytest.raises(SpikequantError, match="other settings"):
        run_compare(other, more, tmp_path, resume=True)


def test_duplicate_and_unknown_recipes_fail_early():
    with pytest.raises(SpikequantError, match="twice"):
        resolve_recipes(["fp", "fp"])
    with pytest.raises(SpikequantError, match="w9a9"):
        resolve_recipes(["fp", "w9a9"])


def test_float_linear_share_counts_weights_or_inputs():
    model = tiny_model("llama")
    r = load_recipe({"name": "x", "weights": {"bits": 8, "granularity": "channel"}, "inputs": {"bits": 8},
                     "overrides": [{"match": "re:.*down_proj", "inputs": None}]})
    qm, _ = quantize(model, r)
    assert qm.high_precision_share() == 0.0
    down = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("down_proj"))
    total = sum(model.get_submodule(n).weight.numel() for n in qm.plan)
    assert float_linear_share(qm) == pytest.approx(down / total)


def test_output_that_is_a_file_or_a_foreign_json_fails_before_running(tmp_path):
    recipes = resolve_recipes(["fp", "w8a8-tensor"])
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpikequantError, match="is a file"):
        run_compare(_session(), recipes, tmp_path / "f")
    (tmp_path / "compare.json").write_text("[1, 2]")
    with pytest.raises(SpikequantError, match="not a compare.json written by spikequant compare"):
        run_compare(_session(), recipes, tmp_path, resume=True)


def test_reference_pass_is_not_in_any_row_wall_time(tmp_path):
    s = _session()
    reports = run_compare(s, resolve_recipes(["fp", "w8a8-tensor"]), tmp_path)
    assert s._reference is not None  # computed once, before the rows were timed
    assert reports[1]["timings"]["wall_s"] >= reports[1]["timings"]["eval_s"]
