import pytest
import torch

from spikequant.algorithms.gptq import gptq_model, gptq_quantize, weight_qparams
from spikequant.models import decoder_linears
from spikequant.models.tiny import tiny_model
from spikequant.quant import QuantSpec, fake_quantize
from spikequant.quant.fake import int_qdq


def _data(rows=32, cols=64, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # correlated inputs with a few loud channels: where GPTQ's error feedback pays off
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, :3] *= 8
    return w, x


def _out_err(w, q, x):
    return float(((x @ w.T - x @ q.T) ** 2).mean())


SPECS = [
    QuantSpec(bits=4, granularity="channel"),
    QuantSpec(bits=3, symmetric=False, granularity="channel"),
    QuantSpec(bits=4, granularity="group", group_size=16),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(spec, act_order):
    w, x = _data()
    h = 2 * x.T @ x / len(x)
    res = gptq_quantize(w, h, spec, act_order=act_order)
    rtn = fake_quantize(w, spec, "weight")
    assert _out_err(w, res.weight, x) < 0.7 * _out_err(w, rtn, x)
    # every value lies on its row's (group's) grid
    wv = res.weight.unflatten(-1, (-1, spec.group_size)) if spec.granularity == "group" else res.weight
    unit = QuantSpec(bits=spec.bits, symmetric=spec.symmetric)
    assert torch.allclose(int_qdq(wv, unit, res.scale, res.zero), wv, atol=1e-6)


def test_identity_hessian_without_error_feedback_is_rtn():
    w, _ = _data()
    spec = QuantSpec(bits=4, granularity="channel")
    res = gptq_quantize(w, torch.eye(w.shape[1]) * 1e-12, spec, damp=1.0, act_order=False)
    # H ∝ I: H⁻¹ is diagonal, so there is no error to spread and GPTQ reduces to RTN
    assert torch.allclose(res.weight, fake_quantize(w, spec, "weight"), atol=1e-6)


def test_mse_clip_never_worse_than_no_clip():
    w, _ = _data()
    spec = QuantSpec(bits=3, granularity="channel")
    unit = QuantSpec(bits=3)

    def err(params):
        return (int_qdq(w, unit, *params) - w).abs().pow(2.4).sum(-1)

    clip, plain = err(weight_qparams(w, spec, mse_clip=True)), err(weight_qparams(w, spec))
    assert torch.all(clip <= plain + 1e-6) and clip.sum() < 0.9 * plain.sum()  # p = 1 is on the grid


def test_gptq_model_quantizes_every_planned_linear_and_lowers_output_error():
    model = tiny_model("qwen2", seed=1)
    ref = tiny_model("qwen2", seed=1)
    rtn = tiny_model("qwen2", seed=1)
    spec = QuantSpec(bits=3, granularity="channel")
    names = list(decoder_linears(model))
    windows = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    res = gptq_model(model, windows, dict.fromkeys(names, spec), batch_size=4, progress=False)
    assert set(res) == set(names)
    for n, lin in decoder_linears(rtn).items():
        lin.weight.data = fake_quantize(lin.weight.data, spec, "weight")
        assert not torch.equal(model.get_submodule(n).weight, ref.get_submodule(n).weight)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    with torch.no_grad():
        target = ref(windows).logits
        assert ((model(windows).logits - target) ** 2).mean() < ((rtn(windows).logits - target) ** 2).mean()


def test_a_hessian_that_cannot_be_factorized_is_a_one_line_recipe_error():
    from spikequant.errors import RecipeError

    w, _ = _data()
    with pytest.raises(RecipeError, match="not positive definite with damp=0.0; raise damp"):
        gptq_quantize(w, -torch.eye(w.shape[1]), QuantSpec(bits=4, granularity="channel"), damp=0.0)


@pytest.mark.parametrize("key,value", [("num_samples", 0), ("num_samples", -4), ("num_samples", 2.5),
                                       ("block_size", 0), ("batch_size", -1)])
def test_bad_gptq_parameters_are_one_line_recipe_errors(key, value):
    """Before: num_samples 0 or -4 (with 4 windows) left no window and ended in an AssertionError
    traceback mid-run; a negative value silently dropped windows from the end."""
    from spikequant.errors import RecipeError
    from spikequant.recipes import load_recipe

    with pytest.raises(RecipeError, match=rf"modifiers\[0\] \(gptq\): {key} must be a positive integer, got {value}$"):
        load_recipe({"name": "x", "weights": {"bits": 4, "granularity": "channel"},
                     "modifiers": [{"type": "gptq", key: value}]})


@pytest.mark.parametrize("weights", [
    {"bits": 4, "granularity": "channel"},
    {"bits": 3, "symmetric": False, "granularity": "channel"},
    {"bits": 4, "granularity": "group", "group_size": 16},
    {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 16},
], ids=["w4-channel", "w3-asym-channel", "w4-g16", "w4-asym-g16"])
def test_recorded_scale_and_zero_dequantize_the_integer_grid_to_the_weights(weights):
    """What the pipeline records (and export saves) for a GPTQ weight: W / scale (+ zero) is an integer
    in the format's range, and (that integer - zero) * scale gives back the model's weight bit for bit."""
    from spikequant.pipeline import quantize
    from spikequant.recipes import load_recipe

    model = tiny_model("qwen2", seed=1)
    windows = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    recipe = load_recipe({"name": "g", "weights": weights, "modifiers": [{"type": "gptq", "num_samples": 4}]})
    qm, findings = quantize(model, recipe, windows, progress=False)
    assert findings["gptq"]["linears"] == 14 and set(qm.weight_qparams) == set(qm.plan)
    bits, sym = weights["bits"], weights.get("symmetric", True)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    for name, p in qm.weight_qparams.items():
        w = model.get_submodule(name).weight.detach()
        wv = w.unflatten(-1, (-1, 16)) if "group_size" in weights else w
        scale, zero = p["scale"], p.get("zero", torch.zeros(()))
        assert ("zero" in p) == (not sym)
        assert scale.shape == wv.shape[:-1] + (1,)
        grid = wv / scale + zero
        ints = grid.round()
        assert (grid - ints).abs().max() < 1e-3, name
        assert lo <= ints.min() and ints.max() <= hi, name
        assert (ints.amax(-1) > ints.amin(-1)).all()  # not a degenerate all-equal grid
        deq = (ints - zero) * scale
        assert torch.equal(deq.flatten(-2) if "group_size" in weights else deq, w), name
