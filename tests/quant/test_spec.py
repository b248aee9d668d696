import pytest

from spikequant.errors import RecipeError
from spikequant.quant import QuantSpec


@pytest.mark.parametrize("bad,needle", [
    ({"bits": 9}, "bits"),
    ({"bits": 1}, "bits"),
    ({"granularity": "row"}, "granularity"),
    ({"granularity": "group"}, "group_size"),
    ({"group_size": 8}, "group_size"),
    ({"clip_ratio": 0.0}, "clip_ratio"),
    ({"clip_ratio": 1.5}, "clip_ratio"),
    ({"format": "fp4"}, "format"),
    ({"format": "fp8_e4m3", "symmetric": False}, "symmetric"),
    ({"observer": "percentile", "granularity": "channel"}, "percentile"),
    ({"colour": 1}, "colour"),
])
def test_invalid_specs_fail_naming_the_problem(bad, needle):
    with pytest.raises(RecipeError, match=needle):
        QuantSpec.from_dict(bad, "weights")


def test_round_trip_and_null():
    spec = QuantSpec(bits=4, granularity="group", group_size=32, symmetric=False)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert QuantSpec.from_dict(None) is None
    assert spec.label == "int4-g32-dyn-asym"
