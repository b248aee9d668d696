from spikequant.hadamard import MODEL_DIMS, coverage, coverage_table, previous_plan


def test_model_dims_data():
    assert MODEL_DIMS["Llama-2-7B"] == (4096, 11008, 128)
    assert MODEL_DIMS["Qwen2.5-7B"] == (3584, 18944, 128)
    assert MODEL_DIMS["SmolLM2-135M"] == (576, 1536, 64)
    assert MODEL_DIMS["ChatGLM3-6B"] == (4096, 13696, 128)
    assert len(MODEL_DIMS) >= 22


def test_18944_is_covered_without_expansion():
    c = coverage(18944)
    assert c.covered and c.plan is not None and c.plan.construction == "paley2(q=73)"
    assert (c.plan.m, c.plan.pow2) == (148, 128) and c.expand_to is None


def test_13696_is_covered_by_428():
    c = coverage(13696)
    assert c.covered and c.plan is not None and (c.plan.m, c.plan.pow2) == (428, 32) and c.changed
    assert c.cell == "13696 = 428·2^5" and previous_plan(13696) is None


def test_expansion_cell_for_a_size_without_construction():
    c = coverage(3776)
    assert not c.covered and c.expand_to == 3840 and c.expand_plan is not None and c.expand_plan.m == 60
    assert "expand +64 -> 3840" in c.cell


def test_every_listed_dimension_is_covered():
    assert all(coverage(d).covered for dims in MODEL_DIMS.values() for d in dims)


def test_changed_plans_are_exactly_those_that_differ_from_the_previous_rule():
    dims = sorted({d for v in MODEL_DIMS.values() for d in v})
    changed = [d for d in dims if coverage(d).changed]
    assert changed == [d for d in dims if previous_plan(d) is None
                       or (previous_plan(d).pow2, previous_plan(d).factors) != (coverage(d).plan.pow2,
                                                                                coverage(d).plan.factors)]
    assert {11008, 13696} <= set(changed) and not {576, 1536, 64} & set(changed)  # SmolLM2-135M unchanged


def test_coverage_table():
    table = coverage_table()
    assert "| Qwen2.5-7B | 3584 = 28·2^7 | 18944 = 148·2^7 | 128 = 2^7 |" in table
    assert ("| 18944 | intermediate | 148 x 2^7, paley2(q=73) | 268 | 2,936,320 | 358,875,136 | 122x | - "
            "| same |") in table
    assert "| 13696 | intermediate | 428 x 2^5, goethals-seidel(T107) | 536 |" in table and "| **none** |" in table
    assert ("| 11008 | intermediate | 172 x 2^6, williamson(43) | 284 | 1,959,424 | 121,176,064 | 62x "
            "| 344·2^5 (364), 5504·2^1 (5570) | **344 x 2^5, paley1(q=343)** (364) |") in table
    changed = [line for line in table.splitlines() if line.startswith("Plans changed: ")]
    assert len(changed) == 1 and "11008" in changed[0] and "13696" in changed[0] and "576" not in changed[0]
    small = coverage_table({"toy": (576, 1536, 64)})
    assert small.count("\n| 576 |") == 1 and "toy" in small
