import torch

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


def test_static_recipe_calibrates_every_quantizer():
    model = tiny_model("mistral")
    calib = torch.randint(0, 96, (3, 16))
    qm, _ = quantize(model, load_recipe("w8a8-tensor-static"), calib, progress=False)
    assert len(qm.inputs) == 14
    assert all(q.scale is not None and q.scale.numel() == 1 for q in qm.inputs.values())
    assert qm.high_precision_share() == 0.0 and qm.effective_weight_bits() == 8.0
