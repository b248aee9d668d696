"""Hadamard matrices of orders Paley misses (156, 172, 428), built from published sign sequences.

A matrix is a mathematical fact; what is stored here is the published data it is built from, as short
strings, and the constructions are written out below. Every matrix is checked exactly (H·Hᵀ = n·I in
int64) when it is built, so a wrong digit in the data cannot go unnoticed.

* **172 = 4·43, Williamson type.** Four symmetric circulant ±1 matrices A, B, C, D of order 43 with
  A² + B² + C² + D² = 172·I, in the Williamson array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B],
  [-D, -C, B, A]]. The first rows are the quadruple for n = 43 printed in M. Hall Jr., *Combinatorial
  Theory* (2nd ed., Wiley), as reproduced in SageMath's ``williamson_type_quadruples_smallcases``
  (src/sage/combinat/matrices/hadamard_matrix.py).
* **156 = 12·13, Baumert–Hall.** L. D. Baumert and M. Hall Jr., "A new construction for Hadamard
  matrices", Bull. AMS 71 (1965) 169–170: four circulant ±1 matrices of order 13 with AAᵀ + BBᵀ + CCᵀ + DDᵀ
  = 52·I placed in a 12 x 12 Baumert–Hall array of ±A, ±B, ±C, ±D. Sequences and array as reproduced in
  SageMath's ``hadamard_matrix_156`` (same file).
* **428 = 4·107, Goethals–Seidel from T-sequences.** H. Kharaghani and B. Tayfeh-Rezaie, "A Hadamard
  matrix of order 428", J. Combin. Des. 13 (2005) 435–440. Their Turyn-type sequences X, Y, Z, W of
  lengths 36, 36, 36, 35 (the hexadecimal encoding of Best, Đoković, Kharaghani and Ramp, as reproduced in
  SageMath's ``turyn_type_sequences_smallcases``, src/sage/combinat/t_sequences.py) give base sequences
  Z;W, Z;−W, X, Y of lengths 71, 71, 36, 36, those give T-sequences of length 107, and the four ±1
  circulants (±T1 ± T2 ± T3 ± T4, signs from the rows of a 4 x 4 Hadamard matrix) go into the
  Goethals–Seidel array.

Each step's defining property (Williamson condition, zero aperiodic autocorrelation, T-sequence support)
is checked on the way, and the final matrix exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np


def _signs(s: str) -> np.ndarray:
    """'+--+' -> [1, -1, -1, 1] (int64)."""
    bad = set(s) - {"+", "-"}
    if bad:
        raise ValueError(f"a sign string has only '+' and '-', got {sorted(bad)}")
    return np.array([1 if c == "+" else -1 for c in s], dtype=np.int64)


def circulant(row: np.ndarray) -> np.ndarray:
    """The circulant matrix with this first row: C[i, j] = row[(j - i) mod n]."""
    n = len(row)
    idx = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    return row[idx]


def periodic_autocorrelation(seq: np.ndarray) -> np.ndarray:
    """PAF(s) = Σ_i a_i a_{(i+s) mod n}, s = 0..n-1 (exact, integers)."""
    return np.array([int(np.dot(seq, np.roll(seq, -s))) for s in range(len(seq))], dtype=np.int64)


def aperiodic_autocorrelation(seq: np.ndarray, length: int) -> np.ndarray:
    """N(s) = Σ_i a_i a_{i+s} (no wrap-around), s = 0..length-1, zero beyond the sequence."""
    out = np.zeros(length, dtype=np.int64)
    for s in range(min(length, len(seq))):
        out[s] = int(np.dot(seq[: len(seq) - s], seq[s:]))
    return out


def is_hadamard(h: np.ndarray) -> bool:
    """H·Hᵀ = n·I exactly (int64) and every entry ±1."""
    h = np.asarray(h, dtype=np.int64)
    n = h.shape[0]
    if h.shape != (n, n) or not np.all(np.abs(h) == 1):
        return False
    return bool(np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64)))


# -- 172: Williamson, order 43 --------------------------------------------------------------------------------

WILLIAMSON_43 = (  # first rows of A, B, C, D (symmetric circulants), '+' = 1, '-' = -1
    "++---++++-+--+--++--------++--+--+-++++---+",
    "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
    "++-++++++----+-+--++-++-++--+-+----++++++-+",
    "+---++--++++-+-+++-++--++-+++-+-++++--++---",
)


def williamson_array(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]] for circulants with these first rows.

    Hadamard iff the circulants pairwise commute with transposes mixed (true for symmetric ones) and
    AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4m·I.
    """
    ca, cb, cc, cd = (circulant(r) for r in (a, b, c, d))
    return np.block([[ca, cb, cc, cd], [-cb, ca, -cd, cc], [-cc, cd, ca, -cb], [-cd, -cc, cb, ca]])


def williamson_172() -> np.ndarray:
    """The Williamson-type Hadamard matrix of order 172 (int64)."""
    rows = [_signs(s) for s in WILLIAMSON_43]
    m = len(rows[0])
    if any(len(r) != m or not np.array_equal(r, np.roll(r[::-1], 1)) for r in rows):
        raise AssertionError("the Williamson rows of order 43 are not symmetric sequences of one length")
    paf = sum(periodic_autocorrelation(r) for r in rows)
    if paf[0] != 4 * m or np.any(paf[1:] != 0):  # A² + B² + C² + D² = 4m·I, read off the first row
        raise AssertionError("the Williamson condition fails for order 43")
    return williamson_array(*rows)


# -- 156: Baumert–Hall array of order 12 with circulants of order 13 ------------------------------------------

BAUMERT_HALL_13 = (  # first rows of the circulants A, B, C, D of order 13
    "++--+-++-+--+",
    "+---++++++---",
    "+++-++--++-++",
    "++-+-++++-+-+",
)
# The 12 x 12 array, one row per string, entries as signed letters ('A' = +A, 'a' = -A, likewise B, C, D).
BAUMERT_HALL_ARRAY = (
    "AAABbCcdBCdd",
    "AaBabdDcbdcc",
    "AbaAdDbBcdCc",
    "BAaaDDDCCbbc",
    "BdDDAAACcBcB",
    "BCdDAaCadCBb",
    "DcBbAcaABCDd",
    "cdcdCAaadBbb",
    "DcbbbCCdAAAD",
    "dbCCCBBdAaDa",
    "CbcCDbdbAdaA",
    "cddCcbBBDAaa",
)


def baumert_hall_156() -> np.ndarray:
    """The Baumert–Hall Hadamard matrix of order 156 (int64)."""
    blocks = {k: circulant(_signs(s)) for k, s in zip("ABCD", BAUMERT_HALL_13, strict=True)}
    if not np.array_equal(sum(x @ x.T for x in blocks.values()), 52 * np.eye(13, dtype=np.int64)):
        raise AssertionError("the order-13 circulants of the Baumert–Hall array fail AAᵀ+BBᵀ+CCᵀ+DDᵀ = 52·I")
    if len(BAUMERT_HALL_ARRAY) != 12 or any(len(r) != 12 for r in BAUMERT_HALL_ARRAY):
        raise AssertionError("the Baumert–Hall array is not 12 x 12")
    return np.block([[blocks[ch.upper()] * (1 if ch.isupper() else -1) for ch in row]
                     for row in BAUMERT_HALL_ARRAY])


# -- 428: Goethals–Seidel with T-sequences of length 107 -------------------------------------------------------

# Turyn-type sequences X, Y, Z, W (lengths 36, 36, 36, 35), Kharaghani & Tayfeh-Rezaie (2005). Hex digit i
# holds element i of the four sequences, most significant bit first, bit 0 = +1; the last digit has only
# three bits (W is one shorter).
TURYN_TYPE_36 = "060989975b685d8fc80750b21c0212eceb26"


def turyn_type_sequences(hexstring: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode the hexadecimal encoding of Turyn-type sequences (see ``TURYN_TYPE_36``)."""
    seqs: list[list[int]] = [[], [], [], []]
    for i, ch in enumerate(hexstring):
        last = i == len(hexstring) - 1
        bits = format(int(ch, 16), "03b" if last else "04b")
        if len(bits) != (3 if last else 4):
            raise ValueError(f"hex digit {ch!r} at the end encodes more than 3 bits")
        for j, bit in enumerate(bits):
            seqs[j].append(1 if bit == "0" else -1)
    x, y, z, w = (np.array(s, dtype=np.int64) for s in seqs)
    return x, y, z, w


def t_sequences_107() -> np.ndarray:
    """The four T-sequences of length 107 (rows of a (4, 107) int64 array with entries 0, ±1)."""
    x, y, z, w = turyn_type_sequences(TURYN_TYPE_36)
    base = (np.concatenate([z, w]), np.concatenate([z, -w]), x, y)  # lengths 71, 71, 36, 36
    longest = len(base[0])
    if sum(aperiodic_autocorrelation(s, longest) for s in base)[1:].any():
        raise AssertionError("the base sequences of lengths 71, 71, 36, 36 do not have zero autocorrelation")
    a, b, c, d = base
    n, p = len(c), len(a) - len(c)
    zeros_n, zeros_np = np.zeros(n, dtype=np.int64), np.zeros(n + p, dtype=np.int64)
    t = np.stack([np.concatenate([(a + b) // 2, zeros_n]), np.concatenate([(a - b) // 2, zeros_n]),
                  np.concatenate([zeros_np, (c + d) // 2]), np.concatenate([zeros_np, (c - d) // 2])])
    if not np.array_equal(np.abs(t).sum(axis=0), np.ones(t.shape[1], dtype=np.int64)):
        raise AssertionError("the T-sequences do not have exactly one nonzero entry per position")
    if sum(aperiodic_autocorrelation(s, t.shape[1]) for s in t)[1:].any():
        raise AssertionError("the T-sequences of length 107 do not have zero aperiodic autocorrelation")
    return t


def goethals_seidel(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The Goethals–Seidel array for circulants with these first rows (R the back-identity):
    [[A, BR, CR, DR], [-BR, A, -DᵀR, CᵀR], [-CR, DᵀR, A, -BᵀR], [-DR, -CᵀR, BᵀR, A]].

    Hadamard iff AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4t·I; the circulants need not be symmetric.
    """
    ca, cb, cc, cd = (circulant(r) for r in (a, b, c, d))
    r = np.eye(len(a), dtype=np.int64)[::-1]
    return np.block([[ca, cb @ r, cc @ r, cd @ r],
                     [-cb @ r, ca, -cd.T @ r, cc.T @ r],
                     [-cc @ r, cd.T @ r, ca, -cb.T @ r],
                     [-cd @ r, -cc.T @ r, cb.T @ r, ca]])


def goethals_seidel_428() -> np.ndarray:
    """The Kharaghani–Tayfeh-Rezaie Hadamard matrix of order 428 (int64)."""
    t = t_sequences_107()
    # Rows of a 4 x 4 Hadamard matrix as sign patterns: Σ_i (Σ_j h_ij T_j)(...)ᵀ = 4 Σ_j T_j T_jᵀ = 4·107·I,
    # because the T_j have disjoint supports (so T_j T_kᵀ + T_k T_jᵀ sums to zero over the rows of h).
    h4 = np.array([[1, 1, 1, 1], [-1, 1, 1, -1], [-1, -1, 1, 1], [-1, 1, -1, 1]], dtype=np.int64)
    a, b, c, d = h4 @ t
    return goethals_seidel(a, b, c, d)


@dataclass(frozen=True)
class StoredOrder:
    """A Hadamard order built from published data: its name in plans and the function that builds it."""

    order: int
    rule: str
    source: str


STORED: dict[int, StoredOrder] = {
    156: StoredOrder(156, "baumert-hall(13)", "Baumert & Hall 1965, Bull. AMS 71"),
    172: StoredOrder(172, "williamson(43)", "Williamson quadruple of order 43, M. Hall, Combinatorial Theory"),
    428: StoredOrder(428, "goethals-seidel(T107)", "Kharaghani & Tayfeh-Rezaie 2005, J. Combin. Des. 13"),
}
_BUILDERS = {156: baumert_hall_156, 172: williamson_172, 428: goethals_seidel_428}


@cache
def stored_matrix(order: int) -> np.ndarray:
    """The ±1 Hadamard matrix of a stored order (int8, read-only), checked exactly when it is built."""
    if order not in _BUILDERS:
        raise ValueError(f"no stored Hadamard matrix of order {order}; stored: {sorted(_BUILDERS)}")
    h = _BUILDERS[order]()
    if h.shape != (order, order) or not is_hadamard(h):
        raise AssertionError(f"the stored Hadamard matrix of order {order} fails H·Hᵀ = {order}·I")
    out = h.astype(np.int8)
    out.setflags(write=False)
    return out
