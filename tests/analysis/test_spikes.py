import math
import random

import pytest
import torch

from spikequant.algorithms.base import QuantContext
from spikequant.algorithms.spike_exempt import RandomExempt, SpikeExempt
from spikequant.analysis import SpikeRule, collect_stats
from spikequant.errors import SpikequantError
from spikequant.models import decoder_linears, linear_role
from spikequant.models.tiny import tiny_model

SPIKE = "model.layers.1.mlp.down_proj"


def _spiky_model(arch: str = "llama"):
    model = tiny_model(arch, num_hidden_layers=3)
    with torch.no_grad():  # up_proj row 7 of layer 1 amplified: a spike on down_proj's input channel 7
        model.get_submodule("model.layers.1.mlp.up_proj").weight[7] *= 1e5
    return model


def _windows(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def test_stats_match_plain_hooks():
    model = _spiky_model()
    windows = _windows(3, 10, 0)
    stats = {s.name: s for s in collect_stats(model, windows, percentile=90.0, progress=False, top_tokens=4)}
    ref: dict[str, dict] = {}
    handles = []
    for name, lin in decoder_linears(model).items():
        def hook(m, a, o, name=name):
            x = a[0][0].abs()  # (tokens, features) of one window
            r = ref.setdefault(name, {"in": [], "out": 0.0, "pct": [], "tok": []})
            r["in"].append(x)
            r["out"] = max(r["out"], float(o.abs().max()))
            flat = x.flatten().sort().values
            r["pct"].append(float(flat[math.ceil(0.9 * flat.numel()) - 1]))
            r["tok"].append(x.amax(-1))
        handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in handles:
        h.remove()
    assert set(stats) == set(ref)
    for n, s in stats.items():
        r = ref[n]
        x = torch.stack(r["in"])  # (windows, tokens, features)
        assert s.max_in == pytest.approx(float(x.max()), rel=1e-6)
        assert s.max_out == pytest.approx(r["out"], rel=1e-6)
        assert s.max_in_rest == pytest.approx(float(x[:, 1:].max()), rel=1e-6)
        assert s.pct_in == pytest.approx(sum(r["pct"]) / len(r["pct"]), rel=1e-6)
        w, p, c = (int(i) for i in torch.unravel_index(x.argmax(), x.shape))
        assert (s.window, s.position, s.channel) == (w, p, c)
        assert s.token_id == int(windows[w, p])
        assert (s.layer, s.role) == linear_role(model, n)
        tok = torch.stack(r["tok"])  # (windows, tokens)
        top = tok.flatten().topk(4).values
        assert [h.value for h in s.top_tokens] == pytest.approx(top.tolist(), rel=1e-6)
        h = s.top_tokens[0]
        assert float(tok[h.window, h.position]) == pytest.approx(h.value, rel=1e-6)
    assert stats[SPIKE].channel == 7


def test_rule_detects_the_injected_spike_only(arch):
    model = _spiky_model(arch)
    stats = collect_stats(model, _windows(2, 10, 1), progress=False)
    assert SpikeRule(k=20).detect(stats) == [SPIKE]
    assert SpikeRule(k=None, abs_threshold=1e-9).detect(stats)[0] == SPIKE  # absolute threshold alone
    assert len(SpikeRule(k=None, abs_threshold=1e-9).detect(stats)) == len(stats)
    assert SpikeRule(k=20, max_layers=0).detect(stats) == []
    assert SpikeRule(k=1e12).detect(stats) == []


def test_rule_on_a_clean_model_finds_nothing():
    stats = collect_stats(tiny_model("llama", num_hidden_layers=3), _windows(2, 10, 1), progress=False)
    assert SpikeRule(k=50).detect(stats) == []


@pytest.mark.parametrize("kwargs", [{"k": None}, {"k": 0}, {"k": 5, "abs_threshold": -1}, {"max_layers": -1}])
def test_rule_rejects_bad_parameters(kwargs):
    with pytest.raises(SpikequantError):
        SpikeRule(**kwargs)


def _ctx(model, seed=0):
    windows = _windows(2, 10, 2)
    return QuantContext(model=model, calibration_windows=lambda: windows, seed=seed, progress=False)


def test_spike_exempt_precisions():
    model = _spiky_model()
    ctx = _ctx(model)
    SpikeExempt(k=20).apply(ctx)
    assert ctx.findings["spike_layers"] == [SPIKE]
    assert ctx.overrides == [([SPIKE], {"weights": None, "inputs": None, "outputs": None})]
    ctx = _ctx(model)
    SpikeExempt(k=20, precision="fp8_e4m3").apply(ctx)
    slots = ctx.overrides[0][1]
    assert slots["weights"].format == slots["inputs"].format == "fp8_e4m3"
    assert slots["weights"].granularity == slots["inputs"].granularity == "tensor"
    ctx = _ctx(model)
    SpikeExempt(k=20, precision="fp8_e5m2").apply(ctx)
    assert ctx.overrides[0][1]["inputs"].is_float_cast


def test_random_exempt_never_picks_detected_and_is_seeded():
    model = tiny_model("llama", num_hidden_layers=6)
    spikes = ["model.layers.1.mlp.down_proj", "model.layers.4.mlp.down_proj", "model.layers.2.self_attn.o_proj"]
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.up_proj").weight[7] *= 1e5
        model.get_submodule("model.layers.4.mlp.up_proj").weight[3] *= 1e5
        model.get_submodule("model.layers.2.self_attn.v_proj").weight[2] *= 1e6
    ctx = _ctx(model)
    SpikeExempt(k=20).apply(ctx)
    assert sorted(ctx.findings["spike_layers"]) == sorted(spikes)
    picks = {}
    for seed in range(6):
        ctx = _ctx(model, seed)
        RandomExempt(k=20).apply(ctx)
        chosen = ctx.findings["random_layers"]
        assert not set(chosen) & set(spikes)
        # same projection types as the detected ones, so the kept parameter count matches
        assert sorted(linear_role(model, n)[1] for n in chosen) == ["down_proj", "down_proj", "o_proj"]
        assert ctx.overrides == [(chosen, {"weights": None, "inputs": None, "outputs": None})]
        picks[seed] = chosen
    assert len({tuple(p) for p in picks.values()}) > 1  # the seed matters
    again = _ctx(model, 3)
    RandomExempt(k=20).apply(again)
    assert again.findings["random_layers"] == picks[3]
    anywhere = _ctx(model, 5)
    RandomExempt(k=20, same_roles=False).apply(anywhere)
    pool = sorted(set(decoder_linears(model)) - set(spikes))
    assert anywhere.findings["random_layers"] == sorted(random.Random(5).sample(pool, 3))
