"""Streamed quantization and perplexity on a 7B-shaped checkpoint: peak RSS and wall time per layer count.

Each measurement is one ``spikequant`` command in a child process (``--offload disk``); its peak RSS is
the child's own ``ru_maxrss`` (``os.wait4``), its wall time and CPU time (user + system) the child's.
Checkpoints come from ``bench/make_7b_checkpoint.py`` (``ROOT/L<n>``); quantized outputs go to ``--work``
and are deleted after their perplexity is measured. Writes ``--json`` after every measurement and prints
a markdown table.

    python bench/make_7b_checkpoint.py --output /work/bigtmp/llama7b --layers 4 8 16 32
    python bench/bench_streaming.py --root /work/bigtmp/llama7b --work /work/bigtmp/q --layers 4 8 16 \
        --data-dir ../shared/data --json docs/scale-runs/streaming-7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPES = ("bench/recipes/spike-w8a8-tensor-static-2x512.yaml", "quarot-rtn-w4a4kv4")


def run(cmd: list[str]) -> dict:
    t = time.perf_counter()
    p = subprocess.Popen(cmd)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}")
    # CPU seconds too: on a shared machine the wall time moves with the other jobs' load.
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--data-dir", default=os.environ.get("SPIKEQUANT_DATA_DIR", "../shared/data"))
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--json", default="docs/scale-runs/streaming-7b.json")
    args = ap.parse_args()
    exe = [sys.executable, "-m", "spikequant.cli"]
    rows: list[dict] = []
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with open("/proc/loadavg") as f:
        start_load = f.read().split()[:3]
    for n in args.layers:
        model = str(Path(args.root) / f"L{n}")
        for recipe in args.recipes:
            out = Path(args.work) / f"{Path(recipe).stem}-L{n}"
            shutil.rmtree(out, ignore_errors=True)
            r = run([*exe, "quantize", "--model", model, "--recipe", recipe, "--output", str(out), "--offload",
                     "disk", "--data-dir", args.data_dir, "--no-progress"])
            rows.append({"layers": n, "what": f"quantize {Path(recipe).stem}", **r})
            print(rows[-1], flush=True)
            if recipe == args.recipes[0]:
                r = run([*exe, "eval", "--model", str(out), "--offload", "disk", "--no-kl", "--data-dir",
                         args.data_dir, "--seqlen", str(args.seqlen), "--max-windows", str(args.eval_windows),
                         "--no-progress", "--json", str(out / "eval.json")])
                ppl = json.loads((out / "eval.json").read_text())["ppl"]
                rows.append({"layers": n, "what": f"eval {Path(recipe).stem} ({args.eval_windows}x{args.seqlen}, "
                             "streamed)", "ppl": ppl, **r})
                print(rows[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
            with open("/proc/loadavg") as f:
                load = f.read().split()[:3]
            out_json.write_text(json.dumps({"rows": rows, "load_start": start_load, "load_now": load}, indent=1))
    print("\n| layers | step | wall s | s / layer | peak RSS GiB |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        per_layer = r['wall_s'] / r['layers']
        print(f"| {r['layers']} | {r['what']} | {r['wall_s']} | {per_layer:.1f} | {r['peak_rss_gib']} |")


if __name__ == "__main__":
    main()
