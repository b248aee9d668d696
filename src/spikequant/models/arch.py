"""Architecture knowledge as data.

Every method looks up module names through an :class:`ArchSpec` instead of hard-coding
``model.model.layers[i].mlp``. Adding an architecture means adding one entry to ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from spikequant.errors import UnsupportedArchitectureError

# The seven decoder linears by role, in forward order (every family here names its modules by these roles).
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one Hugging Face causal-LM class (paths are dotted attribute paths)."""

    name: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    # Paths below are relative to one decoder layer.
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    act_fn: str = "mlp.act_fn"  # the gated MLP's activation module
    attn: str = "self_attn"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    q_norm: str | None = None
    k_norm: str | None = None
    qkv_bias: bool = False  # whether the family has q/k/v biases by default
    # Structure: the MLP is gated (down(act(gate(x)) * up(x))); all four families here are.
    gated_mlp: bool = True

    def layer_path(self, i: int) -> str:
        """Full module path of decoder layer ``i``."""
        return f"{self.layers}.{i}"

    def linear_name(self, i: int, role: str) -> str:
        """Full module name of the ``role`` linear (``q_proj`` ... ``down_proj``) of layer ``i``."""
        return f"{self.layers}.{i}.{self.linear_roles[role]}"

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears of a layer that read the same input, in forward order (layer-relative paths): each
        group shares one input tensor, so one Hessian (GPTQ) or one activation statistic serves it."""
        return ((self.q_proj, self.k_proj, self.v_proj), (self.o_proj,), (self.gate_proj, self.up_proj),
                (self.down_proj,))

    @property
    def fused_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears that serving engines (vLLM, TensorRT-LLM) fuse into one matmul (roles): every shard of
        such a group must share one precision and one input quantizer to be servable."""
        return (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

    def gptq_steps(self, true_sequential: bool) -> list[list[tuple[str, ...]]]:
        """GPTQ's calibration steps of one layer, each a list of input groups. True-sequential: one step
        per input, so later linears see the quantized output of earlier ones (as GPTQ and QuaRot run);
        otherwise all groups in one step on the float layer."""
        groups = list(self.input_groups)
        return [[g] for g in groups] if true_sequential else [groups]

    @property
    def linear_roles(self) -> dict[str, str]:
        """Role name -> path (relative to a layer) of the seven decoder linears, in forward order."""
        return {role: getattr(self, role) for role in ROLES}

    @property
    def norm_consumers(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Each per-layer norm with the linears that read its output (paths relative to a layer), in
        forward order: the residual stream's readers inside a decoder layer."""
        return ((self.input_norm, (self.q_proj, self.k_proj, self.v_proj)),
                (self.post_attn_norm, (self.gate_proj, self.up_proj)))

    @property
    def residual_readers(self) -> tuple[str, ...]:
        """Linears of a layer whose input is (a normalized copy of) the residual stream."""
        return tuple(p for _, consumers in self.norm_consumers for p in consumers)

    @property
    def residual_writers(self) -> tuple[str, ...]:
        """Linears of a layer whose output is added to the residual stream."""
        return (self.o_proj, self.down_proj)


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(name="llama"),
    "MistralForCausalLM": ArchSpec(name="mistral"),
    "Qwen2ForCausalLM": ArchSpec(name="qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": ArchSpec(name="qwen3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
}


def get_arch(model: nn.Module) -> ArchSpec:
    """Return the :class:`ArchSpec` of ``model`` or fail naming the class and the supported ones."""
    cls = type(model).__name__
    try:
        return ARCHITECTURES[cls]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported model class {cls}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


@dataclass(frozen=True)
class ModelDims:
    """Sizes read from a model config, independent of how the family names them."""

    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool


def model_dims(model: nn.Module) -> ModelDims:
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelDims(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=cfg.vocab_size,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, get_arch(model).layers)  # type: ignore[return-value]


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Full module name -> nn.Linear for every decoder linear (q/k/v/o/gate/up/down of every layer)."""
    arch = get_arch(model)
    out: dict[str, nn.Linear] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for rel in arch.linear_roles.values():
            out[f"{arch.layer_path(i)}.{rel}"] = get_module(layer, rel)  # type: ignore[assignment]
    return out


def linear_role(model: nn.Module, name: str) -> tuple[int, str] | None:
    """(layer index, role) of a decoder linear's full name, or None for other modules."""
    arch = get_arch(model)
    prefix = arch.layers + "."
    if not name.startswith(prefix):
        return None
    idx, _, rel = name[len(prefix) :].partition(".")
    for role, path in arch.linear_roles.items():
        if rel == path:
            return int(idx), role
    return None
