import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests multiply many small matrices; on a shared 2-core machine the start-up of a second
    # intra-op thread for each of them costs more than the work, so they run single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
