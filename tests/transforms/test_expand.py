import pytest

from spikequant.models import model_dims
from spikequant.transforms import (
    ExpansionError,
    RotationConfig,
    expand_hidden,
    expand_mlp,
    expansion_cost,
    fuse_norms,
    rotate_model,
)

from .conftest import TOL, max_logit_diff, pair

# hidden 50 and MLP 90 are not multiples of 4, so no Hadamard of either order exists.
ODD = dict(hidden_size=50, intermediate_size=90, num_attention_heads=10, num_key_value_heads=5, head_dim=8)


def test_zero_padding_alone_is_exact(arch):
    model, ref = pair(arch)
    fuse_norms(model)
    expand_hidden(model, 7)
    expand_mlp(model, 5)
    d = model_dims(model)
    assert (d.hidden, d.intermediate) == (55, 85)
    assert max_logit_diff(model, ref) <= TOL


def test_without_the_original_divisor_it_is_not_exact():
    model, ref = pair("llama")
    fuse_norms(model)
    expand_hidden(model, 16)
    for m in model.modules():
        if hasattr(m, "dim") and isinstance(m.dim, int):
            m.dim = 64  # divide by the expanded width instead
    assert max_logit_diff(model, ref) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_automatic_expansion_for_sizes_without_hadamard(arch):
    model, ref = pair(arch, **ODD)
    rep = rotate_model(model, RotationConfig(r1="hadamard"))
    assert rep["hidden"] == [50, 52] and rep["mlp"] == [90, 96]
    assert rep["expansion"]["extra_hidden"] == 2 and rep["expansion"]["extra_mlp"] == 6
    assert max_logit_diff(model, ref) <= TOL


def test_requested_expansion_on_a_constructible_size(arch):
    model, ref = pair(arch)
    rep = rotate_model(model, RotationConfig(expand={"hidden": 16, "mlp": 16}))
    assert rep["hidden"] == [48, 64] and rep["mlp"] == [80, 96]
    assert max_logit_diff(model, ref) <= TOL


def test_haar_r1_needs_no_hidden_expansion():
    model, ref = pair("llama", **ODD)
    rep = rotate_model(model, RotationConfig(r1="random", r4=False))
    assert rep["hidden"] == [50, 50] and "expansion" not in rep
    assert max_logit_diff(model, ref) <= TOL


def test_requested_size_without_construction_fails_before_changing_the_model():
    model, ref = pair("llama")
    with pytest.raises(ExpansionError, match=r"expand.hidden: 48 \+ 2 = 50 has no Hadamard construction.*52"):
        rotate_model(model, RotationConfig(expand={"hidden": 2}))
    assert max_logit_diff(model, ref) == 0.0


def test_cost_and_paper_bound():
    model, _ = pair("llama")
    cost = expansion_cost(model, 16, 0)
    assert 0 < cost.extra_fraction < 16 / 48 + 1e-9
    assert cost.break_even(4, 3) == 48 // 3  # d <= n(b - b')/b'
