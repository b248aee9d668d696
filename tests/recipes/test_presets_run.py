"""Every preset in recipes/presets/ runs once on a tiny float64 model, with value checks that mean something
for it: the quantized weights and activations lie on the preset's grid, the layers it keeps in float hold
exactly the weights of the transform-only model (whose logits equal FP's), the spike rule picks the planted
spike, and the logits move away from FP by a bounded amount. New preset files are picked up automatically.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spikequant.models import decoder_linears
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.quant import QuantSpec
from spikequant.recipes import load_recipe
from spikequant.recipes.schema import PRESET_DIR
from spikequant.transforms import use_precise_norms

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
# Modifiers that change the float model (exactly, in FP); everything else quantizes or only plans.
TRANSFORMS = ("rotate", "smoothquant")
DETECTING = ("spike_exempt", "random_exempt")
SPIKE = "model.layers.1.mlp.down_proj"  # planted in the models of presets that detect spikes
CALIB = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(11))
IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(12))


def _model(spike: bool) -> torch.nn.Module:
    """Float64 norms (HF's round through float32, which would hide a 1e-9 check). With ``spike``, channel 7
    of the last down_proj's input is 1e5 times louder (up_proj row x 1e5, down_proj column / 1e5: the
    function is unchanged), a spike layer for the rule."""
    model = use_precise_norms(tiny_model("llama", seed=3, dtype=torch.float64))
    if spike:
        with torch.no_grad():
            model.get_submodule(SPIKE.replace("down_proj", "up_proj")).weight[7] *= 1e5
            model.get_submodule(SPIKE).weight[:, 7] /= 1e5
    return model


def _fp8_representable(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(t.to(dtype).to(t.dtype), t)


def _on_grid(v: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None) -> None:
    """``v`` (..., features) is one scale group's worth of quantized values in ``spec`` (symmetric
    formats); ``scale`` is the static scale, or None to read the dynamic one off ``v`` (its largest
    magnitude sits on the grid's end: +qmax, or -(qmax + 1) when a clip ratio below 1 clamps a negative
    value there)."""
    if spec.format == "fp8_e5m2":
        assert _fp8_representable(v, torch.float8_e5m2)
        return
    top = 448.0 if spec.format == "fp8_e4m3" else 2 ** (spec.bits - 1) - 1
    s = v.abs().amax(-1, keepdim=True) / top if scale is None else scale.to(v.dtype)
    s = torch.where(s > 0, s, torch.ones_like(s))
    k = v / s
    if spec.format == "fp8_e4m3":
        assert torch.allclose(k.to(torch.float8_e4m3fn).to(k.dtype), k, rtol=1e-9, atol=0)
        return
    on = torch.isclose(k, k.round(), atol=1e-6, rtol=0).all(-1, keepdim=True)
    if scale is None:  # rows whose end is -(qmax + 1): read the scale as max / (qmax + 1)
        k2 = v / torch.where(s > 0, v.abs().amax(-1, keepdim=True) / (top + 1), torch.ones_like(s))
        on = on | torch.isclose(k2, k2.round(), atol=1e-6, rtol=0).all(-1, keepdim=True)
    assert bool(on.all()) and k.abs().max() <= top + 1 + 1e-6


def _check_activation(x: torch.Tensor, spec: QuantSpec, static_scale: torch.Tensor | None) -> None:
    """The input a linear received, (batch, tokens, features), lies on the grid of its input spec."""
    assert spec.symmetric, "the presets quantize activations symmetrically; add an asymmetric check here"
    x = x[:, spec.keep_first_tokens:]  # passed through as they are
    if spec.outlier_tokens:
        # each sequence's k loudest tokens have their own per-token scale; the rest share one
        loud = x.abs().amax(-1).topk(spec.outlier_tokens, dim=-1).indices
        mask = torch.zeros(x.shape[:2], dtype=torch.bool).scatter_(1, loud, True)
        _on_grid(x[mask], spec, None)
        x = x.masked_fill(mask[..., None], 0.0)
    if spec.granularity == "token":
        _on_grid(x.reshape(-1, x.shape[-1]), spec, None)
    elif spec.granularity == "tensor":  # dynamic: one scale per call, i.e. over the whole batch here
        _on_grid(x.reshape(1, -1), spec, None if spec.dynamic else static_scale)
    else:
        raise AssertionError(f"no grid check written for activation granularity {spec.granularity}")


def _bits(spec: QuantSpec) -> int:
    """Bits of an int format; FP8 counts as 6 (e4m3's 3 mantissa bits are a relative step of 1/8 near
    every value, coarser than int8 on values near the top of a per-tensor range)."""
    return spec.bits if spec.format == "int" else 6


def _transform_only(data: dict) -> dict:
    return {"name": data["name"] + "-transforms", "seed": data.get("seed", 0),
            "modifiers": [m for m in data.get("modifiers", []) if m["type"] in TRANSFORMS]}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_on_a_tiny_model_with_value_checks(preset):
    recipe = load_recipe(preset)
    fp_model = _model(spike=any(m.type in DETECTING for m in recipe.modifiers))
    with torch.no_grad():
        fp = fp_model(IDS).logits
    # The transform-only model: the preset's rotations / SmoothQuant folding and nothing else.
    ref = copy.deepcopy(fp_model)
    quantize(ref, load_recipe(_transform_only(recipe.to_dict())), CALIB, progress=False)
    with torch.no_grad():
        assert (ref(IDS).logits - fp).abs().max() <= 1e-9  # exact in FP
    model = copy.deepcopy(fp_model)
    qm, findings = quantize(model, recipe, CALIB, progress=False)

    # Activations: capture what every planned linear receives (after its quantizer) on a forward.
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
               for n in qm.plan]
    with torch.no_grad():
        logits = model(IDS).logits
    for h in handles:
        h.remove()

    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in sorted(linears):
        mq = qm.plan.get(name)
        w = model.get_submodule(name).weight.detach()
        if mq is None or mq.weights is None:
            # kept in float: exactly the transform-only model's weight
            assert torch.equal(w, ref.get_submodule(name).weight), name
        elif mq.weights.format == "int":
            p = qm.weight_qparams[name]
            wv = w.unflatten(-1, (-1, mq.weights.group_size)) if mq.weights.granularity == "group" else w
            zero = p.get("zero", torch.zeros(())).to(w.dtype)
            grid = wv / p["scale"].to(w.dtype) + zero
            assert torch.allclose(grid, grid.round(), atol=1e-4), name
            q = 2 ** (mq.weights.bits - 1)
            lo, hi = (-q, q - 1) if mq.weights.symmetric else (0, 2 * q - 1)
            assert lo <= grid.round().min() and grid.round().max() <= hi, name
            assert not torch.equal(w, ref.get_submodule(name).weight), name  # it was quantized
        else:
            # FP8 weights (exempt layers at fp8 precision): per-tensor scale for e4m3, a plain cast for e5m2
            assert mq.weights.granularity == "tensor", name
            _on_grid(w.reshape(1, -1), mq.weights, None)
        if mq is not None and mq.inputs is not None:
            _check_activation(seen[name], mq.inputs, getattr(qm.inputs.get(name), "scale", None))

    # Which layers stay in float, and why.
    float_layers = sorted(n for n, m in qm.plan.items() if m.weights is None)
    if "spike_layers" in findings:
        assert findings["spike_layers"] == [SPIKE]
        assert (qm.plan[SPIKE].weights is None) == (findings["spike_detection"]["precision"] == "float")
        assert qm.plan[SPIKE].inputs is None or qm.plan[SPIKE].inputs.format.startswith("fp8")
    elif "random_layers" in findings:
        assert findings["excluded_spike_layers"] == [SPIKE] and SPIKE not in findings["random_layers"]
        assert float_layers == findings["random_layers"] and len(float_layers) == 1
    else:
        assert float_layers == ([] if recipe.weights is not None else sorted(decoder_linears(model)))

    # Logits: equal to FP for fp; otherwise moved, by less than 8 quantization steps of the coarsest
    # format in the plan (relative to the logits' norm; measured 1.8-4x of a step on every preset), except
    # where the spike layer is quantized on purpose (random-exempt: it must break that bound).
    err = float((logits - fp).norm() / fp.norm())
    if recipe.is_float:
        assert err == 0.0
        return
    bits = min(_bits(s) for m in qm.plan.values() for s in (m.weights, m.inputs, m.outputs) if s is not None)
    if "random_layers" in findings:
        assert err > 2.0 ** (3 - bits), err
    else:
        assert 0.0 < err < 2.0 ** (3 - bits), err
