import os
from pathlib import Path

import pytest
import torch

from spikequant.models.tiny import TINY_ARCHS, tiny_model

REPO = Path(__file__).resolve().parents[1]
# The shared WikiText-2 folder sits beside the repository in this workplace; $SPIKEQUANT_DATA_DIR wins.
DATA_DIR = Path(os.environ.get("SPIKEQUANT_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(params=TINY_ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny64(arch):
    return tiny_model(arch, dtype=torch.float64)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wikitext-2" / "wiki.test.raw").exists():
        pytest.skip(f"WikiText-2 not found under {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _one_thread_for_unit_tests(request):
    """Unit tests multiply many small matrices; on a shared 2-core machine the start-up of a second
    intra-op thread for each of them costs more than the work (up to ~20x slower under load). The
    integration tests run the real model and keep torch's thread count."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
