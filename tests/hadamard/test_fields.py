import itertools

import numpy as np
import pytest

from spikequant.hadamard.constructions import jacobsthal
from spikequant.hadamard.fields import GaloisField, _poly_rem, factorize, irreducible_polynomial, prime_power

SMALL_FIELDS = [2, 3, 4, 5, 7, 8, 9, 11, 16, 25, 27, 49]


def test_prime_powers():
    assert prime_power(343) == (7, 3)
    assert prime_power(73) == (73, 1)
    assert prime_power(2 ** 10) == (2, 10)
    assert all(prime_power(q) is None for q in (0, 1, 6, 12, 15, 100, 343 * 2))
    assert factorize(13696) == {2: 7, 107: 1}


def _polymul(a: tuple[int, ...], b: tuple[int, ...], p: int) -> tuple[int, ...]:
    out = [0] * (len(a) + len(b) - 1)
    for i, j in itertools.product(range(len(a)), range(len(b))):
        out[i + j] = (out[i + j] + a[i] * b[j]) % p
    return tuple(out)


@pytest.mark.parametrize("p,k", [(2, 2), (2, 3), (2, 4), (3, 2), (3, 3), (5, 2), (7, 3)])
def test_irreducible_polynomial_has_no_factorization(p, k):
    f = irreducible_polynomial(p, k)
    assert len(f) == k + 1 and f[-1] == 1
    # Brute force, independent of the trial division inside: no product of two monic polynomials of
    # positive degrees d and k - d equals f.
    for d in range(1, k // 2 + 1):
        for g in itertools.product(range(p), repeat=d):
            for h in itertools.product(range(p), repeat=k - d):
                assert _polymul(g + (1,), h + (1,), p) != f


def test_poly_rem():
    # x^3 + 1 = (x + 1)(x^2 + x + 1) over GF(2)... and x^3 + 1 mod x^2 + 1 = x + 1 over GF(2)
    assert _poly_rem([1, 0, 0, 1], (1, 1, 1), 2) == [0, 0]
    assert _poly_rem([1, 0, 0, 1], (1, 0, 1), 2) == [1, 1]


@pytest.mark.parametrize("q", SMALL_FIELDS)
def test_field_axioms(q):
    f = GaloisField(q)
    a, b = np.meshgrid(np.arange(q), np.arange(q), indexing="ij")
    add, mul = f.add(a, b), f.mul(a, b)
    els = np.arange(q)
    # closure, commutativity, identities, additive inverses
    assert add.min() >= 0 and add.max() < q and mul.min() >= 0 and mul.max() < q
    assert np.array_equal(add, add.T) and np.array_equal(mul, mul.T)
    assert np.array_equal(add[0], els) and np.array_equal(mul[1], els) and not mul[0].any()
    assert np.array_equal(f.add(els, f.neg(els)), np.zeros(q))
    assert np.array_equal(f.sub(a, b), f.add(a, f.neg(b)))
    # every row of the tables is a permutation: a + x = c and a·x = c (a != 0) have unique solutions
    assert all(len(set(row)) == q for row in add)
    assert all(len(set(row)) == q for row in mul[1:])  # so no zero divisors and inverses exist
    for x in range(1, q):
        assert f.mul(x, f.inv(x)) == 1
    # associativity and distributivity on all triples
    a3, b3, c3 = np.meshgrid(els, els, els, indexing="ij")
    assert np.array_equal(f.add(f.add(a3, b3), c3), f.add(a3, f.add(b3, c3)))
    assert np.array_equal(f.mul(f.mul(a3, b3), c3), f.mul(a3, f.mul(b3, c3)))
    assert np.array_equal(f.mul(a3, f.add(b3, c3)), f.add(f.mul(a3, b3), f.mul(a3, c3)))
    # characteristic p, and the multiplicative group is cyclic of order q - 1
    total = np.zeros(q, dtype=np.int64)
    for _ in range(f.p):
        total = f.add(total, els)
    assert not total.any()  # p·a = 0 for every a
    assert any(len({f.pow(g, e) for e in range(q - 1)}) == q - 1 for g in range(1, q))


def test_big_prime_power_field_343():
    f = GaloisField(343)
    rng = np.random.default_rng(0)
    a, b, c = rng.integers(0, 343, (3, 2000))
    assert np.array_equal(f.mul(f.mul(a, b), c), f.mul(a, f.mul(b, c)))
    assert np.array_equal(f.mul(a, f.add(b, c)), f.add(f.mul(a, b), f.mul(a, c)))
    assert all(f.mul(x, f.inv(x)) == 1 for x in range(1, 343, 7))
    assert f.pow(5, 342) == 1


@pytest.mark.parametrize("q", [3, 5, 7, 9, 11, 13, 25, 27, 49, 343])
def test_quadratic_character_and_jacobsthal(q):
    f = GaloisField(q)
    chi = f.quadratic_character().astype(int)
    assert chi[0] == 0 and (chi[1:] == 1).sum() == (q - 1) // 2 and chi.sum() == 0
    a, b = np.meshgrid(np.arange(1, q), np.arange(1, q), indexing="ij")
    assert np.array_equal(chi[f.mul(a, b)], chi[a] * chi[b])  # multiplicative
    assert chi[f.neg(1)] == (1 if q % 4 == 1 else -1)
    j = jacobsthal(q).astype(np.int64)
    # Q·Qᵀ = q·I - J and Q·J = 0: the identities Paley's constructions rest on.
    assert np.array_equal(j @ j.T, q * np.eye(q, dtype=np.int64) - 1)
    assert not (j @ np.ones(q, dtype=np.int64)).any()
    assert np.array_equal(j.T, j if q % 4 == 1 else -j)


def test_not_a_field():
    with pytest.raises(ValueError, match="12 is not a prime power"):
        GaloisField(12)
    with pytest.raises(ZeroDivisionError):
        GaloisField(7).inv(0)
