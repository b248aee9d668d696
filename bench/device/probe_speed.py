"""Time one fake-quantized forward of the model (the cost of one GBS exact-mode probe) on the device at
hand, for sizing the searches of bench/device/real_model.sh; prints one JSON line.

    python bench/device/probe_speed.py --model M --recipe quarot-rtn-w4a4kv4 --data-dir D --shape 2 2048
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="quarot-rtn-w4a4kv4")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--shape", type=int, nargs=2, action="append", help="windows seqlen (repeatable)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from spikequant.data import calibration_windows, load_text, tokenize
    from spikequant.models.loading import load_model
    from spikequant.pipeline import quantize
    from spikequant.recipes import load_recipe

    loaded = load_model(args.model, "float32", args.device)
    model, dev = loaded.model, next(loaded.model.parameters()).device
    ids = tokenize(loaded.tokenizer, load_text("wikitext2", "validation", args.data_dir))
    recipe = load_recipe(args.recipe)
    quantize(model, recipe, lambda: calibration_windows(ids, recipe.calibration.seqlen,
                                                        recipe.calibration.num_samples, recipe.seed), progress=False)
    out = {"device": str(dev), "name": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
           "recipe": args.recipe, "torch": torch.__version__, "layers": model.config.num_hidden_layers, "ms": {}}
    for n, s in args.shape or [(1, 512), (2, 2048)]:
        x = ids[: n * s].reshape(n, s).to(dev)
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                model(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        out["ms"][f"{n}x{s}"] = round(1000 * sorted(times[1:])[len(times[1:]) // 2], 2)  # median, warm-up dropped
    print(json.dumps(out))


if __name__ == "__main__":
    main()
