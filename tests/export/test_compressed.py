"""Export to compressed-tensors: the exported checkpoint reloads through transformers + compressed-tensors
and computes what our fake-quant model computes; what it cannot express is refused in one line, before
anything is written."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from spikequant.cli import main
from spikequant.export import save_quantized
from spikequant.export.compressed import (
    EXPORT_MANIFEST,
    ExportError,
    check_transforms,
    export_compressed,
    input_args,
    is_compressed_tensors_dir,
    plan_export,
)
from spikequant.models.arch import ARCHITECTURES
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.quant import ModuleQuant, QuantSpec
from spikequant.recipes import Recipe, load_recipe

pytest.importorskip("compressed_tensors")

VOCAB = 96
WINDOWS = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
EXEMPT_DOWN = "model.layers.0.mlp.down_proj"


def _tokenizer():
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def _spike_recipe(preset: str = "spike-w8a8-tensor-static", **exempt) -> Recipe:
    """The preset with its spike rule made to fire on a tiny random model (the two linears with the largest
    inputs: gate/up of one layer here), plus one down_proj exempted by an override as the real presets'
    detections on SmolLM2 are down_proj."""
    d = load_recipe(preset).to_dict()
    for m in d["modifiers"]:
        if m["type"] == "spike_exempt":
            m.update(k=None, abs_threshold=1e-6, max_layers=2, **exempt)
    slots = {"weights": None, "inputs": None}
    if "fp8" in preset:
        slots = {"weights": {"format": "fp8_e4m3", "granularity": "tensor"},
                 "inputs": {"format": "fp8_e4m3", "granularity": "tensor", "dynamic": False}}
    d["overrides"] = [{"match": EXEMPT_DOWN, **slots}]
    return Recipe.from_dict(d)


def _quantized_dir(tmp_path, recipe, name="q", **model_kw):
    model = tiny_model("llama", seed=7, **model_kw)
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    with torch.no_grad():
        logits = model(WINDOWS).logits
    out = save_quantized(qm, _tokenizer(), recipe, "tiny", tmp_path / name, findings)
    return out, logits, findings


def _reload_logits(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(WINDOWS).logits


def _ppl(logits):
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), WINDOWS[:, 1:].flatten())))


def _no_partial(tmp_path):
    return [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_spike_static_w8a8_reloads_bit_identical(tmp_path):
    q, logits, findings = _quantized_dir(tmp_path, _spike_recipe())
    res = export_compressed(q, tmp_path / "ct", progress=False)
    ct = tmp_path / "ct"
    assert is_compressed_tensors_dir(ct) and res.formats == "int-quantized"
    after = _reload_logits(ct)
    # Weights decompress to int8 x our scale (the very floats our fake-quant weights hold) and inputs are
    # quantized with our static scale by the same round/clamp: the logits are equal, not just close.
    assert torch.equal(logits, after), float((logits - after).abs().max())
    assert abs(_ppl(after) / _ppl(logits) - 1) < 0.005  # the bar, trivially met here

    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((ct / "config.json").read_text())["quantization_config"])
    assert qc.format == "int-quantized" and len(qc.config_groups) == 1
    (group,) = qc.config_groups.values()
    w, a = group.weights, group.input_activations
    assert (w.type, w.num_bits, w.strategy, w.symmetric) == ("int", 8, "channel", True)
    assert (a.type, a.num_bits, a.strategy, a.symmetric, a.dynamic) == ("int", 8, "tensor", True, False)
    exempt = set(findings["spike_layers"]) | {EXEMPT_DOWN}
    assert len(exempt) == 3
    assert set(qc.ignore) == exempt | {"lm_head"}

    # Our calibrated scales are what was written, and the weights are stored as int8.
    ours = load_file(str(q / "quantization.safetensors"))
    with safe_open(str(ct / "model.safetensors"), "pt") as f:
        name = "model.layers.1.self_attn.q_proj"
        assert f.get_tensor(f"{name}.weight").dtype == torch.int8
        assert torch.equal(f.get_tensor(f"{name}.weight_scale").flatten(), ours[f"{name}.weight.scale"].flatten())
        assert torch.equal(f.get_tensor(f"{name}.input_scale").flatten(), ours[f"{name}.input.scale"].flatten())
        stored = set(f.keys())
        assert f"{EXEMPT_DOWN}.weight" in stored and f"{EXEMPT_DOWN}.weight_scale" not in stored
    prov = json.loads((ct / EXPORT_MANIFEST).read_text())
    assert prov["recipe"]["name"] == "spike-w8a8-tensor-static" and prov["attn_implementation"] == "eager"


def test_every_architecture_reloads_bit_identical(tmp_path, arch):
    """Qwen2 ties its embeddings and has q/k/v biases, Qwen3 has q/k norms: all reload exactly."""
    model = tiny_model(arch, seed=7)
    recipe = load_recipe("w8a8-tensor-static")
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    with torch.no_grad():
        logits = model(WINDOWS).logits
    save_quantized(qm, _tokenizer(), recipe, "tiny", tmp_path / "q", findings)
    export_compressed(tmp_path / "q", tmp_path / "ct", progress=False)
    assert torch.equal(logits, _reload_logits(tmp_path / "ct"))


def test_fp8_exemptions_are_a_float_quantized_group(tmp_path):
    q, logits, findings = _quantized_dir(tmp_path, _spike_recipe("spike-w8a8-fp8-static"))
    res = export_compressed(q, tmp_path / "ct", progress=False)
    assert res.formats == "mixed-precision" and res.ignored == ["lm_head"]
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = {g["format"]: g for g in qc["config_groups"].values()}
    assert set(groups) == {"int-quantized", "float-quantized"}
    fp8 = groups["float-quantized"]
    assert set(fp8["targets"]) == set(findings["spike_layers"]) | {EXEMPT_DOWN}
    assert (fp8["weights"]["type"], fp8["weights"]["strategy"]) == ("float", "tensor")
    assert fp8["input_activations"]["dynamic"] is False
    assert groups["int-quantized"]["targets"] == ["Linear"]
    assert torch.equal(logits, _reload_logits(tmp_path / "ct"))


def test_rotated_w4a8_with_fused_rotations_only_is_exported(tmp_path):
    recipe = Recipe.from_dict({
        "name": "rot-w4a8", "weights": {"format": "int", "bits": 4, "granularity": "channel"},
        "inputs": {"format": "int", "bits": 8, "granularity": "tensor", "dynamic": False},
        "modifiers": [{"type": "rotate", "r1": "hadamard", "r2": True, "r3": False, "r4": False}]})
    q, logits, _ = _quantized_dir(tmp_path, recipe, hidden_size=64, intermediate_size=128)
    res = export_compressed(q, tmp_path / "ct", progress=False)
    assert res.formats == "int-quantized"  # W4A8: int4 values stored in int8, as compressed-tensors does
    assert torch.equal(logits, _reload_logits(tmp_path / "ct"))


def test_asymmetric_weights_and_static_inputs_reload_bit_identical(tmp_path):
    """Our unsigned zero points are written as compressed-tensors' signed ones (z - 2^(b-1))."""
    asym = {"format": "int", "bits": 8, "symmetric": False}
    recipe = Recipe.from_dict({"name": "asym", "weights": {**asym, "granularity": "channel"},
                               "inputs": {**asym, "granularity": "tensor", "dynamic": False}})
    q, logits, _ = _quantized_dir(tmp_path, recipe)
    assert export_compressed(q, tmp_path / "ct", progress=False).formats == "int-quantized"
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        zp = f.get_tensor("model.layers.0.self_attn.q_proj.input_zero_point")
    ours = load_file(str(q / "quantization.safetensors"))["model.layers.0.self_attn.q_proj.input.zero"]
    assert float(zp.flatten()[0]) == float(ours) - 128
    assert torch.equal(logits, _reload_logits(tmp_path / "ct"))


def test_weight_only_w4_groups_are_pack_quantized(tmp_path):
    recipe = Recipe.from_dict({"name": "w4g32", "weights": {"format": "int", "bits": 4, "granularity": "group",
                                                            "group_size": 16}})
    q, logits, _ = _quantized_dir(tmp_path, recipe)
    assert export_compressed(q, tmp_path / "ct", progress=False).formats == "pack-quantized"
    assert torch.equal(logits, _reload_logits(tmp_path / "ct"))


def test_eval_cli_gives_the_same_ppl_for_both_folders(tmp_path, capsys):
    q, _, _ = _quantized_dir(tmp_path, _spike_recipe())
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{int(i)}" for i in torch.randint(0, VOCAB, (600,), generator=torch.Generator()
                                                                  .manual_seed(3))))
    assert main(["export", "--model", str(q), "--format", "compressed-tensors", "--output", str(tmp_path / "ct"),
                 "--no-progress"]) == 0
    assert "exported" in capsys.readouterr().out
    ppl = {}
    for name in ("q", "ct"):
        assert main(["eval", "--model", str(tmp_path / name), "--dataset", str(text), "--seqlen", "64", "--no-kl",
                     "--no-progress", "--device", "cpu", "--json", str(tmp_path / f"{name}.json")]) == 0
        report = json.loads((tmp_path / f"{name}.json").read_text())
        ppl[name] = report["ppl"]
    assert report["model"]["format"] == "compressed-tensors"
    assert ppl["q"] == ppl["ct"]
    rc, err, _ = _export_cli(tmp_path / "ct", tmp_path / "ct2", capsys)
    assert rc == 2 and "already a compressed-tensors checkpoint" in err
    capsys.readouterr()
    rc = main(["quantize", "--model", str(tmp_path / "ct"), "--recipe", "w8a8-tensor", "--dataset", str(text),
               "--seqlen", "64", "--output", str(tmp_path / "again"), "--no-progress", "--device", "cpu"])
    assert rc == 2 and "already quantized (a compressed-tensors checkpoint)" in capsys.readouterr().err


def test_quantize_export_flag_writes_beside_the_output(tmp_path, capsys):
    model = tiny_model("llama", seed=7)
    model.save_pretrained(tmp_path / "base")
    _tokenizer().save_pretrained(tmp_path / "base")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"t{i % VOCAB}" for i in range(0, 4000, 7)))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({
        "name": "w8a8-static", "weights": {"format": "int", "bits": 8, "granularity": "channel"},
        "inputs": {"format": "int", "bits": 8, "granularity": "tensor", "dynamic": False},
        "calibration": {"dataset": str(text), "split": "test", "num_samples": 4, "seqlen": 32}}))
    rc = main(["quantize", "--model", str(tmp_path / "base"), "--recipe", str(recipe), "--output",
               str(tmp_path / "q"), "--export", "compressed-tensors", "--no-progress", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "q" / "spikequant.json").is_file()
    assert is_compressed_tensors_dir(tmp_path / "q-compressed-tensors")


# -- refusals: one line, exit 2, nothing written ---------------------------------------------------------

def _export_cli(src, out, capsys, *extra):
    capsys.readouterr()  # drop what came before (save_pretrained's progress bars)
    rc = main(["export", "--model", str(src), "--format", "compressed-tensors", "--output", str(out),
               "--no-progress", *extra])
    captured = capsys.readouterr()
    return rc, captured.err.strip(), captured.out


def test_unquantized_and_foreign_directories_are_refused(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "float")
    (tmp_path / "empty").mkdir()
    for src, needle in ((tmp_path / "float", "an unquantized model directory"),
                        (tmp_path / "empty", "not a model directory"),
                        (tmp_path / "missing", "is not a directory")):
        rc, err, _ = _export_cli(src, tmp_path / "ct", capsys)
        assert rc == 2 and err.count("\n") == 0 and needle in err, err
        assert not (tmp_path / "ct").exists() and not _no_partial(tmp_path)


def test_split_fused_group_is_refused_or_promoted(tmp_path, capsys):
    recipe = Recipe.from_dict({
        "name": "split-qkv", "weights": {"format": "int", "bits": 8, "granularity": "channel"},
        "inputs": {"format": "int", "bits": 8, "granularity": "tensor", "dynamic": False},
        "overrides": [{"match": "model.layers.0.self_attn.q_proj", "weights": None, "inputs": None}]})
    q, logits, _ = _quantized_dir(tmp_path, recipe)
    rc, err, _ = _export_cli(q, tmp_path / "ct", capsys)
    assert rc == 2 and err.count("\n") == 0, err
    assert "fused group model.layers.0.{q_proj,k_proj,v_proj}" in err and "--promote-fused" in err
    assert not (tmp_path / "ct").exists() and not _no_partial(tmp_path)

    rc, err, out = _export_cli(q, tmp_path / "ct", capsys, "--promote-fused")
    assert rc == 0, err
    assert "fused group model.layers.0.{q_proj,k_proj,v_proj} kept in float" in out
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"} <= set(ignore)
    assert "model.layers.1.self_attn.q_proj" not in ignore
    after = _reload_logits(tmp_path / "ct")  # k/v lose their activation quantizer: close, not equal
    assert not torch.equal(logits, after) and abs(_ppl(after) / _ppl(logits) - 1) < 0.05


def test_spike_rule_with_max_layers_can_split_a_group():
    """max_layers cuts the ranked list anywhere: q/k/v share one input (one max |input|), so a cut can
    fall inside a group. That is a recipe the export must refuse, checked from the plan alone."""
    arch = ARCHITECTURES["LlamaForCausalLM"]
    int8 = ModuleQuant(QuantSpec(granularity="channel"), QuantSpec(dynamic=False))
    plan = {arch.linear_name(0, r): int8 for r in arch.linear_roles}
    plan["model.layers.0.mlp.gate_proj"] = ModuleQuant()
    with pytest.raises(ExportError, match=r"model.layers.0.\{gate_proj,up_proj\} mixes precisions"):
        plan_export(plan, arch, 1)
    promoted = plan_export(plan, arch, 1, promote_fused=True)
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"} <= set(promoted.ignore)


@pytest.mark.parametrize(("mq", "needle"), [
    (ModuleQuant(QuantSpec(granularity="channel"), None, QuantSpec()), "output quantizer"),
    (ModuleQuant(QuantSpec(granularity="channel"), QuantSpec(granularity="channel", dynamic=False)),
     "per-input-channel activation scales"),
    (ModuleQuant(QuantSpec(granularity="channel"), QuantSpec(granularity="token", clip_ratio=0.9)), "clip_ratio 0.9"),
    (ModuleQuant(QuantSpec(granularity="channel", symmetric=False)), "asymmetric weight-only"),
    (ModuleQuant(QuantSpec(format="fp8_e5m2")), "E5M2 weights"),
])
def test_plan_level_refusals_name_the_module(mq, needle):
    arch = ARCHITECTURES["LlamaForCausalLM"]
    plan = {arch.linear_name(0, r): mq for r in arch.linear_roles}
    with pytest.raises(ExportError, match="model.layers.0.self_attn.q_proj") as e:
        plan_export(plan, arch, 1)
    assert needle in str(e.value)


def test_different_static_scales_inside_a_fused_group_are_refused(tmp_path):
    model = tiny_model("llama", seed=7)
    recipe = load_recipe("w8a8-tensor-static")
    qm, findings = quantize(model, recipe, WINDOWS, progress=False)
    k = model.get_submodule("model.layers.1.self_attn.k_proj").input_quantizer
    k.scale = k.scale * 1.5  # as a per-quantizer clip ratio could leave it
    save_quantized(qm, _tokenizer(), recipe, "tiny", tmp_path / "q", findings)
    with pytest.raises(ExportError, match=r"model.layers.1.\{q_proj,k_proj,v_proj\} has different static input"):
        export_compressed(tmp_path / "q", tmp_path / "ct", progress=False)
    assert not (tmp_path / "ct").exists() and not _no_partial(tmp_path)


@pytest.mark.parametrize(("preset", "needle"), [
    ("quarot-rtn-w4a4kv4", "online Hadamard on down_proj inputs (R4)"),
    ("spike-w8a8-fp8-e5m2", "E5M2"),
    ("spike-w8a8-tensor-static-sink", "keep_first_tokens"),
])
def test_inexpressible_recipes_are_refused_in_one_line(tmp_path, capsys, preset, needle):
    recipe = load_recipe(preset)
    if preset.startswith("spike"):
        recipe = _spike_recipe(preset)
    q, _, _ = _quantized_dir(tmp_path, recipe, hidden_size=64, intermediate_size=128)
    rc, err, _ = _export_cli(q, tmp_path / "ct", capsys)
    assert rc == 2 and err.count("\n") == 0 and needle in err, err
    assert not (tmp_path / "ct").exists() and not _no_partial(tmp_path)


def test_expansion_and_online_transforms_are_named_from_the_manifest():
    state = {"expansion": {"hidden_size": [48, 64]}, "r4": True, "o_online": False, "r3": True, "kv": None}
    with pytest.raises(ExportError) as e:
        check_transforms(state, "q/")
    msg = str(e.value)
    assert "Dimension Expansion (hidden_size 48->64" in msg and "(R4)" in msg and "(R3)" in msg
    assert "o_proj" not in msg and "\n" not in msg
    check_transforms({"norms": {"dim": 48}, "r4": False, "o_online": False, "r3": False, "kv": None}, "q/")


def test_non_empty_output_is_kept_without_overwrite(tmp_path, capsys):
    q, _, _ = _quantized_dir(tmp_path, _spike_recipe())
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "keep.txt").write_text("x")
    rc, err, _ = _export_cli(q, tmp_path / "ct", capsys)
    assert rc == 2 and "--overwrite" in err
    assert [p.name for p in (tmp_path / "ct").iterdir()] == ["keep.txt"]
    rc, err, _ = _export_cli(q, tmp_path / "ct", capsys, "--overwrite")
    assert rc == 0 and not (tmp_path / "ct" / "keep.txt").exists() and is_compressed_tensors_dir(tmp_path / "ct")


def test_dynamic_int_activations_come_with_a_note():
    args, note = input_args(QuantSpec(granularity="token"), "x")
    assert args.dynamic is True and args.strategy == "token"
    assert "amax/127.5" in note and "amax/127" in note
    args, note = input_args(QuantSpec(dynamic=False), "x")
    assert note is None and args.dynamic is False
