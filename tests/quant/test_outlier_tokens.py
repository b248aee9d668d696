"""``outlier_tokens``: the k largest tokens get scales of their own; the rest share one per-tensor scale."""

import pytest
import torch

from spikequant.errors import RecipeError
from spikequant.quant import QuantSpec, fake_quantize
from spikequant.quant.observers import ActivationQuantizer


def _spiky() -> torch.Tensor:
    x = torch.randn(2, 12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, 5, 2] = 800.0  # two spike tokens, one per sequence, not at position 0
    x[1, 0, 1] = -300.0
    return x


def test_dynamic_outlier_tokens_match_a_plain_split():
    x = _spiky()
    y = ActivationQuantizer(QuantSpec(bits=4, outlier_tokens=1))(x)
    bulk = x.clone()
    bulk[0, 5] = 0
    bulk[1, 0] = 0
    scale = bulk.abs().max() / 7
    ref = torch.clamp(torch.round(x / scale), -8, 7) * scale
    ref[0, 5] = fake_quantize(x[0, 5], QuantSpec(bits=4))
    ref[1, 0] = fake_quantize(x[1, 0], QuantSpec(bits=4))
    assert torch.equal(y, ref)
    # the spikes no longer cost everyone else their resolution
    plain = fake_quantize(x, QuantSpec(bits=4))
    assert (y - x)[0, :5].abs().max() < (plain - x)[0, :5].abs().max() / 10


def test_static_calibration_leaves_outlier_tokens_out():
    x = _spiky()
    q = ActivationQuantizer(QuantSpec(bits=8, dynamic=False, outlier_tokens=1))
    q.observing = True
    q(x)
    q.observing = False
    q.finalize()
    bulk = x.clone()
    bulk[0, 5] = 0
    bulk[1, 0] = 0
    assert float(q.scale) == pytest.approx(float(bulk.abs().max()) / 127)
    y = q(x)
    assert torch.equal(y[0, 5], fake_quantize(x[0, 5], QuantSpec(bits=8)))


def test_outlier_tokens_validation():
    with pytest.raises(RecipeError, match="outlier_tokens"):
        QuantSpec(granularity="token", outlier_tokens=1)
    with pytest.raises(RecipeError, match="outlier_tokens"):
        QuantSpec(outlier_tokens=-1)
    assert QuantSpec.from_dict({"bits": 8, "outlier_tokens": 4}).outlier_tokens == 4
