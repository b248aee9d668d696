import re

import pytest
import torch

from spikequant.errors import RecipeError
from spikequant.models import decoder_linears
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import build_plan, quantize
from spikequant.quant import ModuleQuant, QuantSpec, fake_quantize, matches, resolve_plan
from spikequant.recipes import load_recipe


def test_patterns():
    assert matches("re:.*layers\\.1\\.mlp\\.down_proj", "model.layers.1.mlp.down_proj")
    assert not matches("re:.*layers\\.1\\.mlp\\.down_proj", "model.layers.11.mlp.down_proj")
    assert matches("lm_head", "lm_head") and not matches("lm_head", "model.lm_head")


def test_overrides_apply_in_order():
    w8 = QuantSpec(bits=8, granularity="channel")
    a8 = QuantSpec(bits=8)
    plan = resolve_plan(
        ["a.q", "a.down", "b.down"], ["re:.*"], ModuleQuant(w8, a8),
        [(["re:.*down"], {"inputs": None}), (["b.down"], {"weights": None})],
    )
    assert plan["a.q"] == ModuleQuant(w8, a8)
    assert plan["a.down"] == ModuleQuant(w8, None)
    assert plan["b.down"].is_float


def test_plan_targets_decoder_linears_only(arch):
    model = tiny_model(arch)
    plan = build_plan(model, load_recipe("w8a8-tensor"))
    assert set(plan) == set(decoder_linears(model))
    assert "lm_head" not in plan


def test_hooks_quantize_inputs_and_weights():
    model = tiny_model("llama", dtype=torch.float64)
    name = "model.layers.0.mlp.down_proj"
    linear = model.get_submodule(name)
    w = linear.weight.detach().clone()
    seen = {}
    linear.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0].clone()))
    recipe = load_recipe("w8a8-tensor")
    qm, _ = quantize(model, recipe)
    # hooks run in registration order: our recorder saw the raw input, the quantizer then changed it
    captured = {}
    linear.register_forward_hook(lambda m, a, o: captured.__setitem__("in", a[0].clone()))
    model(torch.randint(0, 96, (1, 12)))
    assert torch.equal(linear.weight, fake_quantize(w, recipe.weights, "weight"))
    assert torch.allclose(captured["in"], fake_quantize(seen["raw"], recipe.inputs))
    assert not torch.equal(captured["in"], seen["raw"])
    qm.remove_hooks()
    model(torch.randint(0, 96, (1, 12)))
    assert torch.equal(captured["in"], seen["raw"])


def test_fp_recipe_leaves_logits_unchanged():
    model = tiny_model("qwen2", dtype=torch.float64)
    ids = torch.randint(0, 96, (1, 10))
    before = model(ids).logits
    quantize(model, load_recipe("fp"))
    assert torch.equal(model(ids).logits, before)


def _rtn_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain per-row symmetric round-to-nearest, written out here as the reference."""
    qmax = 2 ** (bits - 1) - 1
    s = w.abs().amax(1, keepdim=True) / qmax
    return (w / s).round().clamp(-qmax - 1, qmax) * s


def test_static_scale_is_calibration_absmax_over_qmax():
    """Each static per-tensor scale equals max|x| / 127 over the calibration windows, where x is the
    linear's input in the model whose weights are already RTN-quantized (activations float), as a plain
    reference computes it; and the quantized inputs then lie on that grid."""
    model = tiny_model("mistral")
    ref = tiny_model("mistral")
    calib = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(4))
    qm, _ = quantize(model, load_recipe("w8a8-tensor-static"), calib, progress=False)
    names = list(decoder_linears(ref))
    assert sorted(qm.inputs) == sorted(names)
    absmax = dict.fromkeys(names, 0.0)
    with torch.no_grad():
        for n in names:
            lin = ref.get_submodule(n)
            lin.weight.copy_(_rtn_rows(lin.weight, 8))
            lin.register_forward_pre_hook(
                lambda m, a, n=n: absmax.__setitem__(n, max(absmax[n], float(a[0].abs().max()))))
        for w in calib:
            ref(w[None], use_cache=False)
    for n in names:
        assert float(qm.inputs[n].scale) == pytest.approx(absmax[n] / 127, rel=1e-5), n
    seen = {}
    name = "model.layers.1.mlp.down_proj"
    model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(5)))
    k = seen["x"] / qm.inputs[name].scale
    assert torch.allclose(k, k.round(), atol=1e-3) and k.abs().max() <= 128
    assert qm.high_precision_share() == 0.0 and qm.effective_weight_bits() == 8.0


@pytest.mark.parametrize("recipe,needle", [
    ({"weights": {"bits": 4, "granularity": "group", "group_size": 32}},
     "model.layers.0.self_attn.q_proj.weights: group_size 32 does not divide its width 48"),
    ({"inputs": {"bits": 8, "granularity": "group", "group_size": 7}},
     "model.layers.0.self_attn.q_proj.inputs: group_size 7 does not divide its width 48"),
    # 48 (q/k/v/o, gate/up inputs) divides by 24, down_proj's 80-wide input does not
    ({"weights": {"bits": 4, "granularity": "group", "group_size": 24}},
     "model.layers.0.mlp.down_proj.weights: group_size 24 does not divide its width 80"),
    ({"outputs": {"bits": 8, "granularity": "group", "group_size": 16}},
     "model.layers.0.self_attn.k_proj.outputs: group_size 16 does not divide its width 24"),
    ({"weights": {"bits": 4, "granularity": "group", "group_size": 32}, "modifiers": [{"type": "gptq"}]},
     "model.layers.0.self_attn.q_proj.weights: group_size 32 does not divide its width 48"),
], ids=["weights", "inputs", "down-proj-width", "outputs", "gptq"])
def test_group_size_that_does_not_divide_a_layer_fails_at_plan_time(recipe, needle):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=re.escape(needle)):
        quantize(model, load_recipe({"name": "g", **recipe}), torch.randint(0, 96, (2, 8)), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing ran


def test_an_override_can_fix_the_module_a_group_size_does_not_fit():
    model = tiny_model("llama")
    recipe = load_recipe({"name": "g", "weights": {"bits": 4, "granularity": "group", "group_size": 24},
                          "overrides": [{"match": "re:.*down_proj", "weights": {"bits": 4, "granularity": "channel"}}]})
    qm, _ = quantize(model, recipe, progress=False)
    assert qm.plan["model.layers.1.mlp.down_proj"].weights.granularity == "channel"
