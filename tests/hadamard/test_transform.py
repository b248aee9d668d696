import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spikequant.hadamard.transform as transform_module
from spikequant.hadamard import (
    HadamardTransform,
    dense_factor_matrix,
    fwht,
    hadamard_matrix,
    hadamard_transform,
    is_constructible,
    kronecker_reference,
    plan,
    sylvester_matrix,
)

SIZES = [n for n in range(1, 700) if is_constructible(n)]
DENSE_CHECK = [1, 2, 4, 8, 12, 24, 64, 88, 96, 156, 172, 344, 428, 576, 1536, 2080]


def _dense(n: int) -> torch.Tensor:
    return hadamard_matrix(n, torch.float64, normalized=True)


@pytest.mark.parametrize("n", DENSE_CHECK)
def test_fast_equals_dense_float64(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = _dense(n)
    assert (hadamard_transform(x) - x @ h.T).abs().max() < 1e-10
    assert (hadamard_transform(x, inverse=True) - x @ h).abs().max() < 1e-10
    assert (hadamard_transform(hadamard_transform(x), inverse=True) - x).abs().max() < 1e-10


@pytest.mark.parametrize("n", [11008, 13696, 14336, 18944])
def test_big_sizes_against_the_kronecker_definition(n):
    # The n x n matrix is never formed: the reference applies the (exactly checked) factors axis by axis.
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    assert (y - kronecker_reference(x)).abs().max() < 1e-10
    assert (hadamard_transform(x, inverse=True) - kronecker_reference(x, inverse=True)).abs().max() < 1e-10
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    # Spot-check rows of the dense matrix itself: H e_i is column i of H.
    p = plan(n)
    cols = torch.tensor([0, 1, n // 2 + 3, n - 1])
    e = torch.zeros(len(cols), n, dtype=torch.float64)
    e[torch.arange(len(cols)), cols] = 1.0
    full_cols = torch.kron(sylvester_matrix(p.pow2), dense_factor_matrix(n))[:, cols].T / math.sqrt(n)
    assert (hadamard_transform(e) - full_cols).abs().max() < 1e-12


def test_kronecker_reference_matches_dense():
    for n in (12, 576, 2080):
        x = torch.randn(2, n, dtype=torch.float64)
        assert (kronecker_reference(x) - x @ _dense(n).T).abs().max() < 1e-12


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from(SIZES), batch=st.lists(st.integers(1, 3), min_size=0, max_size=3),
       seed=st.integers(0, 2**31 - 1), inverse=st.booleans())
def test_fast_transform_property(n, batch, seed, inverse):
    x = torch.randn(*batch, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = hadamard_transform(x, inverse=inverse)
    h = _dense(n)
    assert y.shape == x.shape
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)  # orthogonal
    assert (y - x @ (h if inverse else h.T)).abs().max() < 1e-10


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from([n for n in SIZES if n >= 8]), block=st.sampled_from([2, 4, 8, 16, 64]),
       widen=st.sampled_from([1, 16, 64, 256]), chunk=st.sampled_from([None, 0, 1, 1000, 1 << 20]))
def test_every_schedule_is_the_same_matrix(n, block, widen, chunk):
    t = HadamardTransform(n, block=block, widen=widen, chunk_bytes=chunk)
    assert math.prod(t.schedule()) == n
    assert t.online_macs(False) == n * sum(b for b in t.schedule(False) if b > 1)
    x = torch.randn(7, n, dtype=torch.float64)
    assert (t(x) - x @ _dense(n).T).abs().max() < 1e-10


def test_dtypes_layouts_and_errors():
    n = 1536
    x = torch.randn(4, 6, n, dtype=torch.float64)
    ref = x @ _dense(n).T
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        assert (hadamard_transform(x.to(dtype)).double() - ref).abs().max() < tol * 10
        assert hadamard_transform(x.to(dtype)).dtype == dtype
    xt = torch.randn(n, 5, dtype=torch.float64).T  # non-contiguous input
    assert (hadamard_transform(xt) - xt @ _dense(n).T).abs().max() < 1e-10
    assert hadamard_transform(torch.zeros(0, n)).shape == (0, n)
    with pytest.raises(ValueError, match="last dim"):
        HadamardTransform(12)(torch.zeros(3, 24))
    with pytest.raises(TypeError, match="floating-point"):
        hadamard_transform(torch.zeros(3, 12, dtype=torch.int64))


def test_autograd_path():
    n = 576
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, n, dtype=torch.float64)
    (hadamard_transform(x) * w).sum().backward()
    assert (x.grad - w @ _dense(n)).abs().max() < 1e-10  # d/dx <x Hᵀ, w> = w H


def test_fwht_reference():
    for n in (1, 2, 16, 256):
        x = torch.randn(3, n, dtype=torch.float64)
        assert (fwht(x) - x @ sylvester_matrix(n)).abs().max() < 1e-10
        assert (fwht(x, normalized=True) - hadamard_transform(x)).abs().max() < 1e-10
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(12))


@pytest.mark.parametrize("n", [8, 96, 1536, 18944])
def test_cuda_kernel_path_layout(monkeypatch, n):
    # No GPU here: stand in for fast_hadamard_transform's kernel (unnormalized Sylvester transform of the
    # last dim times a scale) to check the axis juggling around it.
    monkeypatch.setattr(transform_module, "_cuda_fwht", lambda z, scale: fwht(z) * scale)
    t = HadamardTransform(n, use_kernel=True)
    x = torch.randn(2, n, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    ref = kronecker_reference(x.double())
    assert (t(x).double() - ref).abs().max() < 1e-5
    assert (t(x, inverse=True).double() - kronecker_reference(x.double(), inverse=True)).abs().max() < 1e-5


def test_multithreaded_default_path():
    # Under the suite's single thread the default is chunked; with more threads it is one unchunked pass.
    t = HadamardTransform(11008)
    assert t.schedule(True) == [8, 8, 172] and t.schedule(False) == [8, 8, 172]  # 2^6 in 16- or 32-blocks
    x = torch.randn(6, 11008, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert t._chunk_rows(8) is None
        assert (t(x) - kronecker_reference(x)).abs().max() < 1e-10
        assert (t(x, inverse=True) - kronecker_reference(x, inverse=True)).abs().max() < 1e-10
    finally:
        torch.set_num_threads(before)
    assert t._chunk_rows(8) is not None and (t(x) - kronecker_reference(x)).abs().max() < 1e-10
