"""The GBS clip search on a streamed saved model (layers read from the shards on demand) gives the in-memory
search's ratios.json byte for byte, the same objective values and the same state file, in fast mode
(horizon 1 and 3, objective ppl, racing in bfloat16) and exact mode; a stopped streamed search resumes to
the same ratios; a probe holds only the layers it runs."""

import json

import pytest
import torch

from spikequant.algorithms.clip_ratios import clip_ratios, load_ratio_file, save_ratio_file
from spikequant.algorithms.gbs import SLOTS, GBSConfig, gbs_search
from spikequant.export import load_quantized, save_quantized
from spikequant.models import load_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe
from spikequant.streaming import StreamedModel, open_saved, quantize_streamed

from .test_streamed import WINDOWS, checkpoint

SEARCH = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(0))
# Fast mode (layer objective) on 4 layers, so that horizon 3 is cut by the model's end only for the last
# two; exact mode and the ppl objective, which read every later layer from disk per probe (~0.25 s per
# layer here, mostly the release's garbage collection), on 2 layers with the search on the first.
FAST = {"fast-h1": GBSConfig("fast", iterations=3), "fast-h3": GBSConfig("fast", iterations=3, horizon=3)}
STATIC = {"fast-static": GBSConfig("fast", iterations=3, horizon=2)}
SLOW = {"fast-ppl": GBSConfig("fast", "ppl", iterations=2), "exact": GBSConfig("exact", iterations=2, layers=1),
        "race": GBSConfig("fast", iterations=2, batch_size=1, race=0.5, precision="bfloat16")}


def _saved(tmp_path_factory, layers, recipe="quarot-rtn-w4a4kv4", streamed=True):
    """quarot-rtn-w4a4kv4 (R1–R4, online o_proj Hadamard, RTN W4, A4 per token, KV4) of a tiny random Llama,
    written streamed (one shard per layer), as `spikequant quantize --offload disk` does, or in memory (one
    model.safetensors)."""
    tmp = tmp_path_factory.mktemp(f"gbs-streamed-{layers}")
    path = checkpoint(tmp, layers=layers)
    if streamed:
        sm = StreamedModel(str(path), device="cpu", attn_implementation="eager")
        quantize_streamed(sm, load_recipe(recipe), WINDOWS, tmp / "q", str(path), progress=False)
    else:
        lm = load_model(str(path), device="cpu", attn_implementation="eager")
        qm, findings = quantize(lm.model, load_recipe(recipe), WINDOWS, progress=False)
        save_quantized(qm, lm.tokenizer, load_recipe(recipe), str(path), tmp / "q", findings)
    return tmp / "q"


@pytest.fixture(scope="module")
def saved4(tmp_path_factory):
    return _saved(tmp_path_factory, 4)


@pytest.fixture(scope="module")
def saved2(tmp_path_factory):
    return _saved(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def saved_static(tmp_path_factory):
    """w8a8-tensor-static, saved in memory (one model.safetensors): a searched ratio recomputes a frozen
    scale from its observed range, on the skeleton's quantizers, which loading and freeing a layer must
    leave alone."""
    folder = _saved(tmp_path_factory, 3, "w8a8-tensor-static", streamed=False)
    assert (folder / "model.safetensors").is_file()
    return folder


class Stop(Exception):
    pass


def loaded_layers(sm: StreamedModel) -> list[int]:
    return [i for i in range(sm.num_layers) if not any(p.is_meta for p in sm.layer(i).parameters())]


def search(folder, config, out, streamed, stop=None, check=None):
    """One search (in memory: load_quantized; streamed: open_saved) writing out/state.json and
    out/ratios.json; ``stop=(event, n)`` raises at that probe event, as a kill would end the run."""
    out.mkdir(exist_ok=True)
    if streamed:
        sm, qm, _ = open_saved(folder, device="cpu")
    else:
        sm, (_, qm, _, _) = None, load_quantized(folder, device="cpu")

    def on_probe(event, n):
        if check is not None and event == "evaluated":
            check(sm, n)
        if stop is not None and (event, n) == stop:
            raise Stop

    res = gbs_search(qm, SEARCH, config, state_path=out / "state.json", progress=False, on_probe=on_probe)
    save_ratio_file(res.ratios, out / "ratios.json")
    if sm is not None:
        assert loaded_layers(sm) == []  # every layer is freed again
    return res


def without_seconds(obj):
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


def assert_same(a, b, dir_a, dir_b):
    assert (dir_a / "ratios.json").read_bytes() == (dir_b / "ratios.json").read_bytes()
    # the report's per-slot results: ratios, objective values and every probe, exactly
    assert [without_seconds(s.to_dict()) for s in a.slots] == [without_seconds(s.to_dict()) for s in b.slots]
    assert (a.calib_ppl, a.probes, a.layer_forwards, a.sublayer_forwards) == \
        (b.calib_ppl, b.probes, b.layer_forwards, b.sublayer_forwards)
    sa, sb = (json.loads((d / "state.json").read_text()) for d in (dir_a, dir_b))
    assert without_seconds(sa) == without_seconds(sb)


@pytest.mark.parametrize("name", [*FAST, *STATIC, *SLOW])
def test_streamed_search_equals_in_memory(saved4, saved2, saved_static, tmp_path, name):
    config = FAST.get(name) or STATIC.get(name) or SLOW[name]
    saved, layers = (saved4, 4) if name in FAST else (saved_static, 3) if name in STATIC else (saved2, 2)
    mem = search(saved, config, tmp_path / "mem", streamed=False)
    per_slot = config.iterations + (0 if config.race else 1)  # racing counts decisions (m runs inside them)
    slots = [k for k in SLOTS if k != "k_cache"] if name in STATIC else SLOTS

    def check(sm, n):
        # while a probe runs, only the layers it needs stay loaded (exact / ppl: the later layers are read
        # per probe and freed)
        layer = [i for i in range(layers) for _ in slots][(n - 1) // per_slot]
        expect = {"fast-h1": [layer], "fast-h3": list(range(layer, min(layer + 3, layers))),
                  "fast-static": list(range(layer, min(layer + 2, layers))), "fast-ppl": [layer], "race": [layer],
                  "exact": []}[name]
        assert loaded_layers(sm) == expect, (n, layer)

    disk = search(saved, config, tmp_path / "disk", streamed=True, check=check)
    assert len(mem.slots) == (config.layers or layers) * len(slots) and any(s.ratio != 0.5 for s in mem.slots)
    assert_same(mem, disk, tmp_path / "mem", tmp_path / "disk")


@pytest.mark.parametrize("name,stops", [
    ("fast-h3", [("saved", 45), ("evaluated", 90)]),  # layer 1 mid-slot, then layer 2 before a save
    ("exact", [("evaluated", 11)]),  # the 4th slot's second probe, before its state was saved
])
def test_stopped_streamed_search_resumes_to_the_same_ratios(saved4, saved2, tmp_path, name, stops):
    config = FAST.get(name) or SLOW[name]
    saved = saved4 if name in FAST else saved2
    full = search(saved, config, tmp_path / "mem", streamed=False)
    out = tmp_path / "disk"
    for stop in stops:
        with pytest.raises(Stop):
            search(saved, config, out, streamed=True, stop=stop)
        assert not (out / "ratios.json").exists()
        assert json.loads((out / "state.json").read_text())["current"] is not None
    resumed = search(saved, config, out, streamed=True)
    assert (out / "ratios.json").read_bytes() == (tmp_path / "mem" / "ratios.json").read_bytes()
    assert [without_seconds(s.to_dict()) for s in resumed.slots] == [without_seconds(s.to_dict()) for s in full.slots]


@pytest.fixture
def cli_folder(tmp_path):
    """A tiny random Llama with a whitespace word-level tokenizer, a text file of its words, and the model
    quantized by quarot-rtn-w4a4kv4 into a streamed folder: (checkpoint, text, folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from spikequant.models.tiny import tiny_model

    ckpt = tmp_path / "ckpt"
    tiny_model("llama", seed=7, num_hidden_layers=3).save_pretrained(ckpt)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(ckpt)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{int(i)}" for i in torch.randint(0, 96, (200,), generator=torch.Generator()
                                                                  .manual_seed(3))))
    sm = StreamedModel(str(ckpt), device="cpu")
    quantize_streamed(sm, load_recipe("quarot-rtn-w4a4kv4"), WINDOWS, tmp_path / "q", str(ckpt), progress=False)
    return ckpt, text, tmp_path / "q"


def _search_args(folder, text):
    return ["search", "--model", str(folder), "--dataset", str(text), "--calib-windows", "2", "--seqlen", "16",
            "--iterations", "2", "--horizon", "2", "--no-progress"]


def test_search_cli_streamed_matches_in_memory_and_saves_streamed(tmp_path, cli_folder, capsys):
    """`spikequant search --offload disk` on a saved folder: the ratios.json bytes, per-slot results and test
    metrics of `--offload none`, and a `--save` folder (layer shards) holding what the in-memory save holds."""
    from spikequant.cli import main

    from .test_streamed import assert_same_dirs

    ckpt, text, folder = cli_folder
    common = [*_search_args(folder, text), "--eval-windows", "2", "--eval-seqlen", "16"]
    reports = {}
    for offload in ("none", "disk"):
        assert main([*common, "--offload", offload, "--output", str(tmp_path / offload),
                     "--save", str(tmp_path / f"q-{offload}")]) == 0
        reports[offload] = json.loads((tmp_path / offload / "report.json").read_text())
    assert (tmp_path / "none" / "ratios.json").read_bytes() == (tmp_path / "disk" / "ratios.json").read_bytes()
    a, b = (reports[k] for k in ("none", "disk"))
    assert (a["offload"], b["offload"]) == ("none", "disk")
    assert without_seconds(a["result"]["slots"]) == without_seconds(b["result"]["slots"])
    assert a["result"]["calib_ppl"] == b["result"]["calib_ppl"]
    assert a["result"]["extra"] == b["result"]["extra"]
    for k in ("clip1", "gbs"):
        assert [a["test"][k][m] for m in ("ppl", "kl", "top1")] == [b["test"][k][m] for m in ("ppl", "kl", "top1")]
    assert a["test"]["gbs"]["ppl"] != a["test"]["clip1"]["ppl"]  # the searched ratios changed the evaluated model
    assert sorted(p.name for p in (tmp_path / "q-disk").glob("model-layer-*.safetensors")) == \
        [f"model-layer-{i:05d}.safetensors" for i in range(3)]
    assert_same_dirs(tmp_path / "q-none", tmp_path / "q-disk")
    _, qd, _ = open_saved(tmp_path / "q-disk", device="cpu")  # the saved quantizers carry the searched ratios
    got, want = clip_ratios(qd), load_ratio_file(tmp_path / "disk" / "ratios.json")
    assert want and all(got[i][k] == r for i, e in want.items() for k, r in e.items())
    capsys.readouterr()
    # refused with one line before anything is written: a recipe to quantize first, --save over the source
    assert main(["search", "--model", str(ckpt), "--recipe", "quarot-rtn-w4a4kv4", "--dataset", str(text),
                 "--offload", "disk", "--output", str(tmp_path / "r1")]) == 2
    assert "runs on a saved model" in capsys.readouterr().err
    assert main([*common, "--offload", "disk", "--output", str(tmp_path / "r2"), "--save", str(folder)]) == 2
    assert "reads its layers from that folder" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_search_offload_auto_streams_a_folder_that_does_not_fit(tmp_path, cli_folder, monkeypatch, capsys):
    from types import SimpleNamespace

    import spikequant.streaming.offload as offload
    from spikequant.cli import main

    ckpt, text, folder = cli_folder
    assert main([*_search_args(folder, text), "--output", str(tmp_path / "fits")]) == 0
    monkeypatch.setattr(offload.psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    assert main([*_search_args(folder, text), "--output", str(tmp_path / "small")]) == 0
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("fits", "small")]
    assert [r["offload"] for r in reports] == ["none", "disk"]
    assert (tmp_path / "fits" / "ratios.json").read_bytes() == (tmp_path / "small" / "ratios.json").read_bytes()
    # a recipe to quantize first: auto does not quantize streamed inside a search, it says how
    capsys.readouterr()
    assert main(["search", "--model", str(ckpt), "--recipe", "quarot-rtn-w4a4kv4", "--dataset", str(text),
                 "--output", str(tmp_path / "r")]) == 2
    assert "runs on a saved model" in capsys.readouterr().err
