from spikequant.hadamard import MODEL_DIMS, coverage, coverage_table


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


def test_13696_needs_expansion():
    c = coverage(13696)
    assert not c.covered and c.expand_to == 13760 and c.expand_plan is not None and c.expand_plan.m == 860
    assert "expand +64 -> 13760" in c.cell


def test_every_listed_dimension_but_chatglm_ffn_is_covered():
    uncovered = {d for dims in MODEL_DIMS.values() for d in dims if not coverage(d).covered}
    assert uncovered == {13696}


def test_coverage_table():
    table = coverage_table()
    assert "| Qwen2.5-7B | 3584 = 28·2^7 | 18944 = 148·2^7 | 128 = 2^7 |" in table
    assert "| 18944 | intermediate | 148 x 2^7, paley2(q=73) | 2,936,320 | 358,875,136 | 122x |" in table
    assert "| 13696 | intermediate | **none**; expand +64 -> 13760 = 860 x 2^4, paley1(q=859) |" in table
    assert "| 11008 | intermediate | 344 x 2^5, paley1(q=343) |" in table
    small = coverage_table({"toy": (576, 1536, 64)})
    assert small.count("\n| 576 |") == 1 and "toy" in small
