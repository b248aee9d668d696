"""Which cheap objective takes the decisions an exact GBS search took? Replays an exact run's trajectory.

For every slot of a finished ``spikequant search --mode exact`` run, in its order, with the earlier slots at
the ratios exact mode froze them at, this computes candidate fast-mode objectives for each ratio exact
mode probed, then replays exact mode's accept decisions (f(x) < f(m)) and counts how often each candidate
decides the same way. Candidates, at the output of layer l + d (d = 0 .. horizon-1):

- ``G{d}``: relative error against the float stream (every activation quantizer off from layer 0): what
  ``--reference float`` measures (at d = 0 on the whole layer, where the search measures the slot's block);
- ``L{d}``: relative error against the same layers run from the same inputs with the slot passing through
  (``--reference slot``);
- ``KLg{d}`` / ``KLl{d}``: KL divergence of the logit lens (final norm + lm_head on that hidden state)
  against the same two references; ``CE{d}``: the logit lens's cross-entropy on the window's next tokens;
- ``T1_{d}`` / ``T2_{d}`` / ``F{d}`` (``--taylor``): the whole model's calibration loss predicted from
  layer l + d's output by a Taylor expansion around the slot passing through: g = d(sum of NLL)/dy from one
  backward pass through the rest of the model per slot (V caches in float there, rounding has no
  gradient), first order g·Δ (``T1``), plus ½ Σ_tokens (g_t·Δ_t)² (``T2``), or the gradient-weighted
  squared error Σ g²Δ² alone (``F``).

"weighted wrong" weights each disagreement by |ln f(x) - ln f(m)| (how much exact mode's objective
separated the two ratios), so near-ties count little.

    python bench/gbs_proxy_agreement.py --exact-run runs/q512-exact --data-dir ../shared/data \\
        --recipe quarot-rtn-w4a4kv4 --layers 7 --out runs/agree.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def agreement(rows: list[dict]) -> list[str]:
    """The table: per candidate, decisions agreeing with exact mode's (all slots, and per slot kind)."""
    slots: dict[tuple[int, str], list[dict]] = collections.OrderedDict()
    for r in rows:
        slots.setdefault((r["layer"], r["key"]), []).append(r)
    names = [k for k in rows[0] if k not in ("layer", "key", "x", "f")]
    total = {p: [0, 0, 0.0, 0.0] for p in names}
    side = {p: collections.Counter() for p in names}  # (exact mode kept the lower ratio, candidate agreed)
    by_key: dict[str, dict[str, list[int]]] = collections.defaultdict(lambda: {p: [0, 0] for p in names})
    for (_, key), probes in slots.items():
        m = probes[0]
        for r in probes[1:]:
            better = r["f"] < m["f"]
            w = abs(math.log(r["f"]) - math.log(m["f"]))
            for p in names:
                ok = (r[p] < m[p]) == better
                t = total[p]
                t[0], t[1], t[2], t[3] = t[0] + ok, t[1] + 1, t[2] + w * (not ok), t[3] + w
                by_key[key][p][0] += ok
                by_key[key][p][1] += 1
                side[p][((r["x"] < m["x"]) == better, ok)] += 1
            if better:
                m = r
    keys = list(by_key)
    out = [f"{len(slots)} slots, {total[names[0]][1]} decisions of exact mode",
           "| objective | agree | weighted wrong | exact kept the lower ratio | exact kept the higher | "
           + " | ".join(keys) + " |",
           "|---|---:|---:|---:|---:|" + "---:|" * len(keys)]
    for p in names:
        a, n, lost, w = total[p]
        c = side[p]
        lower = f"{c[(True, True)]}/{c[(True, True)] + c[(True, False)]}"
        higher = f"{c[(False, True)]}/{c[(False, True)] + c[(False, False)]}"
        out.append(f"| {p} | {a}/{n} ({a / n:.3f}) | {lost / w:.3f} | {lower} | {higher} | "
                   + " | ".join(f"{by_key[k][p][0]}/{by_key[k][p][1]}" for k in keys) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exact-run", required=True, help="folder of a `spikequant search --mode exact` run")
    ap.add_argument("--recipe", required=True, help="the recipe that run searched (it ran with --recipe)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--horizon", type=int, default=4, help="layers l .. l+horizon-1 are measured")
    ap.add_argument("--layers", type=int, default=None, help="stop after this many layers")
    ap.add_argument("--out", required=True, help="JSON lines, one per probe (appended to; --analyze-only reads it)")
    ap.add_argument("--analyze-only", action="store_true")
    ap.add_argument("--taylor", action="store_true", help="add the Taylor-expansion candidates T1, T2, F")
    args = ap.parse_args()
    if not args.analyze_only:
        replay(args)
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    print("\n".join(agreement(rows)))


@torch.no_grad()
def replay(args: argparse.Namespace) -> None:
    from spikequant.algorithms.gbs import (
        GBSConfig,
        _float_activations,
        _relative_error,
        _run_layer,
        _Search,
        calibration_ppl,
    )
    from spikequant.data import eval_windows, load_text, recipe_calibration_windows, tokenize
    from spikequant.models import get_arch, load_model
    from spikequant.pipeline import quantize
    from spikequant.recipes import load_recipe

    report = json.loads((Path(args.exact_run) / "report.json").read_text())
    if report["result"]["config"]["mode"] != "exact":
        raise SystemExit(f"{args.exact_run} is not an exact-mode run")
    slots, cal = report["result"]["slots"], report["calibration"]
    torch.set_flush_denormal(True)
    loaded = load_model(report["model"], "float32", "cpu")
    model, tok = loaded.model, loaded.tokenizer
    recipe = load_recipe(args.recipe)
    qm, _ = quantize(model, recipe, lambda: recipe_calibration_windows(recipe, tok, args.data_dir), False)
    split = cal["name"].split(":")[1]
    windows = eval_windows(tokenize(tok, load_text("wikitext2", split, args.data_dir)), cal["seqlen"], cal["windows"])
    search = _Search(qm, windows, GBSConfig(mode="fast", iterations=1, horizon=args.horizon), None, False, None)
    arch = get_arch(model)
    norm, head = model.get_submodule(arch.final_norm), model.get_submodule(arch.lm_head)
    targets = windows[:, 1:]
    for qs in search.index.values():  # the gradual start: only the V caches quantize
        for q in qs:
            q.enabled = id(q) in search.v_cache
    n_layers = len(search.layers)

    def depths(layer: int, hs: list, ref: bool = False) -> list[torch.Tensor]:
        outs, ys = [], [h for h, _ in hs]
        for j in range(layer, min(layer + args.horizon, n_layers)):
            if ref:
                with _float_activations(qm):
                    ys = [_run_layer(search.layers[j], y, kw) for y, (_, kw) in zip(ys, hs, strict=True)]
            else:
                ys = [_run_layer(search.layers[j], y, kw) for y, (_, kw) in zip(ys, hs, strict=True)]
            outs.append(torch.cat(ys))
        return outs

    def lens(y: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(head(norm(y))[:, :-1].float(), -1)

    def rel(y: torch.Tensor, r: torch.Tensor) -> float:
        return _relative_error([y], [r])

    def kl(lp: torch.Tensor, lr: torch.Tensor) -> float:
        return float((lr.exp() * (lr - lp)).sum(-1).mean(dtype=torch.float64))

    # the replay starts from exact mode's starting state: check it gives exact mode's first objective value
    first = slots[0]
    with search.slot_off(first["layer"], first["key"]):  # back to passing through afterwards
        search.set_slot(first["layer"], first["key"], first["probes"][0][0])
        got = calibration_ppl(model, windows)
    print(f"check: first probe {got:.6f}, exact run {first['probes'][0][1]:.6f}", flush=True)
    if abs(got - first["probes"][0][1]) > 1e-9 * got:
        # low-bit models move with the float summation order: run with the exact run's thread count
        raise SystemExit(f"the replay does not start from the exact run's state ({got} != {first['probes'][0][1]}); "
                         f"same recipe, data and torch threads (the run's report records them)?")
    model.requires_grad_(False)

    def loss_grad(j0: int, y: torch.Tensor, kw: dict) -> torch.Tensor:
        """d(sum of next-token NLL)/dy for y = layer j0's output, V caches of later layers in float."""
        vq = [q for (lj, k), qs in search.index.items() if k == "v_cache" and lj > j0 for q in qs]
        for q in vq:
            q.enabled = False
        try:
            with torch.enable_grad():
                y = y.detach().requires_grad_(True)
                z = y
                for j in range(j0 + 1, n_layers):
                    z = _run_layer(search.layers[j], z, kw)
                logits = head(norm(z))[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
                (g,) = torch.autograd.grad(loss, y)
        finally:
            for q in vq:
                q.enabled = True
        return g

    lens_at = sorted({0, args.horizon - 1})
    t0 = time.time()

    def emit(rec: dict) -> None:  # one line per probe, appended at once: a stopped replay keeps what it did
        with Path(args.out).open("a") as f:
            f.write(json.dumps(rec) + "\n")

    stop = None if args.layers is None else sorted({s["layer"] for s in slots})[: args.layers]
    for n, s in enumerate(slots):
        layer, key = s["layer"], s["key"]
        if stop is not None and layer not in stop:
            break
        hs = search.layer_inputs(layer, "q")
        if ("refd", layer) not in search._cache:
            refd = depths(layer, search.layer_inputs(layer, "ref"), ref=True)
            search._cache[("refd", layer)] = (refd, {d: lens(refd[d]) for d in lens_at if d < len(refd)})
        refd, refl = search._cache[("refd", layer)]
        with search.slot_off(layer, key):  # the slot as before the search reached it
            offd = depths(layer, hs)
            offl = {d: lens(offd[d]) for d in refl}
            grads = {}
            if args.taylor:
                assert len(hs) == 1, "--taylor: one batch of calibration windows"
                grads = {d: loss_grad(layer + d, offd[d], hs[0][1]) for d in refl}
        for x, fx in s["probes"]:
            search.set_slot(layer, key, x)
            yd = depths(layer, hs)
            rec = {"layer": layer, "key": key, "x": x, "f": fx}
            for d, y in enumerate(yd):
                rec[f"G{d}"], rec[f"L{d}"] = rel(y, refd[d]), rel(y, offd[d])
            for d in refl:
                ly = lens(yd[d])
                rec[f"KLg{d}"], rec[f"KLl{d}"] = kl(ly, refl[d]), kl(ly, offl[d])
                rec[f"CE{d}"] = float(-ly.gather(-1, targets.unsqueeze(-1)).mean(dtype=torch.float64))
            for d, g in grads.items():
                delta = (yd[d] - offd[d]).double()
                g = g.double()
                lin = float((g * delta).sum())
                rec[f"T1_{d}"] = lin
                rec[f"T2_{d}"] = lin + 0.5 * float((g * delta).sum(-1).pow(2).sum())
                rec[f"F{d}"] = float((g * delta).pow(2).sum())
            emit(rec)
        search.set_slot(layer, key, s["ratio"])
        if n + 1 == len(slots) or slots[n + 1]["layer"] != layer:
            search._cache.pop(("refd", layer), None)
            search.forget_layer(layer)
            print(f"layer {layer} done, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
