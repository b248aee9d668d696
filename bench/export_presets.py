"""Which built-in presets export to compressed-tensors: each preset quantizes a tiny random LLaMA (spike rules
made to fire on its two largest inputs, as a tiny random model has no spikes), is saved, exported, reloaded
through transformers + compressed-tensors, and its logits compared with the fake-quant model's.

    PYTHONPATH=src python bench/export_presets.py [--presets a b ...]

Prints a markdown table: preset, outcome (the format, or the one-line refusal), max |logit difference|."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from spikequant.errors import SpikequantError
from spikequant.export import save_quantized
from spikequant.export.compressed import export_compressed
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import Recipe, list_presets, load_recipe

WINDOWS = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))


def _recipe(name: str) -> Recipe:
    d = load_recipe(name).to_dict()
    for m in d["modifiers"]:
        if m["type"] in ("spike_exempt", "random_exempt"):
            m.update(k=None, abs_threshold=1e-6, max_layers=2)
        if m["type"] == "gptq":
            m["block_size"] = 32
    return Recipe.from_dict(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    vocab = {f"t{i}": i for i in range(96)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0")
    print("| preset | export | max abs logit diff vs fake-quant |\n| --- | --- | --- |")
    for name in args.presets or [p for p in list_presets() if p != "fp"]:
        with tempfile.TemporaryDirectory() as tmp:
            model = tiny_model("llama", seed=7, hidden_size=64, intermediate_size=128)
            recipe = _recipe(name)
            qm, findings = quantize(model, recipe, WINDOWS, progress=False)
            with torch.no_grad():
                before = model(WINDOWS).logits
            save_quantized(qm, tok, recipe, "tiny", Path(tmp) / "q", findings)
            try:
                res = export_compressed(Path(tmp) / "q", Path(tmp) / "ct", progress=False, log=lambda _: None)
            except SpikequantError as e:
                print(f"| {name} | refused: {str(e).split(': ', 1)[-1]} | – |", flush=True)
                continue
            m2 = AutoModelForCausalLM.from_pretrained(Path(tmp) / "ct", dtype=torch.float32,
                                                      attn_implementation="eager")
            with torch.no_grad():
                diff = float((m2(WINDOWS).logits - before).abs().max())
            note = "; dynamic scales: see notes" if res.notes else ""
            print(f"| {name} | {res.formats}{note} | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
