"""Finite fields GF(p^k), just enough for Paley constructions: subtraction and the quadratic character.

Elements are integers 0..q-1 whose base-p digits are the coefficients of a polynomial over GF(p)
(lowest degree first); multiplication is modulo a fixed monic irreducible polynomial of degree k.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np


def factorize(n: int) -> dict[int, int]:
    out: dict[int, int] = {}
    d = 2
    while d * d <= n:
        while n % d == 0:
            out[d] = out.get(d, 0) + 1
            n //= d
        d += 1
    if n > 1:
        out[n] = out.get(n, 0) + 1
    return out


def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, or None if q is not a prime power (q >= 2)."""
    if q < 2:
        return None
    f = factorize(q)
    if len(f) != 1:
        return None
    (p, k), = f.items()
    return p, k


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); f monic, coefficient lists lowest degree first."""
    a = a[:]
    k = len(f) - 1
    for i in range(len(a) - 1, k - 1, -1):
        c = a[i] % p
        if c:
            for j in range(k + 1):
                a[i - k + j] = (a[i - k + j] - c * f[j]) % p
    return [x % p for x in a[:k]] + [0] * max(0, k - len(a))


def _polymul(a: list[int], b: list[int], p: int) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] = (out[i + j] + x * y) % p
    return out


@cache
def irreducible_polynomial(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree k over GF(p) in lexicographic order."""
    if k == 1:
        return (0, 1)
    for low in itertools.product(range(p), repeat=k):
        f = list(low) + [1]
        if f[0] == 0:
            continue  # divisible by x
        # Irreducible iff no monic factor of degree 1..k//2 divides it.
        factors = (list(g) + [1] for d in range(1, k // 2 + 1) for g in itertools.product(range(p), repeat=d))
        if all(any(_polymod(f, g, p)) for g in factors):
            return tuple(f)
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")  # impossible for a field


class GaloisField:
    """GF(q), q = p^k, with elements encoded as integers 0..q-1."""

    def __init__(self, q: int) -> None:
        pk = prime_power(q)
        if pk is None:
            raise ValueError(f"{q} is not a prime power, so GF({q}) does not exist")
        self.q, (self.p, self.k) = q, pk
        self.modulus = irreducible_polynomial(self.p, self.k)
        powers = self.p ** np.arange(self.k)
        self.digits = (np.arange(q)[:, None] // powers) % self.p  # (q, k) coefficient table
        self._powers = powers

    def encode(self, digits: np.ndarray) -> np.ndarray:
        return (digits % self.p) @ self._powers

    def add(self, a, b):
        return self.encode(self.digits[a] + self.digits[b])

    def sub(self, a, b):
        return self.encode(self.digits[a] - self.digits[b])

    def mul(self, a: int, b: int) -> int:
        prod = _polymul(list(self.digits[a]), list(self.digits[b]), self.p)
        return int(self.encode(np.array(_polymod(prod, list(self.modulus), self.p))))

    def quadratic_character(self) -> np.ndarray:
        """chi[a] = 0 for a = 0, 1 if a is a non-zero square, -1 otherwise (int8 array of length q)."""
        chi = -np.ones(self.q, dtype=np.int8)
        chi[0] = 0
        for x in range(1, self.q):
            chi[self.mul(x, x)] = 1
        return chi
