import pytest
import torch

from spikequant.algorithms.smoothquant import smooth_model
from spikequant.errors import RecipeError
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe


def _hand_scales(model, ids, alpha):
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha), from the unsmoothed model, per group of
    linears that read one input: q/k/v, gate/up, down, and o_proj per KV channel (max over the query
    heads that share it)."""
    cfg = model.config
    kv, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    readers = {"attn": "self_attn.q_proj", "mlp": "mlp.gate_proj", "down": "mlp.down_proj", "o": "self_attn.o_proj"}
    acts = {}
    handles = [layer.get_submodule(path).register_forward_pre_hook(
        lambda m, a, key=(i, k): acts.__setitem__(key, a[0].abs().flatten(0, -2).amax(0)))
        for i, layer in enumerate(model.model.layers) for k, path in readers.items()]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    out = {}
    for i, layer in enumerate(model.model.layers):
        def wmax(*paths, layer=layer):
            return torch.stack([layer.get_submodule(p).weight.detach().abs().amax(0) for p in paths]).amax(0)

        w_qkv = wmax("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        out[i, "attn"] = acts[i, "attn"] ** alpha / w_qkv ** (1 - alpha)
        out[i, "mlp"] = acts[i, "mlp"] ** alpha / wmax("mlp.gate_proj", "mlp.up_proj") ** (1 - alpha)
        out[i, "down"] = acts[i, "down"] ** alpha / wmax("mlp.down_proj") ** (1 - alpha)
        a_o = acts[i, "o"].view(kv, group, -1).amax(1)
        w_o = wmax("self_attn.o_proj").view(kv, group, -1).amax(1)
        out[i, "o"] = (a_o ** alpha / w_o ** (1 - alpha)).flatten()  # one scale per v_proj output row
    return out


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_folded_scales_match_the_formula_and_fp64_logits_are_unchanged(arch, alpha):
    model = tiny_model(arch, dtype=torch.float64)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    old = {k: v.clone() for k, v in model.state_dict().items()}
    want = _hand_scales(model, ids[:1], alpha)
    report = smooth_model(model, ids[:1], alpha=alpha, down=True, o=True, progress=False)
    new = model.state_dict()
    group = model.config.num_attention_heads // model.config.num_key_value_heads

    def close(a, b):
        return torch.allclose(a, b, rtol=1e-5, atol=0)  # the scales are computed in float32

    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        s = want[i, "attn"]
        assert close(new[p + "input_layernorm.weight"], old[p + "input_layernorm.weight"] / s)
        for lin in ("q_proj", "k_proj"):
            assert close(new[f"{p}self_attn.{lin}.weight"], old[f"{p}self_attn.{lin}.weight"] * s[None])
        s = want[i, "mlp"]
        assert close(new[p + "post_attention_layernorm.weight"], old[p + "post_attention_layernorm.weight"] / s)
        assert close(new[p + "mlp.gate_proj.weight"], old[p + "mlp.gate_proj.weight"] * s[None])
        s_down = want[i, "down"]
        assert close(new[p + "mlp.up_proj.weight"], old[p + "mlp.up_proj.weight"] * s[None] / s_down[:, None])
        assert close(new[p + "mlp.down_proj.weight"], old[p + "mlp.down_proj.weight"] * s_down[None])
        s_o = want[i, "o"]
        # v_proj: its input columns carry the q/k/v scale, its output rows are divided by the o_proj scale
        assert close(new[p + "self_attn.v_proj.weight"],
                     old[p + "self_attn.v_proj.weight"] * want[i, "attn"][None] / s_o[:, None])
        if p + "self_attn.v_proj.bias" in old:
            assert close(new[p + "self_attn.v_proj.bias"], old[p + "self_attn.v_proj.bias"] / s_o)
        o_cols = s_o.view(model.config.num_key_value_heads, 1, -1).expand(-1, group, -1).flatten()
        assert close(new[p + "self_attn.o_proj.weight"], old[p + "self_attn.o_proj.weight"] * o_cols[None])
        for key, s in (("input_layernorm", want[i, "attn"]), ("post_attention_layernorm", want[i, "mlp"]),
                       ("mlp.down_proj", s_down), ("self_attn.o_proj", s_o)):
            assert report[f"{i}.{key}"] == pytest.approx(float(s.max()), rel=1e-5)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() <= 1e-9


def test_smoothing_flattens_an_activation_outlier():
    model = tiny_model("llama", dtype=torch.float64)
    norm = model.model.layers[0].post_attention_layernorm
    with torch.no_grad():
        norm.weight[5] = 200.0  # channel 5 of the gate/up input becomes a spike
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    seen = {}
    h = model.model.layers[0].mlp.gate_proj.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("x", a[0].detach().abs().amax((0, 1))))
    model(ids)
    ratio_before = float(seen["x"].max() / seen["x"].median())
    smooth_model(model, ids, alpha=0.5, progress=False)
    model(ids)
    h.remove()
    assert float(seen["x"].max() / seen["x"].median()) < ratio_before / 5


def test_modifier_in_a_recipe_keeps_fp64_logits_with_full_heads():
    """Through the pipeline, on a multi-head (not grouped) config, every group smoothed, nothing quantized."""
    model = tiny_model("mistral", dtype=torch.float64, num_key_value_heads=4)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    before = model(ids).logits
    o_before = model.model.layers[1].self_attn.o_proj.weight.clone()
    recipe = load_recipe({"name": "sq-only", "modifiers": [{"type": "smoothquant", "alpha": 0.8, "num_samples": 2,
                                                            "down": True, "o": True}]})
    _, findings = quantize(model, recipe, ids)
    assert findings["smoothquant"]["alpha"] == 0.8
    assert not torch.equal(model.model.layers[1].self_attn.o_proj.weight, o_before)
    assert (model(ids).logits - before).abs().max() <= 1e-9


PAPER = ["smoothquant-w8a8-tensor", "smoothquant-w8a8-tensor-static", "smoothquant-spike-w8a8-tensor",
         "smoothquant-spike-w8a8-tensor-static"]
NORM_READERS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if ".layers." in k}


@pytest.mark.parametrize("preset", PAPER + [p.replace("smoothquant-", "smoothquant-ext-") for p in PAPER])
def test_presets_fold_what_they_say(preset):
    """The paper's presets (smooth_lm) change the two norms and their readers q/k/v, gate/up, nothing
    else; the extended (ours) presets also change o_proj and down_proj (through v_proj / up_proj rows)."""
    sq = [m for m in load_recipe(preset).modifiers if m.type == "smoothquant"]
    assert len(sq) == 1
    model = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(5))
    before_logits = model(ids).logits
    before = _weights(model)
    quantize(model, load_recipe({"name": "sq", "modifiers": [sq[0].to_dict()]}), ids, progress=False)
    after = _weights(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    ext = "-ext-" in preset
    for i in range(len(model.model.layers)):
        pre = f"model.layers.{i}."
        expect = {pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight"}
        expect |= {pre + p + ".weight" for p in NORM_READERS}
        if ext:
            expect |= {pre + "self_attn.o_proj.weight", pre + "mlp.down_proj.weight"}
        assert {k for k in changed if k.startswith(pre)} == expect, preset
    assert (model(ids).logits - before_logits).abs().max() <= 1e-9


def test_default_statistics_use_all_calibration_windows():
    model = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(0, 96, (5, 8), generator=torch.Generator().manual_seed(6))
    _, findings = quantize(model, load_recipe("smoothquant-w8a8-tensor"), ids, progress=False)
    assert findings["smoothquant"]["windows"] == 5 and findings["smoothquant"]["tokens"] == 40
    assert findings["smoothquant"]["folds"] == ["qkv", "gate_up"]


def test_bad_alpha_is_a_recipe_error():
    with pytest.raises(RecipeError, match="alpha"):
        load_recipe({"name": "x", "modifiers": [{"type": "smoothquant", "alpha": 1.5}]})


def test_bad_num_samples_is_a_recipe_error():
    with pytest.raises(RecipeError, match="num_samples must be a positive integer, got 0"):
        load_recipe({"name": "x", "modifiers": [{"type": "smoothquant", "num_samples": 0}]})
    with pytest.raises(RecipeError, match="down must be true or false"):
        load_recipe({"name": "x", "modifiers": [{"type": "smoothquant", "down": "yes"}]})
