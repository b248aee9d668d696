import itertools

import pytest

from spikequant.hadamard.fields import GaloisField, prime_power


def test_prime_power():
    assert prime_power(343) == (7, 3)
    assert prime_power(73) == (73, 1)
    assert prime_power(12) is None and prime_power(1) is None


@pytest.mark.parametrize("q", [4, 8, 9, 25, 27, 49])
def test_field_axioms(q):
    f = GaloisField(q)
    els = range(q)
    for a, b in itertools.product(els, els):
        assert f.mul(a, b) == f.mul(b, a)
        assert f.add(a, b) == f.add(b, a)
        assert f.add(f.sub(a, b), b) == a
    for a in range(1, q):  # every non-zero element has an inverse
        assert any(f.mul(a, b) == 1 for b in range(1, q))
    for a, b, c in itertools.islice(itertools.product(els, els, els), 0, None, 7):
        assert f.mul(a, f.add(b, c)) == f.add(f.mul(a, b), f.mul(a, c))
    chi = f.quadratic_character()
    assert (chi == 1).sum() == (q - 1) // 2 if q % 2 else True  # half the non-zero elements are squares


def test_not_a_field():
    with pytest.raises(ValueError, match="12 is not a prime power"):
        GaloisField(12)
