"""Zero-shot accuracy through lm-eval, offline: a multiple-choice task in lm-eval's JSON-file format,
written here, scored on tiny random models (FP and quantized in memory) and checked against the
accuracy computed directly from the model's logits."""

import json
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spikequant.cli import main
from spikequant.eval.base import EvalContext, Evaluator
from spikequant.eval.zeroshot import (
    TASK_PRESETS,
    ZeroShotError,
    ZeroShotEvaluator,
    evaluate,
    headline_metric,
    parse_tasks,
)
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe

# special tokens that no word contains (an added token is matched inside words: "t1" would split "t18")
VOCAB = {"<unk>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, 96)}}
TASK = "spikequant_tiny_mc"
WRONG = 2  # the last WRONG questions get a gold answer the FP model does not pick
DESTROY = {"name": "w2a2-tensor", "weights": {"format": "int", "bits": 2, "granularity": "tensor"},
           "inputs": {"format": "int", "bits": 2, "granularity": "tensor", "dynamic": True}}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """lm-eval and datasets must never reach for the hub here."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_DATASETS_OFFLINE", True, raising=False)


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _questions(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(3)

    def words(k: int) -> str:
        return " ".join(f"t{int(i)}" for i in torch.randint(2, 96, (k,), generator=g))

    # Two tokens per choice: the model's logits decide, not the length; the choices' lengths in characters
    # differ (t5 vs t55), so acc (summed log-probs) and acc_norm (per character) can disagree.
    return [{"question": words(6), "choices": [words(2) for _ in range(4)]} for _ in range(n)]


@torch.no_grad()
def _predictions(model, docs: list[dict]) -> tuple[list[int], list[int]]:
    """The plain reference: each choice's summed log-probability given the question; acc picks the
    largest, acc_norm the largest per character of the choice (lm-eval's definitions)."""
    tok = _tokenizer()
    preds, preds_norm = [], []
    for d in docs:
        ctx = tok.encode(d["question"])
        lls = []
        for choice in d["choices"]:
            cont = tok.encode(choice)
            logp = model(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
            lls.append(float(sum(logp[len(ctx) - 1 + j, c] for j, c in enumerate(cont))))
        preds.append(max(range(len(lls)), key=lambda i: lls[i]))
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"], strict=True)]
        preds_norm.append(max(range(len(norm)), key=lambda i: norm[i]))
    return preds, preds_norm


def _write_task(folder, docs: list[dict], labels: list[int]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({**d, "label": y}) + "\n" for d, y in zip(docs, labels, strict=True)))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""")
    return str(folder)


def _accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)


@pytest.fixture(scope="module")
def setup_fp(tmp_path_factory):
    pytest.importorskip("lm_eval")
    fp = tiny_model("llama", seed=1, dtype=torch.float64)
    docs = _questions()
    preds, _ = _predictions(fp, docs)
    # gold = the FP model's choice, except for the last WRONG questions: FP accuracy is 6/8 by construction
    labels = [p if i < len(docs) - WRONG else (p + 1) % 4 for i, p in enumerate(preds)]
    tasks_dir = _write_task(tmp_path_factory.mktemp("tasks"), docs, labels)
    return fp, docs, labels, tasks_dir


def test_fp_and_quantized_accuracy_are_lm_evals_on_the_model_in_memory(setup_fp):
    fp, docs, labels, tasks_dir = setup_fp
    ev = ZeroShotEvaluator([TASK], tasks_dir=tasks_dir, progress=False)
    res = ev.run(fp, _tokenizer())
    preds, preds_norm = _predictions(fp, docs)
    score = res.tasks[TASK]
    assert score["acc"] == pytest.approx(1 - WRONG / len(docs)) == pytest.approx(_accuracy(preds, labels))
    assert score["acc_norm"] == pytest.approx(_accuracy(preds_norm, labels))
    assert score["metric"] == "acc_norm" and score["value"] == score["acc_norm"] and res.mean == score["value"]
    assert score["samples"] == len(docs) and score["num_fewshot"] == 0
    out = ev.evaluate(fp, EvalContext(tokenizer=_tokenizer(), progress=False))
    assert {k: out[k] for k, _ in ev.columns} == {f"zeroshot/{TASK}": res.mean, "zeroshot_mean": res.mean}
    assert isinstance(ev, Evaluator)

    # A recipe that destroys the model: lm-eval's accuracy moves with it, to what its own logits say.
    broken = tiny_model("llama", seed=1, dtype=torch.float64)
    quantize(broken, load_recipe(DESTROY), progress=False)
    q_preds, q_norm = _predictions(broken, docs)
    assert q_preds != preds  # the recipe changes answers, so the accuracy tells which model was scored
    q = ev.run(broken, _tokenizer()).tasks[TASK]
    assert q["acc"] == pytest.approx(_accuracy(q_preds, labels)) != pytest.approx(score["acc"])
    assert q["acc_norm"] == pytest.approx(_accuracy(q_norm, labels))


def test_rotated_kv_quantized_model_scored_as_held_and_left_unchanged(setup_fp):
    """QuaRot RTN W4A4KV4 on a tied-embedding model (Qwen2 tiny): rotations, online Hadamards and KV
    quantizers in place; lm-eval's numbers follow that model, and its logits are unchanged afterwards."""
    _, docs, labels, tasks_dir = setup_fp
    model = tiny_model("qwen2", seed=1, dtype=torch.float64)
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize(model, load_recipe("quarot-rtn-w4a4kv4"), windows, progress=False)
    x = torch.tensor([_tokenizer().encode(docs[0]["question"])])
    with torch.no_grad():
        before = model(x).logits
    res = evaluate(model, _tokenizer(), TASK, tasks_dir=tasks_dir, progress=False)
    preds, preds_norm = _predictions(model, docs)
    assert res.tasks[TASK]["acc"] == pytest.approx(_accuracy(preds, labels))
    assert res.tasks[TASK]["acc_norm"] == pytest.approx(_accuracy(preds_norm, labels))
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    assert model.lm_head.weight is not model.get_input_embeddings().weight


def test_limit_and_settings_are_reported(setup_fp):
    fp, _, _, tasks_dir = setup_fp
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    res = evaluate(fp, _tokenizer(), [TASK], tasks_dir=tasks_dir, limit=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)  # lm-eval's seeding is undone
    d = res.to_dict()
    assert d["tasks"][TASK]["samples"] == 3 and d["limit"] == 3 and d["num_fewshot"] == 0
    assert d["lm_eval_version"].startswith("0.4.") and d["tasks_dir"] == tasks_dir


def test_parse_tasks_presets():
    assert parse_tasks("quarot") == list(TASK_PRESETS["quarot"])
    assert len(parse_tasks("pwim")) == 7 and "lambada_standard" in parse_tasks("pwim")
    assert parse_tasks("quarot,piqa,copa") == [*TASK_PRESETS["quarot"], "copa"]
    assert parse_tasks(["piqa", "arc_easy,piqa"]) == ["piqa", "arc_easy"]
    with pytest.raises(ZeroShotError, match="no zero-shot task"):
        parse_tasks(" , ")


def test_headline_metric_is_quarots_rule():
    assert headline_metric({"acc,none": 0.5, "acc_norm,none": 0.6}) == "acc_norm"
    assert headline_metric({"acc,none": 0.5, "perplexity,none": 3.0}) == "acc"
    assert headline_metric({"perplexity,none": 3.0}) is None


def _cli(capsys, tmp_path, *flags: str) -> str:
    """``spikequant eval`` on a small local text (the data check passes), returning its one-line error."""
    text = tmp_path / "text.txt"
    text.write_text("a few words of text\n" * 20)
    assert main(["eval", "--dataset", str(text), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("spikequant: error: ")
    return err


def test_cli_missing_tasks_dir_is_one_line(capsys, tmp_path):
    assert "--tasks-dir" in _cli(capsys, tmp_path, "--tasks", "x", "--tasks-dir", str(tmp_path / "nope"))
    assert "without --tasks" in _cli(capsys, tmp_path, "--tasks-dir", str(tmp_path))


def test_cli_unknown_task_is_one_line(capsys, tmp_path, setup_fp):
    tasks_dir = setup_fp[3]
    err = _cli(capsys, tmp_path, "--tasks", f"{TASK},no_such_task_xyz", "--tasks-dir", tasks_dir)
    assert f"unknown zero-shot task 'no_such_task_xyz': neither lm-eval nor {tasks_dir} defines it" in err


def test_cli_lm_eval_missing_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    err = _cli(capsys, tmp_path, "--tasks", "quarot")
    assert "lm-eval, which is not installed; pip install 'spikequant[eval]'" in err


def test_cli_bad_limit_is_one_line(capsys, tmp_path):
    assert "--limit must be >= 1, got 0" in _cli(capsys, tmp_path, "--tasks", "piqa", "--limit", "0")


def test_bad_settings():
    for kw in ({"limit": 0}, {"batch_size": 0}, {"max_length": 0}, {"num_fewshot": -1}):
        with pytest.raises(ZeroShotError, match="must be >= "):
            ZeroShotEvaluator(["piqa"], **kw)


def test_documented_offline_piqa_yaml_runs_from_local_files(tmp_path):
    """docs/tasks/offline-piqa/piqa.yaml: lm-eval's `piqa` name served from a local JSON-lines file."""
    pytest.importorskip("lm_eval")
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "tasks" / "offline-piqa" / "piqa.yaml"
    data = tmp_path / "valid.jsonl"
    g = torch.Generator().manual_seed(5)
    rows = [{"goal": " ".join(f"t{int(i)}" for i in torch.randint(2, 96, (4,), generator=g)),
             "sol1": f"t{2 * k + 2}", "sol2": f"t{2 * k + 3}", "label": k % 2} for k in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "piqa.yaml").write_text(doc.read_text().replace("data/piqa/valid.jsonl", str(data)))
    model = tiny_model("llama", seed=1, dtype=torch.float64)
    res = evaluate(model, _tokenizer(), "piqa", tasks_dir=folder, progress=False)
    # the reference, with lm-eval's prompt for piqa ("Question: ...\nAnswer:" then " <solution>")
    docs = [{"question": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]]} for r in rows]
    preds, preds_norm = _predictions(model, docs)
    labels = [r["label"] for r in rows]
    assert res.tasks["piqa"]["samples"] == 4
    assert res.tasks["piqa"]["acc"] == pytest.approx(_accuracy(preds, labels))
    assert res.tasks["piqa"]["acc_norm"] == pytest.approx(_accuracy(preds_norm, labels))


def test_compare_reports_gain_zero_shot_columns(tmp_path, setup_fp):
    """compare.json/.md/.png with --tasks: per-task and mean columns, the metric note, the accuracy panel;
    resuming with other zero-shot settings is refused."""
    from spikequant.compare import run_compare
    from spikequant.data import Text
    from spikequant.errors import SpikequantError
    from spikequant.models import LoadedModel
    from spikequant.pipeline import Session
    from spikequant.reports import report_markdown

    fp, _, _, tasks_dir = setup_fp

    def session(limit=None) -> Session:
        s = Session(model_source="tiny", seqlen=16, max_windows=2, progress=False,
                    evaluators=[ZeroShotEvaluator([TASK], tasks_dir=tasks_dir, limit=limit, progress=False)])
        s._loaded = LoadedModel(tiny_model("llama", seed=1, dtype=torch.float64), _tokenizer(), "tiny", "")
        s._text = Text("random", "tiny", "generated")
        s._windows = torch.randint(2, 96, (2, 16), generator=torch.Generator().manual_seed(0))
        return s

    recipes = [load_recipe("fp"), load_recipe(DESTROY)]
    reports = run_compare(session(), recipes, tmp_path)
    direct = evaluate(fp, _tokenizer(), TASK, tasks_dir=tasks_dir, progress=False)
    assert reports[0]["evaluation"]["zeroshot"]["mean"] == pytest.approx(direct.mean)
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert rows[0][f"zeroshot/{TASK}"] == rows[0]["zeroshot_mean"] == pytest.approx(direct.mean)
    assert rows[1]["zeroshot_mean"] == reports[1]["evaluation"]["zeroshot"]["mean"]
    md = (tmp_path / "compare.md").read_text()
    assert f"| {TASK} | 0-shot mean |" in md and f"acc_norm for {TASK}" in md and "lm-eval 0.4." in md
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert f"| {TASK} | 0-shot mean |" in report_markdown(reports)
    with pytest.raises(SpikequantError, match="other settings"):
        run_compare(session(limit=2), recipes, tmp_path, resume=True)
