import random

import pytest
import torch

from spikequant.algorithms.base import QuantContext
from spikequant.algorithms.spike_exempt import RandomExempt, SpikeExempt
from spikequant.analysis import SpikeRule, collect_stats
from spikequant.models import decoder_linears
from spikequant.models.tiny import tiny_model

SPIKE = "model.layers.1.mlp.down_proj"


def _spiky_model():
    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():  # up_proj row 7 of layer 1 amplified: a spike on down_proj's input channel 7
        model.get_submodule("model.layers.1.mlp.up_proj").weight[7] *= 1e5
    return model


def test_stats_match_plain_hooks():
    model = _spiky_model()
    windows = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    stats = {s.name: s for s in collect_stats(model, windows, progress=False)}
    ref_in: dict[str, float] = {}
    ref_out: dict[str, float] = {}
    for name, lin in decoder_linears(model).items():
        def hook(m, a, o, name=name):
            ref_in[name] = max(ref_in.get(name, 0.0), float(a[0].abs().max()))
            ref_out[name] = max(ref_out.get(name, 0.0), float(o.abs().max()))
        lin.register_forward_hook(hook)
    with torch.no_grad():
        for w in windows:
            model(w[None])
    assert set(stats) == set(ref_in)
    for n, s in stats.items():
        assert s.max_in == pytest.approx(ref_in[n], rel=1e-6)
        assert s.max_out == pytest.approx(ref_out[n], rel=1e-6)
        assert s.pct_in <= s.max_in
    assert stats[SPIKE].channel == 7


def test_rule_detects_the_injected_spike_only():
    model = _spiky_model()
    windows = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, windows, progress=False)
    assert SpikeRule(k=20).detect(stats) == [SPIKE]
    assert SpikeRule(k=1e9, abs_threshold=1e-9).detect(stats)[0] == SPIKE  # absolute threshold alone


def _ctx(model, seed=0):
    windows = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    return QuantContext(model=model, calibration_windows=lambda: windows, seed=seed, progress=False)


def test_spike_exempt_and_random_exempt():
    model = _spiky_model()
    ctx = _ctx(model)
    SpikeExempt(k=20).apply(ctx)
    assert ctx.findings["spike_layers"] == [SPIKE]
    assert ctx.overrides == [([SPIKE], {"weights": None, "inputs": None, "outputs": None})]
    picks = []
    for seed in (0, 0, 1):
        ctx = _ctx(model, seed)
        RandomExempt(k=20).apply(ctx)
        picks.append(ctx.findings["random_layers"])
        assert SPIKE not in picks[-1] and len(picks[-1]) == 1
    assert picks[0] == picks[1]
    pool = sorted(set(decoder_linears(model)) - {SPIKE})
    assert picks[2] == sorted(random.Random(1).sample(pool, 1))
