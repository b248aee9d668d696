import pytest

from spikequant.pipeline import Session


@pytest.fixture(scope="module")
def make_session(data_dir):
    """A loaded Session on the default model over the first ``max_windows`` windows of ``seqlen``."""

    def make(seqlen: int, max_windows: int) -> Session:
        s = Session(data_dir=str(data_dir), seqlen=seqlen, max_windows=max_windows, progress=False)
        s.load()
        return s

    return make
