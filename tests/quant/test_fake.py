"""The fake-quantization math against plain, loop-based references."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikequant.quant import QuantSpec, fake_quantize


def ref_int(x: np.ndarray, bits: int, symmetric: bool, clip: float) -> np.ndarray:
    """Quantize one slice (any shape) with one scale, element by element."""
    out = np.empty_like(x)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(x).max() * clip
        s = amax / qmax if amax > 0 else 1.0
        for i, v in np.ndenumerate(x):
            out[i] = min(max(np.round(v / s), -qmax - 1), qmax) * s
    else:
        qmax = 2**bits - 1
        lo, hi = min(x.min(), 0) * clip, max(x.max(), 0) * clip
        s = (hi - lo) / qmax if hi > lo else 1.0
        z = np.round(-lo / s)
        for i, v in np.ndenumerate(x):
            out[i] = (min(max(np.round(v / s) + z, 0), qmax) - z) * s
    return out


def reference(x: np.ndarray, spec: QuantSpec, role: str) -> np.ndarray:
    """Split into slices by granularity with plain loops, quantize each with ref_int."""
    out = np.empty_like(x)
    f = lambda a: ref_int(a, spec.bits, spec.symmetric, spec.clip_ratio)  # noqa: E731
    g = spec.granularity
    if g == "tensor":
        return f(x)
    if g == "token" or (g == "channel" and role == "weight"):
        for idx in np.ndindex(*x.shape[:-1]):
            out[idx] = f(x[idx])
        return out
    if g == "channel":  # activation: one scale per feature
        for j in range(x.shape[-1]):
            out[..., j] = f(x[..., j])
        return out
    gs = spec.group_size
    for idx in np.ndindex(*x.shape[:-1]):
        for start in range(0, x.shape[-1], gs):
            out[idx + (slice(start, start + gs),)] = f(x[idx + (slice(start, start + gs),)])
    return out


CASES = list(itertools.product(
    [2, 3, 4, 8], [True, False], ["tensor", "token", "channel", "group"], ["act", "weight"], [1.0, 0.7]
))


@pytest.mark.parametrize("bits,symmetric,gran,role,clip", CASES)
def test_int_matches_reference(bits, symmetric, gran, role, clip):
    g = torch.Generator().manual_seed(bits * 7 + len(gran))
    shape = (6, 16) if role == "weight" else (2, 5, 16)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    x.view(-1)[3] = 40.0  # a spike, so clipping and per-slice scales matter
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=gran, clip_ratio=clip,
                     group_size=4 if gran == "group" else None)
    got = fake_quantize(x, spec, role).numpy()
    want = reference(x.numpy(), spec, role)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_symmetric_levels_and_error_bound():
    x = torch.randn(1000, dtype=torch.float64)
    spec = QuantSpec(bits=4, granularity="tensor")
    y = fake_quantize(x, spec)
    scale = x.abs().max() / 7
    levels = torch.unique(torch.round(y / scale))
    assert levels.min() >= -8 and levels.max() <= 7
    assert (y - x).abs().max() <= scale / 2 + 1e-12


def _all_e4m3() -> np.ndarray:
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN in e4m3fn
            v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            vals += [v, -v]
    return np.unique(np.array(vals))


def test_fp8_e4m3_matches_nearest_representable():
    grid = _all_e4m3()
    x = torch.randn(500, dtype=torch.float64) * 5
    spec = QuantSpec(format="fp8_e4m3", granularity="tensor")
    got = fake_quantize(x, spec).numpy()
    scale = float(x.abs().max()) / 448.0
    for v, y in zip(x.numpy(), got, strict=True):
        cand = grid * scale
        best = cand[np.argsort(np.abs(cand - v), kind="stable")[:2]]
        # ties between two neighbours may go either way (round-to-even on the mantissa)
        assert np.isclose(y, best[0], rtol=1e-12) or (
            np.isclose(abs(best[0] - v), abs(best[1] - v)) and np.isclose(y, best[1], rtol=1e-12))


def test_fp8_e5m2_is_unscaled_cast_and_saturates():
    x = torch.tensor([1.0, 3.3, -1000.0, 1e6], dtype=torch.float32)
    y = fake_quantize(x, QuantSpec(format="fp8_e5m2"))
    assert y[0] == 1.0 and y[3] == 57344.0
    assert torch.equal(y[:3], x[:3].to(torch.float8_e5m2).float())


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 5), cols=st.integers(1, 9), seed=st.integers(0, 10_000),
       symmetric=st.booleans())
def test_quantization_is_idempotent_and_bounded(bits, rows, cols, seed, symmetric):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="token")
    y = fake_quantize(x, spec)
    assert torch.allclose(fake_quantize(y, spec), y, atol=1e-12)
    if symmetric:  # the grid ends at the absmax
        assert torch.all(y.abs().amax(-1) <= x.abs().amax(-1) + 1e-12)
    else:  # the grid spans [min(x, 0), max(x, 0)], its ends moved by at most half a step by the rounded zero
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        half = (hi - lo) / (2**bits - 1) / 2
        assert torch.all(y.amin(-1) >= lo - half - 1e-12) and torch.all(y.amax(-1) <= hi + half + 1e-12)


def test_zero_tensor_stays_zero():
    for spec in (QuantSpec(), QuantSpec(symmetric=False), QuantSpec(format="fp8_e4m3")):
        assert torch.equal(fake_quantize(torch.zeros(3, 4), spec), torch.zeros(3, 4))
