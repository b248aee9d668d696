"""Hadamard matrices of every order these rules reach, and the plan for applying them fast.

Rules: Sylvester (2^k), Paley I (q + 1 for a prime power q ≡ 3 mod 4), Paley II (2(q + 1) for a prime power
q ≡ 1 mod 4), the stored orders 156, 172 and 428 that Paley misses (``stored.py``: Baumert–Hall,
Williamson and Goethals–Seidel matrices from published sequences), and Kronecker products of those. So the
constructible orders are exactly n = 2^k · m1 · m2 · ... with each m_i a base order (Paley or stored), and
H_n = H_{2^k} ⊗ H_{m1} ⊗ H_{m2} ⊗ ...

The online transform applies each Kronecker factor on its own axis: Sylvester blocks of at most 16 for 2^k
and one matmul per base factor. :func:`plan` picks, among all splits n = 2^k · m with m a product of base
orders, the one with the **least online cost** under a simple model of that schedule (:func:`plan_cost`):
every pass over the data costs ``PASS_COST`` multiply-add equivalents per element, plus the multiply-adds
of its block (the structured product of ``structured.py`` for a large Paley I factor over GF(p^k) when it
is cheaper). Usually that is the smallest dense factor; 11008 = 172·2^6 (Williamson) beats 344·2^5
(Paley I over GF(7³)), and :func:`alternatives` lists what else was possible, with costs.

Ordering (what the fast transform reproduces exactly): ``hadamard_matrix(n) = kron(H_{2^k}, H_{m1}, ...)``
with H_{2^k} Sylvester in natural order, H[i, j] = (-1)^popcount(i & j), and the base factors in
ascending order. Index i of a vector is its row-major position in a (2^k, m1, m2, ...) grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch

from spikequant.errors import SpikequantError
from spikequant.hadamard.fields import GaloisField, prime_power
from spikequant.hadamard.stored import STORED, stored_matrix

# A dense factor up to this order keeps the online transform cheap (n·m MACs per vector, at most a quarter
# of one 4096-wide matmul row). Expansion targets are reported both with and without this limit.
FAST_FACTOR = 1024
# Cost model of the planner, in multiply-add equivalents per element: one pass over the data (a GEMM or a
# batched matmul on one grid axis, or an elementwise op) costs PASS_COST on top of its multiply-adds; the
# Sylvester factor goes in blocks of at most SYLVESTER_BLOCK. PASS_COST is a rough setting, not a fit: the
# plans it picks were timed against their alternatives (bench/bench_hadamard_plans.py, docs/hadamard.md).
PASS_COST = 32
SYLVESTER_BLOCK = 16
# A GEMM whose inner dimension is below this runs at the speed of one this wide (the transform widens a lone
# narrow factor to it by absorbing factors H_2), so a base factor costs at least this many multiply-adds.
MIN_GEMM = 32
# The model is coarse, and a different plan is a different matrix (every fused rotation changes with it), so
# the smallest dense factor keeps its place unless another plan is cheaper by more than this fraction.
COST_TOLERANCE = 0.15


class NoHadamardError(SpikequantError, ValueError):
    """No rule here constructs a Hadamard matrix of this order; the message names sizes above it."""

    def __init__(self, n: int, above: list[int], fast_above: list[int]) -> None:
        self.n, self.above, self.fast_above = n, above, fast_above
        self.target = fast_above[0]
        super().__init__(
            f"no Hadamard construction for n={n}; nearest constructible sizes above: "
            f"{', '.join(map(str, fast_above))} (dense factor <= {FAST_FACTOR}; with any factor: "
            f"{', '.join(map(str, above))}); use dimension expansion "
            f"(expand: +{self.target - n} -> {self.target})"
        )


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@cache
def paley_rule(m: int) -> tuple[str, int] | None:
    """("paley1", q) if m = q + 1 with q ≡ 3 (mod 4), ("paley2", q) if m = 2(q + 1) with q ≡ 1 (mod 4),
    q a prime power; None otherwise, and for powers of two (Sylvester covers those more cheaply)."""
    if m < 4 or m % 4 or _is_pow2(m):
        return None
    q = m - 1
    if q % 4 == 3 and prime_power(q):
        return ("paley1", q)
    q = m // 2 - 1
    if q % 4 == 1 and prime_power(q):
        return ("paley2", q)
    return None


def is_base_order(m: int) -> bool:
    """Whether H_m is built directly (a Paley order or a stored one), not as a Kronecker product."""
    return paley_rule(m) is not None or m in STORED


@cache
def factor_cost(order: int) -> float:
    """Modelled online cost per element of applying the base factor H_order on its axis: one GEMM pass and
    max(order, MIN_GEMM) multiply-adds, or the structured product (``structured.py``) when that is cheaper."""
    from spikequant.hadamard.structured import structured_cost  # structured.py imports this module

    gemm = PASS_COST + max(order, MIN_GEMM)
    structured = structured_cost(order)
    return min(gemm, structured) if structured is not None else gemm


def sylvester_blocks(pow2: int, block: int = SYLVESTER_BLOCK) -> list[int]:
    """Split 2^k into the fewest near-equal power-of-two blocks of at most ``block`` (>= 2), largest first."""
    k, kb = pow2.bit_length() - 1, max(block.bit_length() - 1, 1)
    if k == 0:
        return []
    parts = -(-k // kb)
    return [1 << (k // parts + (1 if i < k % parts else 0)) for i in range(parts)]


def plan_cost(pow2: int, factors: tuple[int, ...]) -> float:
    """Modelled online cost per element of H_{pow2} ⊗ H_{f1} ⊗ ...: PASS_COST per Sylvester block plus its
    size, plus :func:`factor_cost` of every base factor. A lone factor narrower than MIN_GEMM absorbs
    factors H_2 first, as the transform does (12·2^2 runs as one 48-wide GEMM, the same as Paley 48)."""
    if len(factors) == 1 and factors[0] < MIN_GEMM:
        width = factors[0]
        while width < MIN_GEMM and pow2 > 1:
            width, pow2 = 2 * width, pow2 // 2
        blocks = sylvester_blocks(pow2)
        return PASS_COST * (len(blocks) + 1) + sum(blocks) + max(width, MIN_GEMM)
    blocks = sylvester_blocks(pow2)
    return PASS_COST * len(blocks) + sum(blocks) + sum(factor_cost(f) for f in factors)


@cache
def dense_chain(m: int) -> tuple[int, ...] | None:
    """Base orders (ascending) whose Kronecker product is m, with the least modelled cost; () for m = 1;
    None if m is not such a product."""
    if m == 1:
        return ()
    if m % 4:
        return None
    best = (m,) if is_base_order(m) else None
    for a in range(12, math.isqrt(m) + 1, 4):  # the smallest base order that is not a power of two is 12
        if m % a == 0 and is_base_order(a):
            rest = dense_chain(m // a)
            if rest and (best is None or factor_cost(a) + sum(map(factor_cost, rest))
                         < sum(map(factor_cost, best))):
                best = tuple(sorted((a, *rest)))
    return best


def factor_name(order: int) -> str:
    """'paley1(q=343)', 'paley2(q=73)', 'williamson(43)', ... for a base order."""
    if order in STORED:
        return STORED[order].rule
    rule = paley_rule(order)
    if rule is None:
        raise ValueError(f"{order} is not a base order (Paley or stored: {sorted(STORED)})")
    return f"{rule[0]}(q={rule[1]})"


@dataclass(frozen=True)
class HadamardPlan:
    """n = 2^k · m with m = Π factors: H_n = H_{2^k} ⊗ H_{factors[0]} ⊗ ..., see the module docstring."""

    n: int
    pow2: int  # 2^k, the Sylvester factor, applied by fast Walsh–Hadamard butterflies
    m: int  # the dense factor, 1 when n is a power of two
    factors: tuple[int, ...]  # base orders whose product is m, each applied as a small matmul

    @property
    def k(self) -> int:
        """log2 of the Sylvester factor."""
        return self.pow2.bit_length() - 1

    @property
    def construction(self) -> str:
        """How H_m is built: 'sylvester' (m = 1), 'paley1(q=...)', 'williamson(43)', 'A x B' for a product."""
        return " x ".join(map(factor_name, self.factors)) if self.factors else "sylvester"

    @property
    def cost(self) -> float:
        """Modelled online cost per element (multiply-add equivalents, :func:`plan_cost`); plans minimize it."""
        return plan_cost(self.pow2, self.factors)

    @property
    def online_macs(self) -> int:
        """Multiply-adds per vector: n·log2(2^k) for the butterflies plus n·m_i for each dense factor."""
        return self.n * (self.k + sum(self.factors))

    @property
    def dense_macs(self) -> int:
        """Multiply-adds per vector of a dense n x n matmul, for comparison."""
        return self.n * self.n

    @property
    def name(self) -> str:
        """E.g. '2^12, sylvester' or '172 x 2^6, williamson(43)': dense x Sylvester factor, H_m's rule."""
        if self.m == 1:
            return f"2^{self.k}, sylvester"
        if self.pow2 == 1:
            return f"{self.m}, {self.construction}"
        return f"{self.m} x 2^{self.k}, {self.construction}"

    def describe(self) -> str:
        """One line: the split, H_m's rule, and the online against the dense cost."""
        ratio = f", {self.dense_macs / self.online_macs:.0f}x more" if self.online_macs else ""
        return (f"n={self.n} = {self.name}: online {self.online_macs:,} MACs/vector "
                f"(dense matmul {self.dense_macs:,}{ratio}), modelled cost {self.cost:.0f}/element")


@cache
def _candidates(n: int) -> tuple[HadamardPlan, ...]:
    """Every split n = 2^k · m with a construction (each m with its cheapest chain): first the chosen plan,
    the smallest m whose cost is within ``COST_TOLERANCE`` of the least, then the others, cheapest first."""
    out = []
    m = n // (n & -n)
    while m <= n:
        chain = dense_chain(m)
        if chain is not None:
            out.append(HadamardPlan(n=n, pow2=n // m, m=m, factors=chain))
        m *= 2
    if not out:
        return ()
    least = min(p.cost for p in out)
    chosen = min((p for p in out if p.cost <= least * (1 + COST_TOLERANCE)), key=lambda p: p.m)
    return (chosen, *sorted((p for p in out if p is not chosen), key=lambda p: (p.cost, p.m)))


def _plan_or_none(n: int) -> HadamardPlan | None:
    c = _candidates(n)
    return c[0] if c else None


def _check_order(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"a Hadamard order is a positive integer, got {n!r}")
    return int(n)


def plan(n: int) -> HadamardPlan:
    """The cheapest construction of order n; raises :class:`NoHadamardError` naming sizes above n."""
    n = _check_order(n)
    p = _plan_or_none(n)
    if p is None:
        raise NoHadamardError(n, next_constructible(n), next_constructible(n, max_factor=FAST_FACTOR))
    return p


def alternatives(n: int) -> list[HadamardPlan]:
    """The other constructions of order n (one per dense factor m), cheapest first; [] if there are none."""
    return list(_candidates(_check_order(n))[1:])


@cache
def previous_plan(n: int) -> HadamardPlan | None:
    """The plan of the rule before stored orders and the cost model: the smallest dense factor m that is a
    product of Paley orders (least Σ m_i). Kept to report which sizes changed; None if that rule had none."""

    @cache
    def paley_chain(m: int) -> tuple[int, ...] | None:
        if m == 1:
            return ()
        best = (m,) if paley_rule(m) else None
        for a in range(12, math.isqrt(m) + 1, 4):
            if m % a == 0 and paley_rule(a):
                rest = paley_chain(m // a)
                if rest and (best is None or a + sum(rest) < sum(best)):
                    best = tuple(sorted((a, *rest)))
        return best

    m = n // (n & -n)
    while m <= n:
        chain = paley_chain(m) if m % 4 == 0 or m == 1 else None
        if chain is not None:
            return HadamardPlan(n=n, pow2=n // m, m=m, factors=chain)
        m *= 2
    return None


def is_constructible(n: int) -> bool:
    """Whether some rule here gives a Hadamard matrix of order n."""
    return n >= 1 and _plan_or_none(n) is not None


def next_constructible(n: int, count: int = 3, max_factor: int | None = None) -> list[int]:
    """The ``count`` smallest constructible orders strictly above n (the targets of Dimension Expansion).

    With ``max_factor``, only orders whose dense factor m is at most that, i.e. with a fast online transform.
    """
    out: list[int] = []
    size = max(int(n), 0) + 1
    while len(out) < count:
        p = _plan_or_none(size)
        if p is not None and (max_factor is None or p.m <= max_factor):
            out.append(size)
        size += 1
    return out


# -- the matrices -------------------------------------------------------------------------------------------


def _sylvester(n: int) -> np.ndarray:
    """H[i, j] = (-1)^popcount(i & j), i.e. H_{2n} = [[H, H], [H, -H]] from H_1 = [1]."""
    idx = np.arange(n)
    parity = np.zeros((n, n), dtype=np.int8)
    for bit in range(max(n.bit_length() - 1, 0)):
        parity ^= (((idx[:, None] & idx[None, :]) >> bit) & 1).astype(np.int8)
    return (1 - 2 * parity).astype(np.int8)


def jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(a_i - a_j) over GF(q) (int8, q x q); symmetric if q ≡ 1 (mod 4), antisymmetric if 3."""
    f = GaloisField(q)
    chi = f.quadratic_character()
    out = np.empty((q, q), dtype=np.int8)
    elems = np.arange(q)
    rows = max(1, (1 << 22) // (q * f.k))  # bound the int64 temporaries to ~32 MB
    for r0 in range(0, q, rows):
        r = elems[r0:r0 + rows]
        out[r0:r0 + len(r)] = chi[f.sub(r[:, None], elems[None, :])]
    return out


def _paley1(q: int) -> np.ndarray:
    # S = [[0, 1ᵀ], [-1, Q]] is skew with S·Sᵀ = q·I, so H = I + S has H·Hᵀ = I + S + Sᵀ + S·Sᵀ = (q + 1)·I.
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal(q)
    s[np.diag_indices(q + 1)] = 1
    return s


def _paley2(q: int) -> np.ndarray:
    # C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix (C·Cᵀ = q·I); replacing each 0 by
    # [[1, -1], [-1, -1]] and each ±1 by ±[[1, 1], [1, -1]] doubles the order and makes it Hadamard.
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jacobsthal(q)
    plus = np.array([[1, 1], [1, -1]], dtype=np.int8)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    return (np.kron(c, plus) + np.kron(np.eye(q + 1, dtype=np.int8), zero)).astype(np.int8)


@lru_cache(maxsize=16)
def _paley(order: int) -> np.ndarray:
    rule = paley_rule(order)
    if rule is None:
        raise ValueError(f"{order} is not a Paley order (q + 1 with q ≡ 3 or 2(q + 1) with q ≡ 1 mod 4)")
    h = _paley1(rule[1]) if rule[0] == "paley1" else _paley2(rule[1])
    h.setflags(write=False)  # cached: callers get copies
    return h


def paley_matrix(order: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """The ±1 Paley I or II matrix of this order (a fresh tensor; the int8 original is cached)."""
    return torch.from_numpy(_paley(order).copy()).to(dtype)


def factor_matrix(order: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """The ±1 matrix of a base order: Paley I/II, or a stored order (checked exactly when first built)."""
    if order in STORED:
        return torch.from_numpy(stored_matrix(order).copy()).to(dtype)
    return paley_matrix(order, dtype)


def sylvester_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester's H_n (n a power of two) in natural order."""
    if not _is_pow2(n):
        raise ValueError(f"Sylvester matrices have power-of-two orders, got {n}")
    return torch.from_numpy(_sylvester(n)).to(dtype)


def dense_factor_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H_m = H_{m1} ⊗ H_{m2} ⊗ ... of ``plan(n)`` (the 1 x 1 matrix [1] when n is a power of two)."""
    h = torch.ones(1, 1, dtype=dtype)
    for f in plan(n).factors:
        h = torch.kron(h, factor_matrix(f, dtype))
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, normalized: bool = False) -> torch.Tensor:
    """The n x n Hadamard matrix H_{2^k} ⊗ H_m of :func:`plan` with entries ±1 (H·Hᵀ = n·I).

    ``normalized`` divides by √n (an orthogonal matrix). This is exactly the matrix the fast transform
    applies: ``hadamard_transform(x) == x @ hadamard_matrix(n, normalized=True).T``. A float64 matrix of
    order 18944 takes 2.9 GB; use float32 or the fast transform for large n.
    """
    p = plan(n)
    h = sylvester_matrix(p.pow2, dtype)
    if p.m > 1:
        h = torch.kron(h, dense_factor_matrix(n, dtype))
    return h / math.sqrt(n) if normalized else h


def _exactly_hadamard(h: torch.Tensor) -> bool:
    """Whether the ±1 matrix h has h·hᵀ = order·I, decided exactly.

    Every partial sum of h·hᵀ is an integer of size <= order, and integers below 2^24 (float32) or 2^53
    (float64) are represented exactly, so the floating-point product is integer arithmetic here.
    """
    n = h.shape[0]
    dtype = torch.float32 if n < 2**24 else torch.float64
    h = h.to(dtype)
    return bool(torch.all(h.abs() == 1)) and torch.equal(h @ h.T, n * torch.eye(n, dtype=dtype))


def _check_sylvester(n: int, dense_limit: int) -> str:
    """Check H_n (Sylvester) exactly and say how. Above the limit, H_n = H_2 ⊗ H_{n/2} is checked entry by
    entry (O(n²)) down to an order that is multiplied out, and the Kronecker argument covers the rest."""
    h = sylvester_matrix(n, torch.int8)
    while h.shape[0] > max(dense_limit, 2):
        half = h.shape[0] // 2
        top, bottom = h[:half], h[half:]
        if not (torch.equal(top[:, :half], top[:, half:]) and torch.equal(bottom[:, :half], top[:, :half])
                and torch.equal(bottom[:, half:], -top[:, :half])):
            raise AssertionError(f"H_{h.shape[0]} is not [[H, H], [H, -H]]")
        h = top[:, :half]
    base = h.shape[0]
    if not _exactly_hadamard(h):
        raise AssertionError(f"H_{base}·Hᵀ != {base}·I")
    if base == n:
        return f"H_{n}·H_{n}ᵀ = {n}·I"
    return f"H_{n} = H_2 ⊗ ... ⊗ H_2 ⊗ H_{base} entrywise and H_{base}·H_{base}ᵀ = {base}·I"


def verify(n: int, dense_limit: int = 2048) -> str:
    """Check H·Hᵀ = n·I exactly for the matrix of :func:`hadamard_matrix` and say how it was checked.

    Up to ``dense_limit`` the whole matrix is multiplied out. Above it every Kronecker factor is checked
    exactly, which suffices: (A ⊗ B)(A ⊗ B)ᵀ = AAᵀ ⊗ BBᵀ = aI ⊗ bI = abI. Raises AssertionError on failure.
    """
    p = plan(n)
    if n <= dense_limit:
        if not _exactly_hadamard(hadamard_matrix(n, torch.int8)):
            raise AssertionError(f"H·Hᵀ != n·I for n={n}")
        return f"H·Hᵀ = {n}·I exactly (full {n} x {n} product)"
    shown = [_check_sylvester(p.pow2, dense_limit)] if p.pow2 > 1 else []
    for f in p.factors:
        if not _exactly_hadamard(factor_matrix(f)):
            raise AssertionError(f"the Kronecker factor H_{f} of n={n} is not Hadamard")
        shown.append(f"H_{f}·H_{f}ᵀ = {f}·I")
    parts = [f for f in (p.pow2, *p.factors) if f > 1]
    if len(parts) == 1:
        return f"{shown[0]} exactly"
    return (f"{', '.join(shown)} exactly; (A ⊗ B)(A ⊗ B)ᵀ = AAᵀ ⊗ BBᵀ, so H·Hᵀ = {n}·I for "
            f"H_{n} = {' ⊗ '.join(f'H_{f}' for f in parts)}")
