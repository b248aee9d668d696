"""Hadamard matrices of every order these rules reach: Sylvester (2^k), Paley I (q + 1, q ≡ 3 mod 4),
Paley II (2(q + 1), q ≡ 1 mod 4), and Kronecker products of those.

An order n is decomposed as n = m · 2^k with the smallest dense factor m that has a construction, so the
online transform costs a fast Walsh–Hadamard transform plus an m x m matmul. The dense matrix is
H_n = H_{2^k} ⊗ H_m (Sylvester in natural order), which is exactly what the fast transform applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch

from spikequant.errors import SpikequantError
from spikequant.hadamard.fields import GaloisField, prime_power


class NoHadamardError(SpikequantError, ValueError):
    """No construction known here for this order; the message names constructible sizes above it."""

    def __init__(self, n: int, above: list[int]) -> None:
        self.n, self.above = n, above
        hint = f"; use dimension expansion (expand: +{above[0] - n} -> {above[0]})" if above else ""
        super().__init__(
            f"no Hadamard construction for n={n}; nearest constructible sizes above: "
            f"{', '.join(map(str, above))}{hint}"
        )


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@cache
def base_rule(m: int) -> str | None:
    """How an order is built directly (not as a product), or None."""
    if _is_pow2(m):
        return "sylvester"
    pk = prime_power(m - 1)
    if pk is not None and (m - 1) % 4 == 3:
        return f"paley1(q={m - 1})"
    if m % 2 == 0:
        pk = prime_power(m // 2 - 1)
        if pk is not None and (m // 2 - 1) % 4 == 1:
            return f"paley2(q={m // 2 - 1})"
    return None


@cache
def rule(m: int) -> str | None:
    """A recipe for order m: a base rule or a Kronecker product 'a x b' of constructible orders."""
    if m < 1 or (m > 2 and m % 4):
        return None
    direct = base_rule(m)
    if direct is not None:
        return direct
    for a in range(4, math.isqrt(m) + 1, 4):
        if m % a == 0 and rule(a) is not None and rule(m // a) is not None:
            return f"{a} x {m // a}"
    return None


def is_constructible(n: int) -> bool:
    return rule(n) is not None


def next_constructible(n: int, count: int = 3) -> list[int]:
    """The ``count`` smallest constructible orders strictly above ``n`` (feeds Dimension Expansion)."""
    out, m = [], n + 1
    while len(out) < count:
        if is_constructible(m):
            out.append(m)
        m += 1
    return out


@dataclass(frozen=True)
class HadamardPlan:
    n: int
    m: int  # dense factor, applied as a matmul
    pow2: int  # Sylvester factor, applied as a fast Walsh–Hadamard transform
    construction: str  # how H_m is built

    @property
    def online_macs(self) -> int:
        """Multiply-adds per vector: n·log2(2^k) for the butterflies plus n·m for the dense factor."""
        return self.n * int(math.log2(self.pow2)) + (self.n * self.m if self.m > 1 else 0)

    @property
    def dense_macs(self) -> int:
        return self.n * self.n

    def describe(self) -> str:
        fac = f"{self.m} x 2^{int(math.log2(self.pow2))}" if self.m > 1 else f"2^{int(math.log2(self.pow2))}"
        return (f"n={self.n} = {fac}: H_{self.m} by {self.construction}, online cost {self.online_macs:,} MACs/vector "
                f"(dense {self.dense_macs:,}, {self.dense_macs / self.online_macs:.0f}x fewer)")


@cache
def plan(n: int) -> HadamardPlan:
    """The cheapest decomposition n = m · 2^k with a constructible m; raises :class:`NoHadamardError`."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    pow2 = n & -n  # largest power of two dividing n
    # Smallest m first: m = n / 2^j for j from the largest power down.
    j = pow2
    while j >= 1:
        m = n // j
        # n / pow2 is odd, so m is 1 (n a power of two) or a multiple of 4 from here on.
        if m == 1 or rule(m) is not None:
            return HadamardPlan(n=n, m=m, pow2=j, construction="sylvester" if m == 1 else str(rule(m)))
        j //= 2
    raise NoHadamardError(n, next_constructible(n))


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    f = GaloisField(q)
    chi = f.quadratic_character()
    diff = f.encode(f.digits[:, None, :] - f.digits[None, :, :])  # a_i - a_j for all pairs
    return chi[diff]


def _paley1(q: int) -> np.ndarray:
    qm = _jacobsthal(q)  # antisymmetric for q ≡ 3 (mod 4)
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = qm
    return (s + np.eye(q + 1, dtype=np.int8)).astype(np.int8)


def _paley2(q: int) -> np.ndarray:
    qm = _jacobsthal(q)  # symmetric for q ≡ 1 (mod 4)
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = qm
    a = np.array([[1, 1], [1, -1]], dtype=np.int8)  # replaces ±1 entries
    b = np.array([[1, -1], [-1, -1]], dtype=np.int8)  # replaces the zero diagonal
    return (np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int8), b)).astype(np.int8)


@lru_cache(maxsize=64)
def _build(m: int) -> np.ndarray:
    r = rule(m)
    if r is None:
        raise NoHadamardError(m, next_constructible(m))
    if r == "sylvester":
        return _sylvester(m)
    if r.startswith("paley1"):
        return _paley1(m - 1)
    if r.startswith("paley2"):
        return _paley2(m // 2 - 1)
    a, b = (int(t) for t in r.split(" x "))
    return np.kron(_build(a), _build(b))


def factor_matrix(m: int) -> torch.Tensor:
    """The ±1 matrix H_m (int8) of a constructible order, cached."""
    h = _build(m)
    h.setflags(write=False)
    return torch.from_numpy(h.copy())


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The n x n ±1 Hadamard matrix H_{2^k} ⊗ H_m of :func:`plan` (unnormalized: H·Hᵀ = n·I)."""
    p = plan(n)
    a = factor_matrix(p.m).to(dtype) if p.m > 1 else torch.ones(1, 1, dtype=dtype)
    return torch.kron(torch.from_numpy(_sylvester(p.pow2)).to(dtype), a)


def verify(n: int, dense_limit: int = 4096) -> str:
    """Check H·Hᵀ = n·I exactly; returns what was checked.

    Up to ``dense_limit`` the whole matrix is multiplied out in integer-exact float64. Above it both
    Kronecker factors are checked exactly, which suffices: (A⊗B)(A⊗B)ᵀ = AAᵀ ⊗ BBᵀ = mI ⊗ 2^kI = nI.
    """
    p = plan(n)

    def exact(h: torch.Tensor) -> bool:
        h = h.to(torch.float64)  # entries ±1, sums <= n < 2^53: float64 products are exact integers
        return torch.equal(h @ h.T, h.shape[0] * torch.eye(h.shape[0], dtype=torch.float64))

    if n <= dense_limit:
        if not exact(hadamard_matrix(n)):
            raise AssertionError(f"H·Hᵀ != n·I for n={n}")
        return "full matrix"
    parts = [factor_matrix(p.m)] if p.m > 1 else []
    parts.append(torch.from_numpy(_sylvester(p.pow2)))
    if not all(exact(h) for h in parts):
        raise AssertionError(f"a Kronecker factor of n={n} is not Hadamard")
    return f"factors {p.m} and {p.pow2} exactly (Kronecker product)"
