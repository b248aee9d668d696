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
