import math

import torch

from spikequant.quant import ActivationQuantizer, QuantSpec, fake_quantize


def test_static_absmax_scale_is_max_over_batches():
    q = ActivationQuantizer(QuantSpec(bits=8, dynamic=False))
    q.observing = True
    batches = [torch.randn(4, 8) * s for s in (1.0, 5.0, 2.0)]
    for b in batches:
        q(b)
    q.observing = False
    q.finalize()
    amax = max(float(b.abs().max()) for b in batches)
    assert math.isclose(float(q.scale), amax / 127, rel_tol=1e-6)
    x = torch.randn(3, 8)
    # with the scale fixed, a tensor with the same range quantizes as the dynamic quantizer would
    y = x / x.abs().max() * amax
    assert torch.allclose(q(y), fake_quantize(y, QuantSpec(bits=8)), atol=1e-6)


def test_static_percentile_and_asymmetric_channel():
    q = ActivationQuantizer(QuantSpec(bits=8, dynamic=False, observer="percentile", percentile=50.0))
    q.observing = True
    x = torch.arange(1, 101, dtype=torch.float32)
    q(x)
    q.observing = False
    q.finalize()
    assert math.isclose(float(q.scale), 50.0 / 127, rel_tol=1e-6)

    qa = ActivationQuantizer(QuantSpec(bits=8, dynamic=False, symmetric=False, granularity="channel"))
    qa.observing = True
    qa(torch.tensor([[0.0, -2.0], [1.0, 4.0]]))
    qa(torch.tensor([[3.0, -1.0], [0.5, 0.0]]))
    qa.observing = False
    qa.finalize()
    assert torch.allclose(qa.scale.flatten(), torch.tensor([3.0 / 255, 6.0 / 255]))
    assert torch.allclose(qa.zero.flatten(), torch.tensor([0.0, round(2.0 / (6.0 / 255))]))


def test_keep_first_tokens_passes_them_through_and_ignores_them_for_the_scale():
    spec = QuantSpec(bits=4, granularity="tensor", keep_first_tokens=1)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    x[:, 0, 3] = 1000.0  # a sink-token spike
    y = ActivationQuantizer(spec)(x)
    assert torch.equal(y[:, :1], x[:, :1])
    assert torch.equal(y[:, 1:], fake_quantize(x[:, 1:], QuantSpec(bits=4, granularity="tensor")))
    static = ActivationQuantizer(QuantSpec(bits=4, dynamic=False, keep_first_tokens=1))
    static.observing = True
    static(x)
    static.observing = False
    static.finalize()
    assert math.isclose(float(static.scale), float(x[:, 1:].abs().max()) / 7, rel_tol=1e-6)
