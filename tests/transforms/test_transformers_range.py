import pytest

from spikequant.errors import SpikequantError
from spikequant.transforms import online


def test_installed_transformers_is_in_the_tested_range():
    online.check_transformers()  # the suite runs on a tested version (constraints.txt pins one)


@pytest.mark.parametrize("version", ["4.56.2", "5.25.0", "6.0.0", "4.57.5"])
def test_untested_transformers_fails_in_one_line(version):
    with pytest.raises(SpikequantError) as e:
        online.check_transformers(version)
    msg = str(e.value)
    assert "\n" not in msg and version in msg and online.TESTED_TRANSFORMERS[0] in msg


def test_register_wrapper_checks_the_version_before_touching_internals(monkeypatch):
    monkeypatch.setattr(online, "_installed_transformers", lambda: "99.0.0")
    with pytest.raises(online.TransformersVersionError, match="99.0.0"):
        online.register_wrapper("sdpa")
