"""The int8 backend: which modules it swaps, its kernels against a plain integer reference, the whole
model against the fake-quant simulation, its checkpoint, and the models it refuses."""

import copy

import pytest
import torch
from tokenizers import Tokenizer, models
from torch import nn
from transformers import PreTrainedTokenizerFast

import spikequant.backends.int8 as int8_module
from spikequant.backends import Int8BackendError, Int8Linear, convert_to_int8, load_int8, save_int8, weight_bytes
from spikequant.backends.int8 import KERNELS, onednn_input, onednn_usable
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe

WINDOWS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
EXEMPT = "model.layers.1.mlp.down_proj"
W8A8 = {"name": "w8a8-exempt", "weights": {"format": "int", "bits": 8, "granularity": "channel"},
        "inputs": {"format": "int", "bits": 8, "granularity": "tensor", "dynamic": False},
        "overrides": [{"match": EXEMPT, "weights": None, "inputs": None}]}


def _tokenizer():
    vocab = {f"t{i}": i for i in range(96)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   unk_token="t0")


def _quantized(recipe=W8A8, arch="llama", seed=7):
    model = tiny_model(arch, seed=seed)
    quantize(model, load_recipe(recipe), WINDOWS, progress=False)
    return model


def _int_reference(x: torch.Tensor, lin: Int8Linear) -> torch.Tensor:
    """The integer product in int64 (exact), then one rescale in float64."""
    qx = torch.clamp(torch.round(x.double() / lin.input_scale.double()), -128, 127).to(torch.int64)
    acc = qx.reshape(-1, lin.in_features) @ lin.weight.to(torch.int64).t()
    y = acc.double() * (lin.input_scale.double() * lin.weight_scale.double())
    if lin.bias is not None:
        y = y + lin.bias.double()
    return y.reshape(*x.shape[:-1], lin.out_features)


def test_swap_replaces_quantized_linears_and_keeps_exempt_float():
    model = _quantized()
    planned = [n for n, m in model.named_modules() if getattr(m, "spikequant_scheme", None) is not None]
    names = convert_to_int8(model)
    assert set(names) == set(planned) - {EXEMPT} and len(names) == 13
    for n in names:
        assert isinstance(model.get_submodule(n), Int8Linear)
        assert model.get_submodule(n).weight.dtype == torch.int8
    exempt = model.get_submodule(EXEMPT)
    assert type(exempt) is nn.Linear and exempt.weight.dtype == torch.float32
    assert type(model.lm_head) is nn.Linear
    # nothing of the fake-quant path is left on the swapped modules
    assert not any(hasattr(model.get_submodule(n), "input_quantizer") for n in names)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_integer_reference(kernel, bias):
    torch.manual_seed(0)
    lin = Int8Linear(40, 24, bias=bias, kernel=kernel)
    lin.weight.copy_(torch.randint(-128, 128, (24, 40), dtype=torch.int8))
    lin.weight_scale.copy_(torch.rand(24) * 0.01 + 1e-3)
    lin.input_scale.fill_(0.05)
    if bias:
        lin.bias.normal_()
    x = torch.randn(3, 7, 40) * 3  # some inputs clip at +-128 * 0.05
    ref = _int_reference(x, lin)
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    # The integer accumulation is exact in both; what is left is the float32 rescale (and, for onednn, the
    # rescale order): a few float32 ulps of the output.
    tol = 4 * torch.finfo(torch.float32).eps * ref.abs().max()
    assert float((y.double() - ref).abs().max()) <= tol


def test_kernel_error_is_caught_by_the_reference():
    """The comparison above can fail: one flipped weight moves outputs far beyond the tolerance."""
    lin = Int8Linear(16, 8, bias=False, kernel="int_mm")
    lin.weight.copy_(torch.randint(-100, 100, (8, 16), dtype=torch.int8))
    x = torch.randn(2, 16) * 20
    ref = _int_reference(x, lin)
    lin.weight[0, 0] += 1
    lin._packed = None
    assert float((lin(x).double() - ref).abs().max()) > 0.5


@pytest.mark.parametrize("usable", ["0", "1"])
def test_auto_kernel_follows_the_onednn_check(usable, monkeypatch):
    """Where oneDNN's qlinear is slow on the CPU (onednn_usable false), ``auto`` runs torch._int_mm for
    prefill-sized inputs too: no qlinear weight is packed, and the output is the int_mm module's, bit for bit."""
    monkeypatch.setenv("SPIKEQUANT_INT8_ONEDNN", usable)
    assert onednn_usable() is (usable == "1")
    auto = Int8Linear(40, 24, kernel="auto", quant="eager")
    auto.weight.copy_(torch.randint(-128, 128, (24, 40), dtype=torch.int8, generator=torch.Generator().manual_seed(2)))
    auto.weight_scale.uniform_(1e-3, 1e-2)
    auto.input_scale.fill_(0.05)
    int_mm = copy.deepcopy(auto)
    int_mm.kernel = "int_mm"
    x = torch.randn(2, 20, 40) * 3  # 40 tokens: above AUTO_SMALL_M, where auto would pick qlinear
    y = auto(x)
    assert ("w" in auto._pack()) is (usable == "1")
    if usable == "0":
        assert torch.equal(y, int_mm(x))


def test_onednn_check_is_decided_once(monkeypatch):
    monkeypatch.delenv("SPIKEQUANT_INT8_ONEDNN", raising=False)
    monkeypatch.setattr(int8_module, "_ONEDNN_INPUT", None)
    first = int8_module._onednn_timing()
    assert first in ("s8", "u8", "none") and first == int8_module._ONEDNN_INPUT
    assert onednn_usable() is (first == "s8") and onednn_input() == ("u8" if first == "u8" else "s8")
    monkeypatch.setattr(torch, "_int_mm", None)  # a second timing would fail: the first answer is kept
    assert int8_module._onednn_timing() == first
    for forced, usable, kind in (("0", False, onednn_input()), ("1", True, onednn_input()), ("s8", True, "s8"),
                                 ("u8", True, "u8")):
        monkeypatch.setenv("SPIKEQUANT_INT8_ONEDNN", forced)
        assert (onednn_usable(), onednn_input()) == (usable, kind)
    monkeypatch.setenv("SPIKEQUANT_INT8_ONEDNN", "maybe")
    with pytest.raises(Int8BackendError, match="SPIKEQUANT_INT8_ONEDNN='maybe'"):
        onednn_usable()


@pytest.mark.parametrize("kind", ["s8", "u8"])
def test_onednn_input_types_give_the_int_mm_integers(kind, monkeypatch):
    """qlinear fed the int8 tensor as it is (s8) or shifted to uint8 with zero point 128 (u8) computes the same
    integer product as torch._int_mm, on inputs that reach -128 and 127: after the same rescale the outputs
    agree to float32 rounding (the rescale is fused in oneDNN, a separate multiply after _int_mm)."""
    monkeypatch.setenv("SPIKEQUANT_INT8_ONEDNN", kind)
    gen = torch.Generator().manual_seed(4)
    lin = Int8Linear(64, 48, kernel="onednn", quant="eager")
    lin.weight.copy_(torch.randint(-128, 128, (48, 64), dtype=torch.int8, generator=gen))
    lin.weight_scale.uniform_(1e-3, 1e-2, generator=gen)
    lin.input_scale.fill_(0.05)
    qx = torch.randint(-128, 128, (40, 64), dtype=torch.int8, generator=gen)
    qx[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    y = lin.forward_int8(qx, torch.float32)
    assert lin._pack()["x_kind"] == kind
    exact = (qx.long() @ lin.weight.long().t()).double() * 0.05 * lin.weight_scale.double()
    assert float((y.double() - exact).abs().max() / exact.abs().max()) < 1e-6


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_model_matches_fake_quant(arch, kernel):
    model = _quantized(arch=arch)
    with torch.no_grad():
        fake = model(WINDOWS).logits
        int8 = copy.deepcopy(model)
        convert_to_int8(int8, kernel)
        real = int8(WINDOWS).logits
    # Both models compute the same integer products; the fake path adds float32 accumulation error
    # (~1e-7 relative), which can flip the rounding of an activation that sits on a .5 boundary, i.e. one
    # input step (1/127 of the scale) on rare elements. 1e-3 of the logit range allows a few such flips and
    # is ~100x below what a wrong scale or grid produces (see the next test).
    err = float((real - fake).abs().max() / fake.abs().max())
    assert err < 1e-3, err
    assert torch.equal(real.argmax(-1), fake.argmax(-1)) or err < 1e-5


def test_wrong_rescale_is_visible_in_logits():
    model = _quantized()
    with torch.no_grad():
        fake = model(WINDOWS).logits
        convert_to_int8(model)
        # a rescale 10 % off on one linear (as a kernel applying the wrong scale would be)
        model.model.layers[0].mlp.up_proj.weight_scale.mul_(1.1)
        model.model.layers[0].mlp.up_proj._packed = None
        real = model(WINDOWS).logits
    assert float((real - fake).abs().max() / fake.abs().max()) > 1e-2


def test_bf16_activations_stay_close():
    model = _quantized()
    with torch.no_grad():
        fake = model(WINDOWS).logits
        convert_to_int8(model, dtype=torch.bfloat16)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        assert model.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
        real = model(WINDOWS).logits.float()
    assert float((real - fake).abs().max() / fake.abs().max()) < 5e-2


@pytest.mark.parametrize("preset, needle", [
    ("w8a8-tensor", "dynamic"),                 # dynamic per-tensor activations
    ("w8a8-token", "dynamic"),                  # per-token
    ("spike-w8a8-tensor-static-outliers", "tokens kept out"),
    ("quarot-rtn-w4a4kv4", "online"),           # rotations, 4-bit
])
def test_unsupported_models_fail_with_one_line_and_stay_unchanged(preset, needle):
    model = _quantized(preset)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(Int8BackendError) as e:
        convert_to_int8(model)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_float_model_is_refused():
    with pytest.raises(Int8BackendError, match="no quantized linears"):
        convert_to_int8(tiny_model("llama"))


def test_w4_weights_are_refused():
    recipe = {**W8A8, "name": "w4a8", "weights": {"format": "int", "bits": 4, "granularity": "channel"}}
    with pytest.raises(Int8BackendError, match="int4-channel"):
        convert_to_int8(_quantized(recipe))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied embeddings and q/k/v biases
def test_int8_checkpoint_roundtrip(tmp_path, arch):
    model = _quantized(arch=arch)
    convert_to_int8(model)
    with torch.no_grad():
        before = model(WINDOWS).logits
    save_int8(model, _tokenizer(), tmp_path / "i8", "tiny")
    loaded, tok, manifest = load_int8(tmp_path / "i8")
    with torch.no_grad():
        after = loaded(WINDOWS).logits
    assert torch.equal(before, after)
    assert len(manifest["int8_linears"]) == 13
    assert weight_bytes(loaded) == weight_bytes(model)
    # the int8 linears are stored as int8 on disk
    from safetensors import safe_open

    with safe_open(str(tmp_path / "i8" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() in ("I8", "int8")


def test_weight_bytes_shrink():
    model = _quantized()
    fp = weight_bytes(model)
    convert_to_int8(model)
    # 13 of 14 decoder linears go from 4 bytes to 1 (+ a float32 scale per row); embeddings stay float32
    assert weight_bytes(model) < fp


def test_bf16_cast_keeps_tied_embeddings_tied(tmp_path):
    model = _quantized(arch="qwen2")  # tied embeddings
    convert_to_int8(model)
    save_int8(model, _tokenizer(), tmp_path / "i8", "tiny")
    loaded, _, _ = load_int8(tmp_path / "i8", dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    save_int8(loaded, _tokenizer(), tmp_path / "b", "tiny")
    again, _, _ = load_int8(tmp_path / "b")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert again.lm_head.weight.dtype == torch.bfloat16


def test_compiled_input_quantization_equals_eager():
    """The fused (torch.compile) quantizer takes the same rounding decisions as the four eager ops, also on
    values that lie exactly on a rounding boundary and beyond the int8 range, in float32 and bfloat16."""
    from spikequant.backends.int8 import _compiled_quantize, _quantize_input

    fn = _compiled_quantize()
    if fn is None:
        pytest.skip("torch.compile does not work on this machine (no C++ compiler): eager ops are used")
    scale = torch.tensor(0.173)
    g = torch.Generator().manual_seed(3)
    ties = (torch.arange(-144, 144, dtype=torch.float32) + 0.5) * scale  # k + 1/2 steps: round-half-even
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.cat([torch.randn(37, 96, generator=g) * 12, ties.reshape(-1, 96)]).to(dtype)
        assert torch.equal(fn(x, scale), _quantize_input(x, scale))


def test_shared_input_groups_quantize_once_and_give_the_same_logits(monkeypatch):
    from spikequant.backends import int8 as int8_module

    model = _quantized()
    unshared = copy.deepcopy(model)
    convert_to_int8(model)
    convert_to_int8(unshared)
    for m in unshared.modules():
        if isinstance(m, Int8Linear):
            m.shared = None
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared is not None
    assert mlp.gate_proj.shared is mlp.up_proj.shared is not None and attn.o_proj.shared is None
    calls = []
    orig = int8_module._quantize_input

    def counting(x, s):
        calls.append(x.shape)
        return orig(x, s)

    with monkeypatch.context() as m:
        m.setattr(int8_module, "_quantize_input", counting)
        with torch.no_grad():
            model(WINDOWS[:1, :8])
    # per layer: q/k/v once, o once, gate/up once, down once (the exempt down_proj of layer 1 is float)
    n_layers = len(model.model.layers)
    assert len(calls) == 4 * n_layers - 1
    with torch.no_grad():
        assert torch.equal(model(WINDOWS).logits, unshared(WINDOWS).logits)


def test_shared_input_is_not_reused_for_another_or_modified_tensor():
    model = _quantized()
    convert_to_int8(model, quant="eager")
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 5, attn.q_proj.in_features)
    with torch.no_grad():
        attn.q_proj(x)
        y = x.clone()
        y[0, 0, 0] += 100.0
        assert torch.equal(attn.k_proj(y), Int8Linear.forward(_unshared(attn.k_proj), y))
        x.mul_(2.0)  # in place: the version counter moves, the cached int8 input is stale
        assert torch.equal(attn.v_proj(x), Int8Linear.forward(_unshared(attn.v_proj), x))


def _unshared(lin: Int8Linear) -> Int8Linear:
    other = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, lin.kernel, lin.quant)
    other.load_state_dict(lin.state_dict())
    assert other.shared is None
    return other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_norm_and_mlp_equal_the_unfused_modules(arch, dtype, monkeypatch):
    """Prefill-sized inputs (32 tokens here) go through the fused norm + quantization and SiLU-product +
    quantization loops: the logits equal those of the same int8 model running the HF modules' own
    forwards, bit for bit; the MLP with a float (exempt) down_proj is left as it was."""
    from spikequant.backends.int8 import Int8GatedMLP, Int8QuantNorm, _compiled_norm_quantize, _compiled_swiglu_quantize

    if _compiled_norm_quantize() is None or _compiled_swiglu_quantize() is None:
        pytest.skip("torch.compile does not work on this machine (no C++ compiler): nothing is fused")
    from spikequant.backends import int8 as int8_module

    model = _quantized(arch=arch)
    plain = copy.deepcopy(model)
    with monkeypatch.context() as m:
        m.setattr(int8_module, "fuse_mlps", lambda model: 0)
        m.setattr(int8_module, "fuse_norms", lambda model: 0)
        convert_to_int8(plain, dtype=dtype)
    convert_to_int8(model, dtype=dtype)
    layers = model.model.layers
    assert isinstance(layers[0].mlp, Int8GatedMLP) and not isinstance(layers[1].mlp, Int8GatedMLP)
    assert all(isinstance(layer.input_layernorm, Int8QuantNorm) for layer in layers)
    assert all(isinstance(layer.post_attention_layernorm, Int8QuantNorm) for layer in layers)
    assert list(model.state_dict()) == list(plain.state_dict())  # the checkpoint does not change
    unfused = copy.deepcopy(model)
    for m in unfused.modules():
        if isinstance(m, Int8GatedMLP | Int8QuantNorm):
            m.forward = m.unfused_forward
    calls = []
    orig = Int8Linear.quantize_input
    with torch.no_grad():
        try:
            Int8Linear.quantize_input = lambda self, x: calls.append(1) or orig(self, x)
            fused_logits = model(WINDOWS).logits
            n_fused = len(calls)
            calls.clear()
            plain_logits = unfused(WINDOWS).logits
        finally:
            Int8Linear.quantize_input = orig
    assert torch.equal(fused_logits, plain_logits)
    with torch.no_grad():
        assert torch.equal(plain(WINDOWS).logits, plain_logits)
    # every fused MLP (all layers but the exempt one) skips down_proj's quantize_input call
    assert n_fused == len(calls) - (len(layers) - 1)


def _compile_works() -> bool:
    from spikequant.backends.int8 import _compiled_quantize

    return _compiled_quantize() is not None


@pytest.mark.parametrize("onednn", ["s8", "u8", "0"])
def test_whole_model_compiled_matches_eager(onednn, monkeypatch):
    """compile_model traces every int8 linear whole (fullgraph: no graph break, so the traced path is what
    runs): oneDNN's qlinear under freezing for prefill-sized inputs (seen in the profile) where the CPU
    check allows it, else _int_mm (no qlinear call); _int_mm for a few tokens; the logits are the eager int8
    model's up to float rounding, the greedy tokens the same."""
    from torch.profiler import ProfilerActivity, profile

    from spikequant.backends import compile_model

    if not _compile_works():
        pytest.skip("torch.compile does not work on this machine (no C++ compiler)")
    monkeypatch.setenv("SPIKEQUANT_INT8_ONEDNN", onednn)
    model = _quantized()
    convert_to_int8(model)
    small = WINDOWS[:1, :1]  # one token (a decode step): the _int_mm path
    with torch.no_grad():
        eager = [model(x, use_cache=False).logits for x in (WINDOWS, small)]
        compiled = compile_model(model, fullgraph=True)
        traced = [compiled(x, use_cache=False).logits for x in (WINDOWS, small)]
        with profile(activities=[ProfilerActivity.CPU]) as p:
            compiled(WINDOWS, use_cache=False)
    ops = {e.key: e.count for e in p.key_averages()}
    # the 13 int8 linears, none eager; or none at all where qlinear is not to be used
    assert ops.get("onednn::qlinear_pointwise", 0) == (0 if onednn == "0" else 13), ops
    for e, t in zip(eager, traced, strict=True):
        err = float((t - e).abs().max() / e.abs().max())
        assert err < 1e-3, err
        assert float((t.argmax(-1) == e.argmax(-1)).float().mean()) > 0.99


def test_traced_int8_linear_needs_preparing():
    model = _quantized()
    convert_to_int8(model)
    lin = model.model.layers[0].self_attn.q_proj
    with pytest.raises(Int8BackendError, match="compile_model or prepare_traced"):
        lin._traced_forward(torch.randn(3, lin.in_features))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied embeddings
def test_embeddings_stored_apart_in_bf16(tmp_path, arch):
    """store_embeddings keeps the table and lm_head in bfloat16 and the rest in float32: the weights shrink
    by exactly the table's two bytes per value, the logits stay float32 and move only by the table's
    rounding, a tied table stays tied, and the checkpoint keeps it so (same logits after reloading)."""
    from spikequant.backends import store_embeddings
    from spikequant.backends.int8 import activation_dtype

    model = _quantized(arch=arch)
    convert_to_int8(model)
    with torch.no_grad():
        ref = model(WINDOWS).logits
    before = weight_bytes(model)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    tables = {id(model.lm_head.weight): model.lm_head.weight.numel(),
              id(model.model.embed_tokens.weight): model.model.embed_tokens.weight.numel()}
    store_embeddings(model, torch.bfloat16, torch.float32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied == (arch == "qwen2")
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32 and activation_dtype(model) == torch.float32
    assert before - weight_bytes(model) == 2 * sum(tables.values())
    with torch.no_grad():
        out = model(WINDOWS).logits
    assert out.dtype == torch.float32
    err = float((out - ref).abs().max() / ref.abs().max())
    assert 1e-5 < err < 3e-2, err  # bfloat16's rounding is visible, and small
    save_int8(model, _tokenizer(), tmp_path / "i8", "tiny")
    loaded, _, manifest = load_int8(tmp_path / "i8")
    assert (manifest["dtype"], manifest["embedding_dtype"]) == ("float32", "bfloat16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(WINDOWS).logits, out)
    # asked for float32 tables: the bfloat16 values in float32, no casts left
    back, _, _ = load_int8(tmp_path / "i8", embedding_dtype=torch.float32)
    assert back.model.embed_tokens.weight.dtype == torch.float32
    store_embeddings(model, torch.float32, torch.float32)  # and on the model itself: the hooks go
    with torch.no_grad():
        assert torch.equal(back(WINDOWS).logits, model(WINDOWS).logits)


def test_attention_implementation_is_switched_for_the_block_only():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from spikequant.backends.int8 import attention_implementation
    from spikequant.errors import SpikequantError

    model = _quantized()
    convert_to_int8(model)
    before = model.config._attn_implementation
    seen = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
    try:
        with torch.no_grad():
            plain = model(WINDOWS).logits
            with attention_implementation(model, "sdpa"):
                assert model.config._attn_implementation == "sdpa"
                switched = model(WINDOWS).logits
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
    assert before != "sdpa" and len(seen) == 2  # both layers ran the switched-to attention
    assert model.config._attn_implementation == before
    assert float((switched - plain).abs().max() / plain.abs().max()) < 1e-5
    with pytest.raises(SpikequantError, match="unknown attention implementation 'flash'"), \
            attention_implementation(model, "flash"):
        pass
    model.config._attn_implementation = "spikequant_sdpa"
    with pytest.raises(SpikequantError, match="KV-cache quantization"), attention_implementation(model, "sdpa"):
        pass


def test_compiled_model_fails_loudly_past_the_recompile_limit(monkeypatch):
    """Past dynamo's recompile limit a frame would silently run eagerly (other roundings, other speed) while
    being reported as compiled: a CompiledModel raises instead."""
    from spikequant.backends import compile_model

    if not _compile_works():
        pytest.skip("torch.compile does not work on this machine (no C++ compiler)")
    monkeypatch.setattr(int8_module, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    torch._dynamo.reset()
    compiled = compile_model(tiny_model("llama", seed=5))
    with torch.no_grad():
        compiled(WINDOWS[:, :8], use_cache=False)
        with pytest.raises(Exception, match="recompile_limit"):
            compiled(WINDOWS[:, :9], use_cache=False)  # a second shape: a second graph of the same frame
    torch._dynamo.reset()
