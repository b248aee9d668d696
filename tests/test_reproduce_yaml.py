"""docs/reproduce.yaml (the documented numbers behind `make reproduce`) against the docs tables."""

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import reproduce  # noqa: E402


@pytest.fixture(scope="module")
def spec():
    return reproduce.load_spec()


def test_every_number_in_the_docs_tables_is_listed_or_declared_not_covered(spec):
    assert reproduce.check_docs(spec) == []


def test_a_documented_value_that_drifts_from_the_doc_is_named(spec):
    bad = copy.deepcopy(spec)
    table = next(t for t in bad["tables"] if t["doc"] == "docs/spike-aware.md" and "fp" in t["rows"])
    table["rows"]["smoothquant-spike-w8a8-tensor-static"]["PPL"] = 56.63
    problems = reproduce.check_docs(bad)
    assert len(problems) == 1 and "smoothquant-spike-w8a8-tensor-static" in problems[0] and "56.36" in problems[0]


def test_a_table_nobody_accounts_for_is_reported(spec, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n\n| recipe | PPL |\n| --- | --- |\n| fp | 36.08 |\n\n"
                                        "| a | b |\n| --- | --- |\n| no | numbers |\n")
    problems = reproduce.check_docs({"tables": [], "not_covered": []}, tmp_path, ["README.md"])
    assert len(problems) == 1 and "README.md:3" in problems[0]
    listed = {"tables": [], "not_covered": [{"doc": "README.md", "after": "| recipe | PPL |", "reason": "test"}]}
    assert reproduce.check_docs(listed, tmp_path, ["README.md"]) == []


def test_a_row_or_column_left_out_is_reported(tmp_path):
    (tmp_path / "README.md").write_text("demo prints\n\n| recipe | PPL | KL |\n| --- | --- | --- |\n"
                                        "| fp | 36.08 | 0 |\n| w8 | 74.23 | 0.77 |\n")
    entry = {"doc": "README.md", "after": "demo prints", "run": "demo", "columns": {"PPL": "ppl"},
             "rows": {"fp": {"PPL": 36.08}}}
    problems = reproduce.check_docs({"tables": [entry]}, tmp_path, ["README.md"])
    assert any("'KL'" in p for p in problems) and any("'w8'" in p for p in problems)


def test_checks_expand_lists_and_classes(spec):
    checks = reproduce.checks_of(spec)
    expanded = reproduce.checks_of({"tables": [{"doc": "d", "after": "a", "run": "r", "columns": {"PPL": "ppl"},
                                                  "rows": {"two": {"recipe": ["x", "y"], "class": ["lowbit", "gptq"],
                                                                   "PPL": [507, 85.8]}}}]})
    assert [(c.recipe, c.klass, c.documented) for c in expanded] == [("x", "lowbit", 507.0), ("y", "gptq", 85.8)]
    fp = [c for c in checks if c.recipe == "fp" and c.metric == "ppl"]
    assert fp and all(c.klass == "fp" for c in fp)
    assert all(c.klass == "exact" for c in checks if c.metric in ("hp_pct", "weight_bits", "hidden", "mlp"))
    quick = {(c.run, c.recipe) for c in checks if c.quick}
    assert quick == {("spike-aware-main", "fp"), ("spike-aware-main", "smoothquant-spike-w8a8-tensor-static")}
    assert all(c.run in spec["runs"] for c in checks)


def test_margins(spec):
    c = reproduce.Check("README.md", "w8a8-tensor", "PPL", 74.23, "demo", "w8a8-tensor", "ppl", "quantized", True)
    m = spec["margins"]["quantized"]
    assert reproduce.within(c, 74.23 * (1 + m) - 0.001, spec)[0]
    assert not reproduce.within(c, 74.23 * (1 + m) + 0.01, spec)[0]
    kl = reproduce.Check("README.md", "w8a8-token", "KL", 0.0339, "demo", "w8a8-token", "kl", "quantized", True)
    assert reproduce.within(kl, 0.0339 + m - 0.0001, spec)[0]  # absolute for KL
    assert not reproduce.within(kl, 0.0339 + m + 0.001, spec)[0]
    exact = reproduce.Check("d", "r", "bits/weight", 8.2, "x", "y", "weight_bits", "exact", False)
    assert reproduce.within(exact, 8.2375, spec)[0] and not reproduce.within(exact, 8.26, spec)[0]
    assert reproduce.half_unit(0.8810) == pytest.approx(0.0005) and reproduce.half_unit(15925.0) == 0.5


def test_metrics_of_each_output_format():
    compare = {"settings": {}, "rows": [{"recipe": "fp", "ppl": 36.0, "kl": 0.0, "top1": 1.0, "ppl_vs_fp": 1.0,
                                         "hp_pct": None, "weight_bits": None},
                                        {"recipe": "w8", "ppl": 72.0, "kl": 0.7, "top1": 0.5, "ppl_vs_fp": 2.0,
                                         "hp_pct": 2.5, "weight_bits": 8.2}]}
    m = reproduce.metrics_of(compare, reproduce.guess_format(compare))
    assert m["w8"]["vs_fp_pct"] == pytest.approx(100) and m["w8"]["hp_share"] == pytest.approx(0.025)
    demo = {"results": [{"ppl": 36.0, "kl": 0.0, "top1": 1.0, "recipe": {"name": "fp"}, "quantization": None},
                        {"ppl": 54.0, "kl": 0.4, "top1": 0.6, "recipe": {"name": "w8"},
                         "quantization": {"high_precision_share": 0.0, "effective_weight_bits": 8.0}}]}
    m = reproduce.metrics_of(json.loads(json.dumps(demo)), reproduce.guess_format(demo))
    assert m["w8"]["ppl_vs_fp"] == pytest.approx(1.5) and m["w8"]["hp_pct"] == 0
    spikes = {"median_max_in": 2.0, "linears": [{"name": "model.layers.1.mlp.down_proj", "max_in": 10.0,
                                                  "max_in_rest": 5.0, "max_in_bulk": 1.0}]}
    m = reproduce.metrics_of(spikes, reproduce.guess_format(spikes))
    assert m["layers.1.mlp.down_proj"]["x_median"] == 5.0


def test_extra_measurements_from_a_folder_of_eval_reports(tmp_path):
    for name, ppl in (("a", 70.0), ("b", 40.0)):
        rep = {"ppl": ppl, "kl": None, "top1": None, "recipe": {"name": name},
               "quantization": {"high_precision_share": 0.0, "effective_weight_bits": 8.0}}
        (tmp_path / f"{name}.json").write_text(json.dumps(rep))
    m = reproduce.read_metrics(tmp_path)
    assert m["a"]["ppl"] == 70.0 and m["b"]["ppl"] == 40.0
