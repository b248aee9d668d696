import math

import torch
import torch.nn.functional as F

from spikequant.eval import evaluate, reference_logprobs
from spikequant.models.tiny import tiny_model
from spikequant.pipeline import quantize
from spikequant.recipes import load_recipe


def test_ppl_matches_hf_loss():
    model = tiny_model("llama")
    windows = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(0))
    res = evaluate(model, windows, progress=False)
    losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert math.isclose(res.ppl, math.exp(sum(losses) / 3), rel_tol=1e-5)
    assert res.tokens == 57 and res.kl is None


@torch.no_grad()
def test_kl_and_top1_against_reference():
    ref = tiny_model("qwen3")
    model = tiny_model("qwen3")
    quantize(model, load_recipe("w8a8-tensor"))
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    same = evaluate(ref, windows, reference=ref, progress=False)
    assert same.kl == 0.0 and same.top1 == 1.0
    res = evaluate(model, windows, reference=ref, progress=False)
    kl = agree = 0.0
    for w in windows:
        p = F.log_softmax(ref(w[None]).logits[0, :-1], -1)
        q = F.log_softmax(model(w[None]).logits[0, :-1], -1)
        kl += float((p.exp() * (p - q)).sum())
        agree += float((p.argmax(-1) == q.argmax(-1)).sum())
    assert res.kl > 0 and math.isclose(res.kl, kl / 30, rel_tol=1e-4)
    assert math.isclose(res.top1, agree / 30)
    cached = evaluate(model, windows, reference=reference_logprobs(ref, windows, progress=False), progress=False)
    assert math.isclose(cached.kl, res.kl, rel_tol=1e-5)


def test_evaluate_leaves_the_flush_denormal_flag_as_it_was():
    from spikequant.eval.perplexity import flush_denormal_enabled

    model = tiny_model("llama")
    windows = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    before = flush_denormal_enabled()
    try:
        for state in (False, True, False):
            torch.set_flush_denormal(state)
            assert flush_denormal_enabled() is state  # the probe reads the flag
            evaluate(model, windows, progress=False)
            assert flush_denormal_enabled() is state
    finally:
        torch.set_flush_denormal(before)


def test_evaluate_flushes_denormals_while_it_runs():
    from spikequant.eval.perplexity import flush_denormal_enabled

    model = tiny_model("llama")
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(flush_denormal_enabled()))
    torch.set_flush_denormal(False)
    evaluate(model, torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert seen == [True] and not flush_denormal_enabled()
