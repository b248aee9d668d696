"""Tiny random models of every supported architecture, built locally (no hub access).

Used by the unit tests and handy for trying a recipe in seconds.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(arch: str = "llama", **overrides: object) -> PretrainedConfig:
    """A small config of ``arch`` with GQA (4 heads, 2 KV heads) unless overridden."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    base: dict[str, object] = dict(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    if arch == "qwen2":
        base["tie_word_embeddings"] = True  # as the small Qwen2.5 checkpoints
    if arch == "qwen3":
        base["head_dim"] = 16
    base.update(overrides)
    cfg = classes[arch](**base)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object):
    """A randomly initialised tiny model; norm weights are randomised too so fusions are exercised."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.to(dtype).eval()
