import torch

from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe

SPIKE = "model.layers.1.mlp.down_proj"


def _spiky_model():
    model = tiny_model("llama", num_hidden_layers=3, dtype=torch.float32)
    with torch.no_grad():  # a spike on down_proj's input channel 7 in layer 1
        model.get_submodule("model.layers.1.mlp.up_proj").weight[7] *= 1e5
    return model


def test_e5m2_preset_keeps_int8_channel_weights_and_casts_inputs():
    """Paper A's code (W8A8Linear.from_float with spike='FP8'): the exempt layer's weight is int8 per
    output channel like every other layer, only its input is cast to E5M2 with no scale."""
    model = _spiky_model()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    w_float = model.get_submodule(SPIKE).weight.detach().clone()
    seen = {}
    model.get_submodule(SPIKE).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    recipe = load_recipe("spike-w8a8-fp8-e5m2")
    qm, findings = quantize(model, recipe, ids, progress=False)
    assert findings["spike_layers"] == [SPIKE]
    mq = qm.plan[SPIKE]
    assert (mq.weights.format, mq.weights.bits, mq.weights.granularity) == ("int", 8, "channel")
    assert mq.inputs.format == "fp8_e5m2"
    # the weight: plain per-row absmax int8 round-to-nearest of the float weight
    scale = w_float.abs().amax(1, keepdim=True) / 127
    ref_w = (w_float / scale).round().clamp(-127, 127) * scale
    lin = model.get_submodule(SPIKE)
    torch.testing.assert_close(lin.weight, ref_w, rtol=0, atol=1e-6)
    # the input: the float input cast to E5M2 and back, no scale (the hook registered first sees it float)
    out = {}
    lin.register_forward_hook(lambda m, a, o: out.__setitem__("y", o.detach()))
    with torch.no_grad():
        model(ids)
    x = seen["x"]
    assert x.abs().max() > 1e3  # the spike is there, so a scaled cast would differ
    ref_y = torch.nn.functional.linear(x.to(torch.float8_e5m2).to(x.dtype), ref_w)
    torch.testing.assert_close(out["y"], ref_y, rtol=1e-5, atol=1e-4)
    # every other decoder linear: int8 weights and int8 per-tensor inputs, as the recipe says
    other = qm.plan["model.layers.0.mlp.down_proj"]
    assert other.weights == mq.weights and other.inputs.format == "int"
