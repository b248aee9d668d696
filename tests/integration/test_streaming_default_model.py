"""SmolLM2-135M streamed one decoder layer at a time gives the in-memory perplexity exactly."""

import pytest

from spikequant.eval.perplexity import evaluate
from spikequant.streaming import StreamedModel, evaluate_streamed

pytestmark = pytest.mark.integration


def test_streamed_ppl_equals_in_memory(make_session):
    session = make_session(128, 2)
    mem = evaluate(session.loaded.model, session.windows, progress=False)
    sm = StreamedModel(session.model_source)
    disk = evaluate_streamed(sm, session.windows, progress=False)
    assert disk.ppl == mem.ppl and disk.tokens == mem.tokens


def test_streamed_smoothquant_equals_in_memory(make_session, tmp_path):
    """smoothquant-ext-w8a8-tensor-static (the four folds, static scales) streamed, with 2 x 128 tokens for
    the statistics and the calibration: the same weights and scales as in memory."""
    import copy

    import torch
    from safetensors.torch import load_file

    from spikequant.export import save_quantized
    from spikequant.export.saving import QPARAMS
    from spikequant.pipeline import quantize
    from spikequant.recipes import load_recipe
    from spikequant.streaming import quantize_streamed

    session = make_session(128, 2)
    recipe = load_recipe("smoothquant-ext-w8a8-tensor-static")
    calib = session.windows
    model = copy.deepcopy(session.loaded.model)
    qm, findings = quantize(model, recipe, calib, progress=False)
    save_quantized(qm, session.loaded.tokenizer, recipe, session.model_source, tmp_path / "mem", findings)
    sm = StreamedModel(session.model_source)
    _, sfind = quantize_streamed(sm, recipe, calib, tmp_path / "disk", session.model_source, progress=False)
    assert sfind["smoothquant"] == findings["smoothquant"]
    mem = {}
    for f in (tmp_path / "mem").glob("*.safetensors"):
        if f.name != QPARAMS:
            mem.update(load_file(str(f)))
    disk = {}
    for f in (tmp_path / "disk").glob("*.safetensors"):
        if f.name != QPARAMS:
            disk.update(load_file(str(f)))
    assert mem and sorted(mem) == sorted(disk)
    assert all(torch.equal(mem[k], disk[k]) for k in mem)
    qa, qb = load_file(str(tmp_path / "mem" / QPARAMS)), load_file(str(tmp_path / "disk" / QPARAMS))
    assert sorted(qa) == sorted(qb) and all(torch.equal(qa[k], qb[k]) for k in qa)
