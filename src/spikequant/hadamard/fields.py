"""Finite fields GF(p^k): the arithmetic and the quadratic character that Paley constructions need.

An element is an integer 0..q-1 whose base-p digits are the coefficients of a polynomial over GF(p), lowest
degree first; products are reduced modulo a fixed monic irreducible polynomial of degree k. All operations
are vectorized over numpy integer arrays (plain ints work too), because a Jacobsthal matrix needs q² of them.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np

IntLike = int | np.ndarray


def factorize(n: int) -> dict[int, int]:
    """Prime factorization {p: exponent} of n >= 1 by trial division (orders here are < 10^7)."""
    out: dict[int, int] = {}
    d = 2
    while d * d <= n:
        while n % d == 0:
            out[d] = out.get(d, 0) + 1
            n //= d
        d += 1 if d == 2 else 2
    if n > 1:
        out[n] = out.get(n, 0) + 1
    return out


@cache
def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k and p prime, or None when q is not a prime power (q < 2 included)."""
    if q < 2:
        return None
    f = factorize(q)
    if len(f) != 1:
        return None
    ((p, k),) = f.items()
    return p, k


def _poly_rem(a: list[int], f: tuple[int, ...], p: int) -> list[int]:
    """a mod f over GF(p); f monic; coefficient lists lowest degree first; result has len(f) - 1 entries."""
    a = [c % p for c in a]
    d = len(f) - 1
    for top in range(len(a) - 1, d - 1, -1):
        c = a[top]
        if c:
            for j in range(d + 1):
                a[top - d + j] = (a[top - d + j] - c * f[j]) % p
    return (a + [0] * d)[:d]


@cache
def irreducible_polynomial(p: int, k: int) -> tuple[int, ...]:
    """The lexicographically first monic irreducible polynomial of degree k over GF(p), lowest degree first.

    A polynomial of degree k is reducible iff it has a monic factor of degree <= k/2, so trial division by
    all of those decides it; the fields used here are small enough for that to be instant.
    """
    if k == 1:
        return (0, 1)  # x: GF(p) itself, elements are residues
    divisors = [tuple(g) + (1,) for d in range(1, k // 2 + 1) for g in itertools.product(range(p), repeat=d)]
    for low in itertools.product(range(p), repeat=k):
        f = tuple(low) + (1,)
        if f[0] == 0:
            continue  # divisible by x
        if all(any(_poly_rem(list(f), g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # one exists for every p, k


class GaloisField:
    """GF(q), q = p^k, elements encoded as integers 0..q-1 (see the module docstring)."""

    def __init__(self, q: int) -> None:
        pk = prime_power(q)
        if pk is None:
            raise ValueError(f"{q} is not a prime power, so GF({q}) does not exist")
        self.q = q
        self.p, self.k = pk
        self.modulus = irreducible_polynomial(self.p, self.k)
        self._place = self.p ** np.arange(self.k, dtype=np.int64)  # digit i has place value p^i

    # -- encoding -------------------------------------------------------------------------------------
    def digits(self, a: IntLike) -> np.ndarray:
        """Polynomial coefficients of a, shape (*a.shape, k), lowest degree first."""
        return (np.asarray(a, dtype=np.int64)[..., None] // self._place) % self.p

    def encode(self, digits: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`digits` (coefficients are reduced mod p first)."""
        return (np.asarray(digits, dtype=np.int64) % self.p) @ self._place

    # -- arithmetic -----------------------------------------------------------------------------------
    def add(self, a: IntLike, b: IntLike) -> np.ndarray:
        if self.k == 1:
            return (np.asarray(a, dtype=np.int64) + b) % self.p
        return self.encode(self.digits(a) + self.digits(b))

    def neg(self, a: IntLike) -> np.ndarray:
        if self.k == 1:
            return (-np.asarray(a, dtype=np.int64)) % self.p
        return self.encode(-self.digits(a))

    def sub(self, a: IntLike, b: IntLike) -> np.ndarray:
        if self.k == 1:
            return (np.asarray(a, dtype=np.int64) - b) % self.p
        return self.encode(self.digits(a) - self.digits(b))

    def mul(self, a: IntLike, b: IntLike) -> np.ndarray:
        if self.k == 1:
            return (np.asarray(a, dtype=np.int64) * b) % self.p
        da, db = np.broadcast_arrays(self.digits(a), self.digits(b))
        k, p, f = self.k, self.p, self.modulus
        prod = np.zeros(da.shape[:-1] + (2 * k - 1,), dtype=np.int64)
        for i in range(k):
            prod[..., i:i + k] += da[..., i:i + 1] * db
        prod %= p
        # Reduce degree 2k-2 down to k-1 using x^k = -(f_0 + f_1 x + ... + f_{k-1} x^{k-1}).
        for top in range(2 * k - 2, k - 1, -1):
            c = prod[..., top:top + 1]
            prod[..., top - k:top] = (prod[..., top - k:top] - c * np.asarray(f[:k])) % p
        return self.encode(prod[..., :k])

    def pow(self, a: int, e: int) -> int:
        """a^e by square-and-multiply (e >= 0)."""
        result, base = 1, int(a)
        while e:
            if e & 1:
                result = int(self.mul(result, base))
            base = int(self.mul(base, base))
            e >>= 1
        return result

    def inv(self, a: int) -> int:
        """Multiplicative inverse, a^(q-2) (Lagrange: a^(q-1) = 1 for a != 0)."""
        if a % self.q == 0:
            raise ZeroDivisionError("0 has no inverse in a field")
        return self.pow(a, self.q - 2)

    def quadratic_character(self) -> np.ndarray:
        """chi as an int8 array of length q: chi[0] = 0, chi[a] = 1 for non-zero squares, -1 otherwise."""
        chi = -np.ones(self.q, dtype=np.int8)
        chi[self.mul(np.arange(1, self.q), np.arange(1, self.q))] = 1
        chi[0] = 0
        return chi

    def __repr__(self) -> str:
        return f"GaloisField({self.q} = {self.p}^{self.k}, modulus={self.modulus})"
