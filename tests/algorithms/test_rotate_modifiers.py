import json

import pytest
import torch

from spikequant.algorithms.clip_ratios import (
    QUANTIZER_KEYS,
    activation_quantizers,
    clip_ratios,
    load_ratio_file,
    save_ratio_file,
    set_clip_ratio,
)
from spikequant.errors import RecipeError
from spikequant.models import model_dims
from spikequant.models.tiny import TINY_ARCHS, tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe
from spikequant.transforms import installed_attention_transforms

ROT_PRESETS = ["quarot-w4a4kv4", "quarot-w3a3kv3", "quarot-rtn-w4a4kv4", "random-rot-w4a4kv4", "norot-w4a4kv4"]
WINDOWS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))


def _run(arch, recipe, **kw):
    model = tiny_model(arch, seed=2, **kw)
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    with torch.no_grad():
        logits = model(WINDOWS[:1]).logits
    return model, qm, findings, logits


def _kv_reference(states, bits, clip, group):
    """Plain asymmetric b-bit quantization of (batch, heads, seq, head_dim) states, one scale and zero per
    token and run of ``group`` values along heads x head_dim, range clipped by ``clip``."""
    b, h, t, d = states.shape
    x = states.transpose(1, 2).reshape(b, t, h * d).unflatten(-1, (-1, group))
    lo = x.amin(-1, keepdim=True).clamp(max=0) * clip
    hi = x.amax(-1, keepdim=True).clamp(min=0) * clip
    s = (hi - lo) / (2**bits - 1)
    z = torch.round(-lo / s)
    q = (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z) * s
    return q.flatten(-2).reshape(b, t, h, d).transpose(1, 2)


@pytest.mark.parametrize("arch,preset", [(a, p) for a in TINY_ARCHS for p in ROT_PRESETS
                                         if "rtn" in p or "rot-" in p or a == "qwen2"])
def test_presets_run(arch, preset):
    recipe = load_recipe(preset)
    model, qm, findings, logits = _run(arch, recipe)
    r1 = (findings.get("rotation", {}).get("r1") or "none")
    assert r1 == {"quarot": "hadamard", "random": "random", "norot": "none"}[preset.split("-")[0]]
    # R1 read back from the embedding (E' = E R1; the embedding is neither fused nor quantized)
    e0 = tiny_model(arch, seed=2).get_input_embeddings().weight.detach().double()
    e1 = model.get_input_embeddings().weight.detach().double()
    if r1 == "none":
        assert torch.equal(e1, e0)
    else:
        rot = torch.linalg.lstsq(e0, e1).solution  # (hidden, expanded hidden)
        n = rot.shape[1]
        assert torch.allclose(rot @ rot.T, torch.eye(rot.shape[0], dtype=rot.dtype), atol=1e-4)
        if r1 == "hadamard":  # a randomized Hadamard matrix: every entry is +-1/sqrt(n)
            assert torch.allclose(rot.abs(), torch.full_like(rot, n**-0.5), atol=1e-4)
        else:  # Haar: entries of every size
            assert rot.abs().std() > 0.2 * n**-0.5
    # KV cache: the installed quantizers equal a plain per-(token, head) asymmetric reference
    kv = next(m for m in recipe.to_dict()["modifiers"] if m["type"] == "kv_cache")
    hd = model_dims(model).head_dim
    states = torch.randn(2, model_dims(model).num_kv_heads, 5, hd, generator=torch.Generator().manual_seed(1))
    for t in installed_attention_transforms(model):
        for q in (t.k_quantizer, t.v_quantizer):
            assert torch.allclose(q(states), _kv_reference(states, kv["bits"], 1.0, hd), atol=1e-6)
    # the KV quantizers are on the forward path
    for t in installed_attention_transforms(model):
        t.k_quantizer.enabled = t.v_quantizer.enabled = False
    with torch.no_grad():
        assert (model(WINDOWS[:1]).logits - logits).abs().max() > 1e-4
    if preset.startswith("quarot-w"):
        assert findings["gptq"]["linears"] == 7 * 2
        assert not qm.weight_qparams.keys() - set(qm.plan)  # GPTQ's qparams recorded, RTN skipped


def test_rotation_lowers_w4a4_error_on_a_spiky_model():
    ref = tiny_model("llama", seed=2, dtype=torch.float64)
    with torch.no_grad():  # a residual-stream spike channel, as in real models
        ref.get_input_embeddings().weight[:, 5] *= 40
        target = ref(WINDOWS).logits
    errs = {}
    for preset in ("norot-w4a4kv4", "quarot-rtn-w4a4kv4"):
        model = tiny_model("llama", seed=2, dtype=torch.float64)
        with torch.no_grad():
            model.get_input_embeddings().weight[:, 5] *= 40
        quantize(model, load_recipe(preset), WINDOWS, progress=False)
        with torch.no_grad():
            errs[preset] = float(((model(WINDOWS).logits - target) ** 2).mean())
    assert errs["quarot-rtn-w4a4kv4"] < 0.5 * errs["norot-w4a4kv4"]


def test_clip_ratios_are_addressable_and_cheap_to_change(tmp_path):
    data = load_recipe("quarot-rtn-w4a4kv4").to_dict()  # without the online o_proj Hadamard, so the hook
    next(m for m in data["modifiers"] if m["type"] == "rotate")["o_online"] = False  # sees the raw input
    model, qm, _, before = _run("qwen2", load_recipe(data))
    index = activation_quantizers(qm)
    for layer in range(2):
        for key in QUANTIZER_KEYS:
            assert (layer, key) in index
    set_clip_ratio(qm, 1, "o_proj", 0.3)
    set_clip_ratio(qm, 0, "v_proj", 0.5)  # also clips the V cache
    o_proj = model.get_submodule("model.layers.1.self_attn.o_proj")
    seen = {}
    hooks = [o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0]), prepend=True),
             o_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", a[0]))]
    with torch.no_grad():
        model(WINDOWS[:1])
    for h in hooks:
        h.remove()
    # the next forward quantizes o_proj's input per token, 4 bits, with its range clipped to 0.3
    s = 0.3 * seen["raw"].abs().amax(-1, keepdim=True) / 7
    assert torch.allclose(seen["q"], torch.clamp(torch.round(seen["raw"] / s), -8, 7) * s, atol=1e-6)
    hd = model_dims(model).head_dim
    states = torch.randn(1, model_dims(model).num_kv_heads, 5, hd, generator=torch.Generator().manual_seed(1))
    v0, v1 = (installed_attention_transforms(model)[i].v_quantizer for i in (0, 1))
    assert torch.allclose(v0(states), _kv_reference(states, 4, 0.5, hd), atol=1e-6)
    assert torch.allclose(v1(states), _kv_reference(states, 4, 1.0, hd), atol=1e-6)
    r = clip_ratios(qm)
    assert r[1]["o_proj"] == 0.3 and r[0]["v_proj"] == 0.5 and "v_cache" not in r[0]
    assert installed_attention_transforms(model)[0].v_quantizer.spec.clip_ratio == 0.5
    assert qm.plan["model.layers.1.self_attn.o_proj"].inputs.clip_ratio == 0.3
    save_ratio_file(r, tmp_path / "r.json")
    assert load_ratio_file(tmp_path / "r.json") == r


def test_ratio_file_through_a_recipe(tmp_path):
    (tmp_path / "ratios.json").write_text(json.dumps({"layers": {"0": {"o_proj": 0.4, "k_cache": 0.9},
                                                                 "1": {"down_proj": 0.7, "v_cache": 0.6}}}))
    data = load_recipe("quarot-rtn-w4a4kv4").to_dict()
    data["modifiers"].append({"type": "clip_ratios", "file": str(tmp_path / "ratios.json"),
                              "ratios": {"layers": {"1": {"q_proj": 0.8}}}})
    _, qm, findings, _ = _run("llama", load_recipe(data))
    r = clip_ratios(qm)
    assert r[0]["o_proj"] == 0.4 and r[0]["k_cache"] == 0.9 and r[1]["down_proj"] == 0.7
    assert r[1]["q_proj"] == 0.8 and r[1]["v_cache"] == 0.6 and r[1]["v_proj"] == 1.0
    assert r[0]["up_proj"] == 1.0


@pytest.mark.parametrize("ratios,needle", [
    ({"layers": {"0": {"qproj": 0.5}}}, "unknown quantizer 'qproj'"),
    ({"layers": {"0": {"q_proj": 1.5}}}, r"\(0, 1\]"),
    ({"layers": {"x": {"q_proj": 0.5}}}, "layer key 'x'"),
])
def test_bad_ratios_fail_with_one_line(ratios, needle):
    data = load_recipe("quarot-rtn-w4a4kv4").to_dict()
    data["modifiers"].append({"type": "clip_ratios", "ratios": ratios})
    with pytest.raises(RecipeError, match=needle):
        load_recipe(data)


def test_rotate_modifier_errors():
    with pytest.raises(RecipeError, match="r1 'walsh'"):
        load_recipe({"name": "x", "modifiers": [{"type": "rotate", "r1": "walsh"}]})
    with pytest.raises(RecipeError, match="expand key 'width'"):
        load_recipe({"name": "x", "modifiers": [{"type": "rotate", "expand": {"width": 8}}]})


def test_v_cache_wins_over_v_proj_in_any_order_on_both_paths():
    from spikequant.algorithms.clip_ratios import apply_clip_ratios

    ratios = {"layers": {"0": {"v_cache": 0.6, "v_proj": 0.9}}}  # v_cache listed first
    data = load_recipe("quarot-rtn-w4a4kv4").to_dict()
    data["modifiers"].append({"type": "clip_ratios", "ratios": ratios})
    model, qm, _, _ = _run("llama", load_recipe(data))
    v_cache = installed_attention_transforms(model)[0].v_quantizer
    assert v_cache.spec.clip_ratio == 0.6  # through the recipe
    apply_clip_ratios(qm, {0: {"v_cache": 0.6, "v_proj": 0.9}})
    assert v_cache.spec.clip_ratio == 0.6  # and in place
    assert clip_ratios(qm)[0]["v_proj"] == 0.9 and clip_ratios(qm)[0]["v_cache"] == 0.6


def test_kv_only_recipe_ratio_file_loads_back(tmp_path):
    """With the KV cache quantized but no linear inputs, the saved ratios (v_proj for the V cache) reload."""
    data = {"name": "kv-only", "modifiers": [{"type": "rotate"}, {"type": "kv_cache", "bits": 4}]}
    _, qm, _, _ = _run("qwen3", load_recipe(data))
    set_clip_ratio(qm, 1, "v_proj", 0.7)
    saved = clip_ratios(qm)
    assert saved[1] == {"v_proj": 0.7, "k_cache": 1.0}
    save_ratio_file(saved, tmp_path / "r.json")
    data["modifiers"].append({"type": "clip_ratios", "file": str(tmp_path / "r.json")})
    model, qm2, _, _ = _run("qwen3", load_recipe(data))
    assert clip_ratios(qm2) == saved
    assert installed_attention_transforms(model)[1].v_quantizer.spec.clip_ratio == 0.7


def test_quarot_presets_are_quarots_setting():
    """QuaRot (spcl/QuaRot fake_quant): online Hadamard on every o_proj input, GPTQ without act-order,
    KV asymmetric one group per head; our earlier choices stay as named presets."""
    for name in ("quarot-w4a4kv4", "quarot-w3a3kv3", "quarot-rtn-w4a4kv4", "quarot-rtn-w3a3kv3"):
        mods = {m.type: m for m in load_recipe(name).modifiers}
        assert mods["rotate"].o_online == "auto"
        assert mods["kv_cache"].symmetric is False and mods["kv_cache"].v_group == "head"
        if "gptq" in mods:
            assert mods["gptq"].act_order is False
    ours = {m.type: m for m in load_recipe("quarot-w4a4kv4-ours").modifiers}
    assert ours["rotate"].o_online is False and ours["gptq"].act_order is True
    seed = {m.type: m for m in load_recipe("quarot-w4a4kv4-seedkv").modifiers}
    assert seed["kv_cache"].symmetric is True and seed["kv_cache"].v_group == "token"


def test_o_online_auto_follows_the_hadamard():
    from spikequant.algorithms.base import QuantContext
    from spikequant.algorithms.rotate import Rotate
    from spikequant.transforms import use_precise_norms
    from spikequant.transforms.online import has_online_hadamard

    ids = WINDOWS[:2]
    for overrides, on in (({}, True), ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 6}, False)):
        model = use_precise_norms(tiny_model("llama", seed=2, dtype=torch.float64, **overrides))
        before = model(ids).logits
        ctx = QuantContext(model=model, calibration_windows=lambda: ids, seed=0, progress=False)
        Rotate(r2=on, r3=on, o_online="auto").apply(ctx)  # 4 x 12 = 48 has a Hadamard, 3 x 6 = 18 has none
        assert ctx.findings["rotation"]["o_online_auto"] is on
        assert has_online_hadamard(model, "o_proj") is on
        assert (model(ids).logits - before).abs().max() <= 1e-9
    with pytest.raises(RecipeError, match="o_online must be true, false or auto"):
        load_recipe({"name": "x", "modifiers": [{"type": "rotate", "o_online": "yes"}]})
