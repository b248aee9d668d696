import pytest
import torch

from spikequant.hadamard import hadamard_transform, plan
from spikequant.models import get_arch, model_dims
from spikequant.transforms import (
    Rotation,
    RotationConfig,
    RotationError,
    attention_transforms,
    fuse_down_hadamard,
    fuse_input_hadamard,
    fuse_norms,
    has_online_hadamard,
    install_online_hadamard,
    install_r3,
    install_r4,
    rotate_heads,
    rotate_model,
    rotate_residual,
)
from spikequant.transforms.online import R4_ATTR

from .conftest import TOL, max_logit_diff, pair


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_is_orthogonal_and_right_matches_matrix(kind):
    r = Rotation(48, kind, seed=3)
    m = r.matrix()
    assert torch.allclose(m @ m.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, 48, dtype=torch.float64)
    assert torch.allclose(r.right(x), x @ m, atol=1e-12)
    w = torch.randn(48, 7, dtype=torch.float64)
    assert torch.allclose(r.left_t(w), m.T @ w, atol=1e-12)


def test_hadamard_rotation_needs_a_construction():
    with pytest.raises(RotationError, match="size 50 has no Hadamard construction.*52"):
        Rotation(50)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_r1_exact(arch, kind):
    model, ref = pair(arch)
    fuse_norms(model)
    rotate_residual(model, Rotation(model_dims(model).hidden, kind, seed=1))
    assert max_logit_diff(model, ref) <= TOL
    a = get_arch(model)
    e0, e1 = ref.get_submodule(a.embed).weight, model.get_submodule(a.embed).weight
    # the spike-spreading actually happened: the embedding changed, its row norms did not
    assert not torch.allclose(e0, e1)
    assert torch.allclose(e0.norm(dim=1), e1.norm(dim=1), atol=1e-12)


def test_r1_refuses_unfused_norms():
    model, _ = pair("llama")
    with pytest.raises(RotationError, match="fuse_norms"):
        rotate_residual(model, Rotation(48))


def test_r2_exact_with_gqa_and_bias(arch):
    model, ref = pair(arch)
    rotate_heads(model, Rotation(model_dims(model).head_dim, "hadamard", seed=2))
    assert max_logit_diff(model, ref) <= TOL
    a = get_arch(model)
    v = f"{a.layers}.0.{a.v_proj}"
    assert not torch.allclose(model.get_submodule(v).weight, ref.get_submodule(v).weight)
    if model.get_submodule(v).bias is not None:  # qwen2: the bias rotates with the rows
        assert not torch.allclose(model.get_submodule(v).bias, ref.get_submodule(v).bias)


def test_r4_needs_both_halves(arch):
    model, ref = pair(arch)
    fuse_down_hadamard(model)
    assert max_logit_diff(model, ref) > 1e-3  # the fused half alone changes the model
    install_r4(model)
    assert max_logit_diff(model, ref) <= TOL


def test_r4_runs_before_input_quantizer_hooks():
    model, _ = pair("llama")
    a = get_arch(model)
    down = model.get_submodule(f"{a.layers}.0.{a.down_proj}")
    seen = {}
    down.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    raw = {}
    model.get_submodule(f"{a.layers}.0.{a.up_proj}").register_forward_hook(lambda m, i, o: raw.setdefault("up", o))
    fuse_down_hadamard(model)
    install_r4(model)
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 8)))
    assert getattr(down, R4_ATTR) is not None
    assert not torch.allclose(seen["x"], torch.zeros_like(seen["x"]))
    # what a later-registered hook sees is already rotated: its norm per token equals the raw input's
    act = model.get_submodule(f"{a.layers}.0.mlp").act_fn
    gate = model.get_submodule(f"{a.layers}.0.{a.gate_proj}")
    hidden = None

    def grab(m, args):
        nonlocal hidden
        hidden = args[0]

    gate.register_forward_pre_hook(grab)
    seen.clear()
    raw.clear()
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 8)))
    with torch.no_grad():
        z = act(gate(hidden)) * raw["up"]
    assert torch.allclose(seen["x"], hadamard_transform(z), atol=1e-12)


def test_r3_is_exact_and_rotates_q_k(arch):
    model, ref = pair(arch)
    install_r3(model)
    assert model.config._attn_implementation == "spikequant_eager"
    assert max_logit_diff(model, ref) <= TOL
    t = attention_transforms(model)[0]
    q, k, v = (torch.randn(1, 2, 5, model_dims(model).head_dim, dtype=torch.float64) for _ in range(3))
    q2, k2, v2 = t(q, k, v)
    assert torch.equal(q2, hadamard_transform(q)) and torch.equal(k2, hadamard_transform(k)) and v2 is v


def test_r3_through_sdpa():
    model, ref = pair("llama")
    model.config._attn_implementation = "sdpa"
    ref.config._attn_implementation = "sdpa"
    install_r3(model)
    assert model.config._attn_implementation == "spikequant_sdpa"
    assert max_logit_diff(model, ref) <= TOL


@pytest.mark.parametrize("r1", ["hadamard", "random", "none"])
def test_all_rotations_exact(arch, r1):
    model, ref = pair(arch)
    rep = rotate_model(model, RotationConfig(r1=r1, seed=5))
    assert max_logit_diff(model, ref) <= TOL
    assert rep["r1"] == r1 and "expansion" not in rep


def _rotate_with_mlp_width(arch: str, mlp: int, factor: int) -> None:
    # The MLP width's R4 Hadamard uses a stored order (Williamson 172, Baumert–Hall 156, Goethals–Seidel
    # 428), which the Paley rules alone cannot construct: no expansion, and float64 logits unchanged.
    assert factor in plan(mlp).factors
    model, ref = pair(arch, intermediate_size=mlp)
    rep = rotate_model(model, RotationConfig(seed=5))
    assert has_online_hadamard(model, "down_proj") and "expansion" not in rep
    assert max_logit_diff(model, ref) <= TOL


@pytest.mark.parametrize("mlp", [172, 344])
def test_all_rotations_exact_with_williamson_mlp_width(arch, mlp):
    _rotate_with_mlp_width(arch, mlp, 172)


@pytest.mark.parametrize("mlp", [156, 428])
def test_all_rotations_exact_with_other_stored_mlp_widths(mlp):
    _rotate_with_mlp_width("llama", mlp, mlp)


def test_generation_with_kv_cache_matches():
    model, ref = pair("qwen2")
    rotate_model(model, RotationConfig())
    ids = torch.randint(0, 96, (1, 6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_online_o_proj_hadamard_needs_both_halves(arch):
    model, ref = pair(arch)
    fuse_input_hadamard(model, "o_proj")
    assert max_logit_diff(model, ref) > 1e-3  # the fused half alone changes the model
    install_online_hadamard(model, "o_proj")
    assert has_online_hadamard(model, "o_proj") and not has_online_hadamard(model, "down_proj")
    assert max_logit_diff(model, ref) <= TOL


def test_all_rotations_with_online_o_proj_exact(arch):
    model, ref = pair(arch)
    rep = rotate_model(model, RotationConfig(seed=2, o_online=True))
    assert rep["o_online"] and has_online_hadamard(model, "o_proj")
    assert max_logit_diff(model, ref) <= TOL


def test_online_o_proj_needs_a_construction():
    model, _ = pair("llama", num_attention_heads=3, num_key_value_heads=1, head_dim=10)  # 3 x 10 = 30
    with pytest.raises(RotationError, match=r"o_proj input size \(heads x head_dim\) 30 has no Hadamard construction"):
        rotate_model(model, RotationConfig(r1="none", r2=False, r3=False, r4=False, o_online=True))
