import pytest
import torch

from spikequant.errors import RecipeError
from spikequant.quant import QuantSpec
from spikequant.quant.kv import KVQuantizer


def _reference(states, bits, symmetric, group, clip=1.0):
    """Plain loops: one scale per (batch, token, group of ``group`` values across heads·head_dim)."""
    b, h, t, d = states.shape
    out = torch.empty_like(states)
    for bi in range(b):
        for ti in range(t):
            flat = states[bi, :, ti, :].reshape(-1)
            res = torch.empty_like(flat)
            for g0 in range(0, flat.numel(), group):
                x = flat[g0:g0 + group]
                if symmetric:
                    qmax = 2 ** (bits - 1) - 1
                    s = x.abs().max() * clip / qmax
                    s = s if s > 0 else torch.ones_like(s)
                    res[g0:g0 + group] = torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s
                else:
                    lo, hi = min(x.min(), 0) * clip, max(x.max(), 0) * clip
                    s = (hi - lo) / (2**bits - 1)
                    s = s if s > 0 else torch.ones_like(s)
                    z = torch.round(-lo / s)
                    res[g0:g0 + group] = (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z) * s
            out[bi, :, ti, :] = res.view(h, d)
    return out


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per", ["head", "token"])
@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_kv_quantizer_matches_plain_reference(symmetric, per, clip):
    states = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    states[0, 1, 2, 3] = 20.0
    if per == "head":
        spec = QuantSpec(bits=4, symmetric=symmetric, granularity="group", group_size=8, clip_ratio=clip)
        group = 8
    else:
        spec = QuantSpec(bits=4, symmetric=symmetric, granularity="token", clip_ratio=clip)
        group = 3 * 8
    got = KVQuantizer(spec)(states)
    assert torch.allclose(got, _reference(states, 4, symmetric, group, clip), atol=1e-12)


def test_kv_quantizer_is_per_token_and_head():
    states = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    q = KVQuantizer(QuantSpec(bits=4, symmetric=False, granularity="group", group_size=8))
    base = q(states)
    loud = states.clone()
    loud[0, 0, 1] *= 100  # a spike in one (token, head) leaves the other slices' scales alone
    out = q(loud)
    mask = torch.ones_like(states, dtype=torch.bool)
    mask[0, 0, 1] = False
    assert torch.equal(out[mask], base[mask])


@pytest.mark.parametrize("spec,needle", [
    (QuantSpec(bits=4, granularity="tensor"), "granularity"),
    (QuantSpec(bits=4, granularity="token", dynamic=False), "dynamic"),
    (QuantSpec(format="fp8_e4m3", granularity="token"), "int"),
])
def test_kv_spec_errors(spec, needle):
    with pytest.raises(RecipeError, match=needle):
        KVQuantizer(spec)
