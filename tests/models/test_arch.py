import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from spikequant.errors import UnsupportedArchitectureError
from spikequant.models import decoder_linears, get_arch, linear_role, model_dims
from spikequant.models.tiny import tiny_model


def test_mapping_resolves_every_module(arch):
    model = tiny_model(arch)
    spec = get_arch(model)
    dims = model_dims(model)
    linears = decoder_linears(model)
    assert len(linears) == 7 * dims.num_layers
    layer = model.get_submodule(f"{spec.layers}.0")
    for path in (spec.input_norm, spec.post_attn_norm, spec.act_fn, *spec.linear_roles.values()):
        layer.get_submodule(path)
    for path in (spec.embed, spec.final_norm, spec.lm_head):
        model.get_submodule(path)
    q = layer.get_submodule(spec.q_proj)
    assert q.out_features == dims.num_heads * dims.head_dim
    assert layer.get_submodule(spec.k_proj).out_features == dims.num_kv_heads * dims.head_dim
    assert dims.num_kv_heads < dims.num_heads  # the tiny configs exercise GQA
    assert (q.bias is not None) == spec.qkv_bias
    assert (spec.q_norm is not None) == (arch == "qwen3")
    if spec.q_norm:
        layer.get_submodule(spec.q_norm)
    assert dims.tied_embeddings == (arch == "qwen2")
    assert linear_role(model, f"{spec.layers}.1.{spec.down_proj}") == (1, "down_proj")
    assert linear_role(model, spec.lm_head) is None


def test_unsupported_class_names_itself_and_the_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        get_arch(model)


def test_tiny_models_are_deterministic():
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    ids = torch.randint(0, 96, (1, 8))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_resolve_device():
    from spikequant.errors import ModelLoadError
    from spikequant.models.loading import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cpu", "cuda")
    with pytest.raises(ModelLoadError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ModelLoadError, match="'meta' is not supported"):
        resolve_device("meta")
