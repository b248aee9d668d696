import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikequant.hadamard import (
    RandomizedHadamard,
    fwht,
    hadamard_matrix,
    hadamard_transform,
    is_constructible,
    random_orthogonal_matrix,
)

SIZES = [n for n in range(1, 600) if is_constructible(n)]


@pytest.mark.parametrize("n", [1, 2, 12, 64, 576, 1536, 344, 148 * 4])
def test_fast_equals_dense_float64(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    h = hadamard_matrix(n) / math.sqrt(n)
    assert torch.allclose(hadamard_transform(x), x @ h.T, atol=1e-10, rtol=0)
    assert torch.allclose(hadamard_transform(x, inverse=True), x @ h, atol=1e-10, rtol=0)
    assert torch.allclose(hadamard_transform(hadamard_transform(x), inverse=True), x, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from(SIZES), batch=st.lists(st.integers(1, 3), min_size=0, max_size=3), seed=st.integers(0, 999))
def test_fast_transform_property(n, batch, seed):
    x = torch.randn(*batch, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = hadamard_transform(x)
    assert y.shape == x.shape
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-9)  # orthogonal: norms preserved
    assert torch.allclose(y, x @ (hadamard_matrix(n) / math.sqrt(n)).T, atol=1e-10)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(12))


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_randomized_hadamard_is_orthogonal_and_fast(n):
    r = RandomizedHadamard(n, seed=3)
    m = r.matrix()
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=m.dtype), atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.allclose(r.apply(x), x @ m, atol=1e-10)
    assert torch.equal(RandomizedHadamard(n, seed=3).signs, r.signs)
    assert not torch.equal(RandomizedHadamard(n, seed=4).signs, r.signs)


def test_haar_orthogonal_seeded():
    q = random_orthogonal_matrix(100, seed=1)
    assert torch.allclose(q @ q.T, torch.eye(100, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, random_orthogonal_matrix(100, seed=1))
