import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikequant.algorithms import modifier_from_dict
from spikequant.algorithms.clip_ratios import activation_quantizers, load_ratio_file
from spikequant.algorithms.gbs import (
    GBS,
    SLOTS,
    GBSConfig,
    calibration_ppl,
    gbs_search,
    next_probe,
    plot_heatmap,
    race_decision,
    step,
)
from spikequant.errors import RecipeError, SpikequantError
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe
from spikequant.transforms import installed_attention_transforms

WINDOWS = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(0))


def _quantized(preset="norot-w4a4kv4", arch="llama", layers=2, seed=2):
    model = tiny_model(arch, seed=seed, num_hidden_layers=layers)
    qm, _ = quantize(model, load_recipe(preset), WINDOWS, progress=False)
    return model, qm


def reference_bisection(f, iterations=10, epsilon=1e-3):
    """The authors' loop, written out plainly (RotateGridSearch.py, GridSearch.search)."""
    a, b = 0.0, 1.0
    m = (a + b) / 2
    fm = f(m)
    probes = [m]
    it = 0
    while b - a > epsilon and it < iterations:
        x = (a + m) / 2 if it % 2 == 0 else (m + b) / 2
        fx = f(x)
        probes.append(x)
        if fx < fm:
            if x < m:
                b = m
            else:
                a = m
            m, fm = x, fx
        else:
            if x < m:
                a = x
            else:
                b = x
        it += 1
    return m, probes


@pytest.mark.parametrize("target", [0.05, 0.3, 0.62, 0.97])
def test_bisection_functions_follow_the_reference_loop(target):
    f = lambda x: (x - target) ** 2  # noqa: E731
    m_ref, probes_ref = reference_bisection(f)
    a, m, b, fm = 0.0, 0.5, 1.0, f(0.5)
    probes = [m]
    for it in range(10):
        x = next_probe(a, m, b, it)
        probes.append(x)
        fx = f(x)
        a, m, b = step(a, m, b, x, fx < fm)  # the search's rule: f(x) < f(m), then fm is m's value
        fm = fx if m == x else fm
    assert probes == probes_ref and m == m_ref
    assert abs(m - target) < 0.1  # a unimodal objective is found to within the last probes' spacing


def test_search_follows_the_accept_rule_and_leaves_the_best_probe_set():
    model, qm = _quantized()
    res = gbs_search(qm, WINDOWS, GBSConfig("exact", iterations=4), progress=False)
    assert [(s.layer, s.key) for s in res.slots] == [(i, k) for i in range(2) for k in SLOTS]
    for s in res.slots:
        xs = [p[0] for p in s.probes]
        fs = dict((p[0], p[1]) for p in s.probes)
        assert xs[0] == 0.5 and len(xs) == 5
        assert s.ratio in fs and s.objective == fs[s.ratio]
        # The frozen ratio is the best probe (the accept rule only ever moves m to a strictly better x).
        assert s.objective == min(fs.values())
    index = activation_quantizers(qm)
    for s in res.slots:
        assert all(q.spec.clip_ratio == s.ratio for q in index[(s.layer, s.key)])
    # The final state's calibration PPL is what the last probe measured, and every quantizer is back on.
    assert res.calib_ppl == pytest.approx(res.slots[-1].objective, rel=1e-9)
    assert all(q.enabled for qs in index.values() for q in qs)
    assert res.probes == 16 * 5 and res.layer_forwards == 16 * 5 * 2 * len(WINDOWS)


def test_gradual_quantization_order():
    """While slot (l, k) is probed: earlier slots are on, later slots pass through, V caches always on."""
    model, qm = _quantized()
    index = activation_quantizers(qm)
    v_caches = {id(t.v_quantizer) for t in installed_attention_transforms(model)}
    order = [(i, k) for i in range(2) for k in SLOTS]
    seen = []

    def on_probe(event, n):
        if event != "evaluated":
            return
        slot = order[(n - 1) // 3]
        seen.append(slot)
        pos = order.index(slot)
        for j, (i, k) in enumerate(order):
            for q in index[(i, k)]:
                expect = j <= pos or id(q) in v_caches
                assert q.enabled == expect, (slot, (i, k))

    gbs_search(qm, WINDOWS, GBSConfig("exact", iterations=2), progress=False, on_probe=on_probe)
    assert len(seen) == 16 * 3


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fast_ppl_objective_equals_exact(arch):
    """Caching the inputs of the searched layer changes nothing: same probes, same objective values."""
    _, qm1 = _quantized(arch=arch)
    exact = gbs_search(qm1, WINDOWS, GBSConfig("exact", iterations=3), progress=False)
    _, qm2 = _quantized(arch=arch)
    fast = gbs_search(qm2, WINDOWS, GBSConfig("fast", "ppl", iterations=3), progress=False)
    assert exact.ratios == fast.ratios
    for s, t in zip(exact.slots, fast.slots, strict=True):
        assert [p[0] for p in s.probes] == [p[0] for p in t.probes]
        assert [p[1] for p in s.probes] == pytest.approx([p[1] for p in t.probes], rel=1e-5)
    assert fast.layer_forwards < exact.layer_forwards


def test_attention_and_mlp_blocks_compose_to_the_layer(arch):
    from spikequant.algorithms.gbs import _attention_part, _capture, _mlp_part, _run_layer
    from spikequant.models import decoder_layers, get_arch

    model = tiny_model(arch, dtype=torch.float64)
    with torch.no_grad():
        for h, kw in _capture(model, WINDOWS, 2):
            layer = decoder_layers(model)[0]
            mid = _attention_part(get_arch(model), layer, h, kw)
            assert torch.equal(_mlp_part(get_arch(model), layer, mid), _run_layer(layer, h, kw))


@pytest.mark.parametrize("reference", ["slot", "float"])
def test_fast_layer_objective_runs_one_block_per_probe_and_improves(reference):
    model, qm = _quantized(layers=3)
    before = calibration_ppl(model, WINDOWS)
    res = gbs_search(qm, WINDOWS, GBSConfig("fast", iterations=4, reference=reference), progress=False)
    n = len(WINDOWS)
    # one attention or MLP block per probe (plus one attention block per layer for the MLP's input);
    # reference "slot": one more block per slot (the slot passing through); "float": whole layers for the
    # reference stream; and whole layers to move to the next layer
    per_slot = 5 + (reference == "slot")
    assert res.sublayer_forwards == {"attention": (5 * per_slot + 1) * 3 * n, "mlp": 3 * per_slot * 3 * n}
    assert res.layer_forwards <= (2 if reference == "slot" else 3 * 3) * n
    assert all(s.objective >= 0 for s in res.slots)
    assert res.calib_ppl < before


def test_layers_limit_and_reverse_order():
    _, qm = _quantized(layers=3)
    res = gbs_search(qm, WINDOWS, GBSConfig("fast", iterations=1, layers=1, reverse=True), progress=False)
    assert [(s.layer, s.key) for s in res.slots] == [(2, k) for k in reversed(SLOTS)]
    assert set(res.ratios) == {2}
    with pytest.raises(RecipeError, match="layers=5"):
        gbs_search(qm, WINDOWS, GBSConfig(layers=5), progress=False)


def test_config_errors():
    with pytest.raises(ValueError, match="mode"):
        GBSConfig("fastest")
    with pytest.raises(ValueError, match="exact mode"):
        GBSConfig("exact", "layer")
    with pytest.raises(RecipeError, match="gbs.*iterations"):
        modifier_from_dict({"type": "gbs", "iterations": -1}, "modifiers[0]")
    with pytest.raises(RecipeError, match="unknown key"):
        modifier_from_dict({"type": "gbs", "bits": 4}, "modifiers[0]")
    assert isinstance(modifier_from_dict({"type": "gbs", "mode": "exact"}, "m"), GBS)


def test_search_on_static_quantizers_moves_their_scales():
    model, qm = _quantized("w8a8-tensor-static")
    index = activation_quantizers(qm)
    assert (0, "k_cache") not in index  # no KV quantizer in this recipe: its slots are skipped
    base = {k: qs[0].scale.clone() for k, qs in index.items()}
    res = gbs_search(qm, WINDOWS, GBSConfig("fast", iterations=2), progress=False)
    assert {k for e in res.ratios.values() for k in e} == set(SLOTS) - {"k_cache"}
    for (layer, key), qs in index.items():
        assert torch.allclose(qs[0].scale, base[(layer, key)] * res.ratios[layer][key])


def test_heatmap_and_state_file(tmp_path):
    _, qm = _quantized()
    state = tmp_path / "state.json"
    res = gbs_search(qm, WINDOWS, GBSConfig("fast", iterations=1), state_path=state, progress=False)
    data = json.loads(state.read_text())
    assert data["current"] is None and len(data["done"]) == 16
    assert plot_heatmap(res.ratios, 2, tmp_path / "h.png").stat().st_size > 1000
    # a state written by other settings is refused, with one line naming the file
    with pytest.raises(SpikequantError, match="different search"):
        gbs_search(qm, WINDOWS, GBSConfig("fast", iterations=2), state_path=state, progress=False)


RUNNER = """
import sys, os, signal, torch
from spikequant.algorithms.clip_ratios import save_ratio_file
from spikequant.algorithms.gbs import GBSConfig, gbs_search
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe
torch.set_num_threads(1)
mode, out, kill_event, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
windows = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(0))
model = tiny_model("llama", seed=2, num_hidden_layers=2)
qm, _ = quantize(model, load_recipe("norot-w4a4kv4"), windows, progress=False)
def on_probe(event, n):
    if event == kill_event and n == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
config = GBSConfig(mode, iterations=3) if mode != "race" else GBSConfig("fast", iterations=3, batch_size=1,
                                                                       race=0.5, precision="bfloat16")
res = gbs_search(qm, windows, config, state_path=out + "/state.json", progress=False, on_probe=on_probe)
save_ratio_file(res.ratios, out + "/ratios.json")
"""


def _run(tmp: Path, mode: str, kill_event: str = "never", kill_at: int = 0) -> int:
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, "-c", RUNNER, mode, str(tmp), kill_event, str(kill_at)], env=env,
                          timeout=600).returncode


@pytest.mark.parametrize("mode,kills,twice", [
    ("exact", [("evaluated", 1), ("saved", 17)], False),  # first slot (before its first save), mid-slot
    ("fast", [("evaluated", 30), ("saved", 64)], True),  # mid-search, at the last probe of a layer
    ("race", [("evaluated", 2), ("saved", 20)], False),  # racing, mid-slot: m's batches are in the state
])
def test_sigkill_then_resume_gives_identical_ratios(tmp_path, mode, kills, twice):
    """SIGKILL right after a probe was evaluated (its state not yet saved) or right after a save; every
    resumed search ends with the uninterrupted run's ratios.json, byte for byte."""
    assert _run(tmp_path / "full", mode) == 0
    reference = (tmp_path / "full" / "ratios.json").read_bytes()
    for event, at in kills:
        d = tmp_path / f"{event}-{at}"
        assert _run(d, mode, event, at) == -signal.SIGKILL
        assert not (d / "ratios.json").exists()
        assert _run(d, mode) == 0
        assert (d / "ratios.json").read_bytes() == reference, (event, at)
    if twice:
        d = tmp_path / "twice"
        assert _run(d, mode, "saved", 5) == -signal.SIGKILL
        assert _run(d, mode, "evaluated", 40) == -signal.SIGKILL
        assert _run(d, mode) == 0
        assert (d / "ratios.json").read_bytes() == reference
    assert load_ratio_file(tmp_path / "full" / "ratios.json")  # loadable by the clip_ratios modifier


@pytest.mark.parametrize("preset", ["gbs-rtn-w4a4kv4", "gbs-w3a3kv3"])
def test_gbs_presets_run_in_the_pipeline_and_reload_bit_identical(tmp_path, preset):
    """``eval --recipe gbs-…`` and ``quantize`` → ``eval --model DIR`` see the same model: the searched
    ratios live on the quantizers, are saved with them and come back."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from spikequant.export import load_quantized, save_quantized

    windows = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    model = tiny_model("llama", seed=7)
    recipe = load_recipe(preset)
    qm, findings = quantize(model, recipe, windows, progress=False)
    ratios = findings["gbs"]["ratios"]
    assert len(ratios) == 2 and all(len(e) == 8 for e in ratios.values())
    assert any(r != 1.0 for e in ratios.values() for r in e.values())
    with torch.no_grad():
        before = model(windows).logits
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)},
                                                                              unk_token="t0")), unk_token="t0")
    save_quantized(qm, tok, recipe, "tiny", tmp_path / "q", findings)
    loaded, qm2, _, _ = load_quantized(tmp_path / "q", device="cpu")
    with torch.no_grad():
        after = loaded.model(windows).logits
    assert torch.equal(before, after)
    index = activation_quantizers(qm2)
    for layer, entries in ratios.items():
        for key, r in entries.items():
            assert all(q.spec.clip_ratio == r for q in index[(int(layer), key)])


def test_search_cli_refuses_test_text_and_a_used_folder(tmp_path, capsys):
    from spikequant.cli import main

    assert main(["search", "--recipe", "gbs-w4a4kv4", "--calib-split", "test", "--output", str(tmp_path / "a")]) == 2
    assert "never calibrates on the evaluation text" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    assert main(["search", "--recipe", "gbs-w4a4kv4", "--output", str(tmp_path / "b")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["search", "--recipe", "gbs-w4a4kv4", "--output", str(tmp_path / "c"), "--resume"]) == 2
    assert "no search state" in capsys.readouterr().err


def test_horizon_runs_the_following_layers_and_the_last_layer_stops_at_the_model_end():
    model, qm = _quantized(layers=3)
    res = gbs_search(qm, WINDOWS, GBSConfig("fast", iterations=1, horizon=2), progress=False)
    n = len(WINDOWS)
    # layers 0 and 1 run one more layer per probe (16 slots x 2 probes), layer 2 has none after it
    assert res.layer_forwards >= 2 * 8 * 2 * n
    _, qm1 = _quantized(layers=3)
    one = gbs_search(qm1, WINDOWS, GBSConfig("fast", iterations=1), progress=False)
    assert one.slots[0].probes[0][1] != res.slots[0].probes[0][1]  # measured two layers on: another value
    with pytest.raises(ValueError, match="horizon"):
        GBSConfig(horizon=0)


def test_race_decision_is_a_paired_t_test():
    import statistics

    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        n = int(torch.randint(1, 8, (1,), generator=g))
        dx = (torch.randn(n, generator=g) * 0.1 + 5).tolist()
        shift = float(torch.randn(1, generator=g)) * 0.05
        dm = (torch.tensor(dx) + torch.randn(n, generator=g) * 0.05 + shift).tolist()
        got = race_decision(dx, dm, 2.0, 2, 8)
        if n < 2:
            assert got is None
            continue
        d = [u - v for u, v in zip(dx, dm, strict=True)]
        t = statistics.mean(d) / (statistics.stdev(d) / n ** 0.5)
        assert got == (None if abs(t) <= 2.0 else t < 0)
    assert race_decision([1.0, 2.0], [3.0, 4.0], 2.0, 2, 2) is None  # every batch seen: the caller's sums decide
    # n_max: the sign decides however small the t statistic
    assert race_decision([1.0, 2.0, 3.0], [1.5, 1.0, 3.0], 50.0, 2, 8) is None
    assert race_decision([1.0, 2.0, 3.0], [1.5, 1.0, 3.0], 50.0, 2, 8, n_max=3) is False


def test_race_with_an_unreachable_threshold_is_exact_mode():
    windows = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(5))
    _, qm1 = _quantized()
    exact = gbs_search(qm1, windows, GBSConfig("exact", iterations=3, batch_size=1), progress=False)
    _, qm2 = _quantized()
    race = gbs_search(qm2, windows, GBSConfig("fast", iterations=3, batch_size=1, race=1e9), progress=False)
    assert race.ratios == exact.ratios and race.calib_ppl == pytest.approx(exact.calib_ppl, rel=1e-9)
    assert all(s.batches == [4, 4, 4] for s in race.slots)
    for s, t in zip(exact.slots, race.slots, strict=True):  # the same probes, f on every batch
        assert [p[0] for p in s.probes[1:]] == [p[0] for p in t.probes]
        assert [p[1] for p in s.probes[1:]] == pytest.approx([p[1] for p in t.probes], rel=1e-6)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_race_stops_early_and_leaves_the_weights_as_they_were(precision):
    windows = torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(6))
    model, qm = _quantized(layers=3)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    full = gbs_search(_quantized(layers=3)[1], windows, GBSConfig("fast", "ppl", iterations=3, batch_size=1),
                      progress=False)
    race = gbs_search(qm, windows, GBSConfig("fast", iterations=3, batch_size=1, race=1.0, precision=precision),
                      progress=False)
    used = [n for s in race.slots for n in s.batches]
    assert len(used) == 24 * 3 and all(2 <= n <= 6 for n in used) and min(used) < 6
    assert race.layer_forwards < full.layer_forwards
    assert race.calib_ppl < calibration_ppl(_quantized(layers=3)[0], windows)  # below clip 1.0
    for n, p in model.named_parameters():  # the bfloat16 copies were swapped out again
        assert p.dtype == weights[n].dtype and torch.equal(p, weights[n]), n
    index = activation_quantizers(qm)
    for s in race.slots:
        assert all(q.spec.clip_ratio == s.ratio for q in index[(s.layer, s.key)])


def test_race_and_precision_config_errors():
    with pytest.raises(ValueError, match="race"):
        GBSConfig("exact", race=2.0)
    with pytest.raises(ValueError, match="race"):
        GBSConfig("fast", "layer", race=2.0)
    with pytest.raises(ValueError, match="race_min"):
        GBSConfig("fast", race=2.0, race_min=1)
    with pytest.raises(ValueError, match="race_max"):
        GBSConfig("fast", race=2.0, race_min=3, race_max=2)
    with pytest.raises(ValueError, match="race must be"):
        GBSConfig("fast", race=-1.0)
    with pytest.raises(ValueError, match="precision"):
        GBSConfig("fast", precision="float16")
    with pytest.raises(ValueError, match="precision bfloat16"):
        GBSConfig("fast", precision="bfloat16")  # objective layer
    assert GBSConfig("fast", race=2.0).resolved_objective == "ppl"
    assert isinstance(modifier_from_dict({"type": "gbs", "race": 2.0, "precision": "bfloat16"}, "m"), GBS)
