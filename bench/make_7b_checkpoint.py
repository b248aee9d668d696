"""Write a random Llama-2-7B-shaped checkpoint (bf16 safetensors, one shard per decoder layer) for the
streaming benchmark (docs/scale.md).

Shapes are Llama-2-7B's: hidden 4096, MLP 11008, 32 heads (no GQA), vocab 32000, RMSNorm eps 1e-5, RoPE
theta 10000. The weights are random (normal, std 0.02; norms 1): the benchmark measures memory and time,
not quality. The shards of the largest ``--layers`` value are written once under ``OUTPUT/shards``;
each ``OUTPUT/L<n>`` is a complete Hugging Face directory (config, tokenizer, index) whose index points
at the first n layer shards (symbolic links), so 4/8/16/32 layers cost the disk space of 32.

No Llama-2 tokenizer is available offline here, so a byte-level BPE tokenizer with 32000 entries is trained
on WikiText-2 validation text (seconds; deterministic), which keeps every token id inside the vocabulary.

    python bench/make_7b_checkpoint.py --output /work/bigtmp/llama7b --layers 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, MLP, HEADS, VOCAB = 4096, 11008, 32, 32000


def config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": MLP, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "num_hidden_layers": layers, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "attention_bias": False,
        "mlp_bias": False,
    }


def layer_tensors(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    shapes = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
              "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
              "mlp.gate_proj.weight": (MLP, HIDDEN), "mlp.up_proj.weight": (MLP, HIDDEN),
              "mlp.down_proj.weight": (HIDDEN, MLP)}
    out = {p + k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    out[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    out[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    return out


def train_tokenizer(data_dir: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(data_dir / "wikitext-2" / "wiki.valid.tokens")], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--data-dir", default=os.environ.get("SPIKEQUANT_DATA_DIR", "../shared/data"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.output)
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(Path(args.data_dir), tok_dir)
    gen = torch.Generator().manual_seed(args.seed)
    ends = shards / "ends.safetensors"
    if not ends.exists():
        save_file({"model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).bfloat16(),
                   "lm_head.weight": (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).bfloat16(),
                   "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}, str(ends),
                  metadata={"format": "pt"})
    for i in range(max(args.layers)):
        path = shards / f"layer-{i:05d}.safetensors"
        if not path.exists():  # each layer from its own seed: an interrupted run continues where it stopped
            tensors = layer_tensors(i, torch.Generator().manual_seed(args.seed * 1000 + i + 1))
            save_file(tensors, str(path.with_suffix(".tmp")), metadata={"format": "pt"})
            path.with_suffix(".tmp").rename(path)
        print(f"layer {i} written ({time.perf_counter() - t0:.0f} s)", flush=True)
    from safetensors import safe_open

    for n in args.layers:
        d = out / f"L{n}"
        d.mkdir(exist_ok=True)
        weight_map: dict[str, str] = {}
        total = 0
        for name in ["ends"] + [f"layer-{i:05d}" for i in range(n)]:
            link = d / f"{name}.safetensors"
            if not link.exists():
                link.symlink_to(Path("..") / "shards" / f"{name}.safetensors")
            with safe_open(str(link), "pt") as f:
                for k in f.keys():  # noqa: SIM118 (a safetensors handle is not a mapping)
                    weight_map[k] = link.name
                    sl = f.get_slice(k)
                    numel = 1
                    for s in sl.get_shape():
                        numel *= s
                    total += 2 * numel
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (d / "config.json").write_text(json.dumps(config(n), indent=1))
        for f in tok_dir.iterdir():
            target = d / f.name
            if not target.exists():
                target.write_bytes(f.read_bytes())
        print(f"{d}: {n} layers, {total / 2**30:.2f} GiB of bf16 weights")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
