"""Candidate int8 linear kernels on this CPU, against fp32 and bf16, on SmolLM2-135M's linear shapes.

Each candidate computes y = dequant(int8(x) @ int8(W)^T) for a static per-tensor activation scale and
per-row weight scales (what ``spike-w8a8-tensor-static`` produces); the time includes quantizing the
float input and dequantizing the output, as the backend does. Prints a markdown table of microseconds per
call and the speedup against fp32 and bf16, all measured in one process.

    python bench/bench_int8_kernels.py --tokens 1 8 512 4096 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# (out_features, in_features) of SmolLM2-135M's decoder linears: q/o, k/v, gate/up, down.
SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up_proj": (1536, 576),
          "down_proj": (576, 1536)}


def timeit(fn: Callable[[], object], repeats: int, min_time: float = 0.05) -> float:
    """Median over ``repeats`` of the mean time of a batch of calls lasting >= ``min_time`` seconds."""
    fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= min_time:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


def quantize_act(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.clamp(torch.round(x * (1.0 / scale)), -128, 127).to(torch.int8)


def candidates(w: torch.Tensor, b: torch.Tensor, x_scale: float) -> dict[str, Callable[[torch.Tensor], object]]:
    w_scale = w.abs().amax(1) / 127
    wq = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
    w_bf16, b_bf16 = w.bfloat16(), b.bfloat16()
    wq_t = wq.t().contiguous()
    packed = torch.ops.onednn.qlinear_prepack(wq, None)
    zeros = torch.zeros_like(w_scale, dtype=torch.int64)
    deq = (x_scale * w_scale).float()

    def int_mm(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        return torch._int_mm(quantize_act(x2, x_scale), wq_t).float() * deq + b

    def onednn(x: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(quantize_act(x, x_scale), x_scale, 0, packed, w_scale, zeros, b,
                                                  1.0, 0, out_dtype, "none", [], "")

    out = {
        "fp32": lambda x: F.linear(x, w, b),
        "bf16": lambda x: F.linear(x.bfloat16(), w_bf16, b_bf16),  # the cast is in the bf16 model's input already
        "int8 _int_mm + dequant": int_mm,
        "int8 onednn qlinear (fp32 out)": onednn,
        # the int8 backend with bf16 activations between the int8 linears (as the bf16 model has)
        "int8 onednn qlinear (bf16 in/out)": lambda x: onednn(x, torch.bfloat16),
        "int8 _int_mm + dequant (bf16 in/out)": lambda x: int_mm(x).bfloat16(),
    }
    try:
        from torchao.quantization import Int8StaticActivationInt8WeightConfig, quantize_
        from torchao.quantization.granularity import PerRow, PerTensor

        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data, lin.bias.data = w.clone(), b.clone()
        quantize_(lin, Int8StaticActivationInt8WeightConfig(act_quant_scale=torch.tensor([x_scale]).reshape(1, 1, 1),
                                                            granularity=[PerTensor(), PerRow()]))
        out["torchao Int8Static (eager)"] = lin
    except Exception as e:  # reported, not fatal: the other candidates still run
        print(f"torchao unavailable: {type(e).__name__}: {e}")
    # torch.ao quantized Linear (x86 engine): uint8 activations and a *quantized output* that needs its own
    # scale, which our W8A8 scheme has not got; timed for reference only (its output adds a requantization).
    try:
        import torch.ao.nn.quantized as nnq

        torch.backends.quantized.engine = "x86"
        qlin = nnq.Linear(w.shape[1], w.shape[0])
        qw = torch.quantize_per_channel(w, w_scale.double(), zeros, 0, torch.qint8)
        qlin.set_weight_bias(qw, b)
        qlin.scale, qlin.zero_point = float(w.abs().sum(1).max() * x_scale * 128 / 127), 128

        def ao(x: torch.Tensor) -> torch.Tensor:
            return qlin(torch.quantize_per_tensor(x, x_scale, 128, torch.quint8)).dequantize()

        out["torch.ao quantized.Linear x86 (+out requant)"] = ao
    except Exception as e:
        print(f"torch.ao quantized Linear unavailable: {type(e).__name__}: {e}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 512, 4096])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="also time torchao under torch.compile (slow to build)")
    ap.add_argument("--qlinear", choices=["auto", "yes", "no"], default="auto",
                    help="time oneDNN's qlinear (auto: where backends.int8.onednn_usable finds it usable here; "
                         "on a CPU where it is not, one product takes seconds)")
    args = ap.parse_args()
    if args.qlinear == "auto":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from spikequant.backends.int8 import onednn_usable

        args.qlinear = "yes" if onednn_usable() else "no"
        if args.qlinear == "no":
            print("oneDNN qlinear is slow on this CPU (backends.int8.onednn_usable): not timed (--qlinear yes forces)")
    torch.manual_seed(0)
    import os

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    rows = []
    for shape_name, (n, k) in SHAPES.items():
        w, b = torch.randn(n, k) * 0.05, torch.randn(n) * 0.01
        x_scale = 4.0 / 127
        fns = candidates(w, b, x_scale)
        if args.qlinear == "no":
            fns = {name: fn for name, fn in fns.items() if "qlinear" not in name}
        if args.compile and "torchao Int8Static (eager)" in fns:
            fns["torchao Int8Static (compiled)"] = torch.compile(fns["torchao Int8Static (eager)"])
        for m in args.tokens:
            x = torch.randn(1, m, k)
            ref = F.linear(x, w, b)
            times = {}
            with torch.inference_mode():
                for name, fn in fns.items():
                    xin = x.bfloat16() if "bf16" in name else x
                    y = fn(xin)
                    err = float((y.float().reshape(ref.shape) - ref).abs().max() / ref.abs().max())
                    times[name] = (timeit(lambda fn=fn, xin=xin: fn(xin), args.repeats), err)
            for name, (t, err) in times.items():
                rows.append((shape_name, n, k, m, name, t * 1e6, times["fp32"][0] / t, times["bf16"][0] / t, err))
    print("| linear | N x K | tokens | kernel | us/call | vs fp32 | vs bf16 | max rel. err vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s, n, k, m, name, us, vf, vb, err in rows:
        print(f"| {s} | {n}x{k} | {m} | {name} | {us:.1f} | {vf:.2f} | {vb:.2f} | {err:.4f} |")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
