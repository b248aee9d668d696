"""How far float rounding alone moves a quantized model's perplexity, next to the int8 backend's.

Evaluates the fake-quant model of a ``spikequant quantize`` folder with ``sdpa`` and with ``eager``
attention (the same maths, rounded in a different order) and the int8 backend of the same folder, on the
same windows, in one process (and the int8 backend with the other attention as well):

    PYTHONPATH=src python bench/int8_rounding_check.py /tmp/q8 --data-dir /work/shared/data --windows 2
"""

from __future__ import annotations

import argparse
import copy

import torch

from spikequant.backends import convert_to_int8
from spikequant.data import eval_windows, load_text, tokenize
from spikequant.eval.perplexity import evaluate
from spikequant.export import load_quantized


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quantized")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded, _, _, _ = load_quantized(args.quantized, "float32", "cpu")
    fake = loaded.model
    text = load_text("wikitext2", "test", args.data_dir)
    w = eval_windows(tokenize(loaded.tokenizer, text), args.seqlen, args.windows)
    impl = fake.config._attn_implementation
    print(f"fake-quant, {impl}: PPL {evaluate(fake, w, progress=False).ppl:.4f}", flush=True)
    int8 = copy.deepcopy(fake)
    convert_to_int8(int8)
    fake.config._attn_implementation = "eager" if impl != "eager" else "sdpa"
    print(f"fake-quant, {fake.config._attn_implementation}: PPL {evaluate(fake, w, progress=False).ppl:.4f}")
    print(f"int8 backend, {impl}: PPL {evaluate(int8, w, progress=False).ppl:.4f}", flush=True)
    int8.config._attn_implementation = fake.config._attn_implementation
    print(f"int8 backend, {int8.config._attn_implementation}: PPL {evaluate(int8, w, progress=False).ppl:.4f}")


if __name__ == "__main__":
    main()
