import pytest
import torch

from spikequant.models.tiny import tiny_model
from spikequant.transforms import use_precise_norms

TOL = 1e-9


def pair(arch: str, **overrides):
    """A float64 tiny model and an identical reference, both with float64 norms (HF norms round
    through float32, which would dominate a 1e-9 check)."""
    ref = use_precise_norms(tiny_model(arch, dtype=torch.float64, **overrides))
    model = use_precise_norms(tiny_model(arch, dtype=torch.float64, **overrides))
    return model, ref


@torch.no_grad()
def max_logit_diff(a, b, vocab: int = 96) -> float:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    return float((a(ids).logits - b(ids).logits).abs().max())


@pytest.fixture
def make_pair():
    return pair
