"""Rotation presets on one model in one process: PPL, KL, top-1 and wall times per recipe.

The model is loaded and the FP reference pass computed once; each recipe quantizes a fresh copy.
``--expand hidden=64,mlp=0`` adds a variant of every rotating recipe with that expansion (repeatable).

    python bench/bench_rotation.py --data-dir ../shared/data --recipes fp norot-w4a4kv4 quarot-rtn-w4a4kv4 \
        [--expand hidden=64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import model_data_args
from spikequant.pipeline import Session
from spikequant.recipes import Recipe, load_recipe
from spikequant.reports import result_row


def with_expansion(recipe: Recipe, expand: dict[str, int]) -> Recipe:
    data = recipe.to_dict()
    for m in data["modifiers"]:
        if m["type"] == "rotate":
            m["expand"] = dict(expand)
    data["name"] = recipe.name + "+" + ",".join(f"{k}{v:+d}" for k, v in expand.items())
    return load_recipe(data)


def parse_expand(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = int(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_data_args(ap)
    ap.add_argument("--recipes", nargs="+", required=True)
    ap.add_argument("--expand", action="append", default=[], help="e.g. hidden=64 or hidden=64,mlp=512")
    ap.add_argument("--only-expanded", action="store_true", help="run only the expanded variants")
    ap.add_argument("--no-kl", action="store_true", help="skip the FP reference pass (PPL only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    recipes = []
    for name in args.recipes:
        r = load_recipe(name)
        if not args.only_expanded:
            recipes.append(r)
        if any(m.type == "rotate" for m in r.modifiers):
            recipes += [with_expansion(r, parse_expand(e)) for e in args.expand]
    session = Session(model_source=args.model, data_dir=args.data_dir, seqlen=args.seqlen,
                      max_windows=args.max_windows, kl=not args.no_kl, progress=not args.no_progress)
    t = time.perf_counter()
    session.load()
    if not args.no_kl:
        session.reference()
    print(f"load + reference pass: {time.perf_counter() - t:.1f} s, torch threads {torch.get_num_threads()}",
          flush=True)
    rows = []
    print("| recipe | PPL | KL | top-1 | quantize s | eval s | hidden | mlp |", flush=True)
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for r in recipes:
        rep, _ = session.run(r)
        rot = ((rep.get("quantization") or {}).get("findings") or {}).get("rotation") or {}
        row = {**result_row(rep), "quantize_s": rep["timings"]["quantize_s"], "eval_s": rep["timings"]["eval_s"],
               "hidden": rot.get("hidden"), "mlp": rot.get("mlp"), "expansion": rot.get("expansion")}
        rows.append(row)
        kl, top1 = ("-", "-") if row["kl"] is None else (f"{row['kl']:.3f}", f"{row['top1']:.3f}")
        print(f"| {r.name} | {row['ppl']:.2f} | {kl} | {top1} | {row['quantize_s']:.0f} | "
              f"{row['eval_s']:.0f} | {row['hidden'] or '-'} | {row['mlp'] or '-'} |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
