import math

import torch

from spikequant.hadamard import (
    RandomizedHadamard,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard_matrix,
    random_orthogonal_matrix,
    random_signs,
)


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def test_random_signs_are_seeded():
    s = random_signs(1000, seed=5)
    assert set(s.tolist()) == {-1.0, 1.0} and abs(float(s.mean())) < 0.15
    assert torch.equal(s, random_signs(1000, seed=5)) and not torch.equal(s, random_signs(1000, seed=6))


def test_randomized_hadamard_dense_and_fast_agree():
    for n in (64, 576, 1536):
        rh = RandomizedHadamard(n, seed=3)
        r = rh.matrix()
        assert torch.equal(r, random_hadamard_matrix(n, 3))
        assert (r @ r.T - _eye(n)).abs().max() < 1e-12  # orthogonal
        # R = diag(s)·Hᵀ/√n
        assert torch.allclose(r, torch.diag(rh.signs) @ hadamard_matrix(n).T / math.sqrt(n), atol=1e-15)
        x = torch.randn(4, 3, n, dtype=torch.float64)
        assert (rh(x) - x @ r).abs().max() < 1e-10
        assert (rh.apply(x) - hadamard_transform(x * rh.signs)).abs().max() < 1e-12
        assert (rh(x, inverse=True) - x @ r.T).abs().max() < 1e-10
        assert (rh(rh(x), inverse=True) - x).abs().max() < 1e-10
        assert rh(x.float()).dtype == torch.float32
    assert not torch.equal(RandomizedHadamard(64, 1).matrix(), RandomizedHadamard(64, 2).matrix())


def test_randomized_hadamard_big_size_stays_orthogonal():
    rh = RandomizedHadamard(18944, seed=0)
    x = torch.randn(3, 18944, dtype=torch.float64)
    y = rh(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert (rh(y, inverse=True) - x).abs().max() < 1e-10


def test_haar_orthogonal_is_seeded_and_orthogonal():
    q = random_orthogonal_matrix(100, seed=1)
    assert (q @ q.T - _eye(100)).abs().max() < 1e-12
    assert torch.equal(q, random_orthogonal_matrix(100, seed=1))
    assert not torch.equal(q, random_orthogonal_matrix(100, seed=2))
    assert random_orthogonal_matrix(8, 0, torch.float32).dtype == torch.float32


def test_haar_sign_fix_and_distribution():
    # With the sign fix, Q is the unique orthogonal factor whose R has a positive diagonal.
    g = torch.Generator().manual_seed(7)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    q = random_orthogonal_matrix(6, seed=7)
    r = q.T @ a
    assert torch.allclose(r, torch.triu(r), atol=1e-12) and bool((torch.diagonal(r) > 0).all())
    # Haar: each entry has mean 0 and E[q_ij²] = 1/n, and both determinants ±1 occur. Without the sign fix
    # the diagonal of LAPACK's Q is biased.
    n, draws = 4, 600
    qs = torch.stack([random_orthogonal_matrix(n, seed=s) for s in range(draws)])
    assert qs.mean(0).abs().max() < 0.1
    assert ((qs ** 2).mean(0) - 1 / n).abs().max() < 0.05
    dets = torch.linalg.det(qs)
    assert 0.35 < float((dets > 0).double().mean()) < 0.65
