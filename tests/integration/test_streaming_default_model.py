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
