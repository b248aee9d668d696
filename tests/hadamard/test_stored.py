import numpy as np
import pytest

import spikequant.hadamard.stored as stored
from spikequant.hadamard import factor_matrix, hadamard_matrix, plan, verify
from spikequant.hadamard.stored import (
    STORED,
    aperiodic_autocorrelation,
    circulant,
    is_hadamard,
    periodic_autocorrelation,
    stored_matrix,
    t_sequences_107,
    turyn_type_sequences,
)


def _gram_is_n_identity(h: np.ndarray) -> bool:
    # float64 instead of is_hadamard's int64: every partial sum is an integer below 2^53, so exact too
    g = h.astype(np.float64) @ h.T.astype(np.float64)
    return bool(np.array_equal(g, h.shape[0] * np.eye(h.shape[0])))


@pytest.mark.parametrize("order", [156, 172, 428])
def test_stored_matrices_are_hadamard_exactly(order):
    h = stored_matrix(order)
    assert h.shape == (order, order) and h.dtype == np.int8 and not h.flags.writeable
    assert set(np.unique(h)) == {-1, 1} and _gram_is_n_identity(h)
    assert plan(order).factors == (order,) and plan(order).construction == STORED[order].rule
    assert verify(order) == f"H·Hᵀ = {order}·I exactly (full {order} x {order} product)"
    assert np.array_equal(hadamard_matrix(order).numpy(), h) and np.array_equal(factor_matrix(order).numpy(), h)


def test_williamson_172_structure():
    rows = [stored._signs(s) for s in stored.WILLIAMSON_43]
    for r in rows:
        assert len(r) == 43 and np.array_equal(circulant(r), circulant(r).T)  # symmetric circulants
    paf = sum(periodic_autocorrelation(r) for r in rows)
    assert paf[0] == 172 and not paf[1:].any()
    h = stored_matrix(172)
    assert np.array_equal(h[:43, :43], circulant(rows[0]))  # the A block sits top left


def test_baumert_hall_156_structure():
    rows = [stored._signs(s) for s in stored.BAUMERT_HALL_13]
    assert sum(circulant(r) @ circulant(r).T for r in rows).tolist() == (52 * np.eye(13, dtype=int)).tolist()
    # every row of the array uses each letter three times (12 = 4 x 3)
    for row in stored.BAUMERT_HALL_ARRAY:
        assert sorted(row.upper()) == sorted("ABCD" * 3)


def test_t_sequences_of_length_107():
    x, y, z, w = turyn_type_sequences(stored.TURYN_TYPE_36)
    assert [len(s) for s in (x, y, z, w)] == [36, 36, 36, 35]
    t = t_sequences_107()
    assert t.shape == (4, 107) and np.array_equal(np.abs(t).sum(axis=0), np.ones(107))
    assert not sum(aperiodic_autocorrelation(s, 107) for s in t)[1:].any()


@pytest.mark.parametrize("order,name,pos", [(172, "WILLIAMSON_43", 2), (156, "BAUMERT_HALL_13", 1)])
def test_one_wrong_sign_is_caught(monkeypatch, order, name, pos):
    data = list(getattr(stored, name))
    flipped = list(data[pos])
    for i in (5, len(flipped) - 5):  # a symmetric pair, so that a Williamson row stays symmetric
        flipped[i] = "-" if flipped[i] == "+" else "+"
    data[pos] = "".join(flipped)
    monkeypatch.setattr(stored, name, tuple(data))
    stored.stored_matrix.cache_clear()
    try:
        with pytest.raises(AssertionError, match="fail|condition"):
            stored.stored_matrix(order)
    finally:
        monkeypatch.undo()
        stored.stored_matrix.cache_clear()
    assert is_hadamard(stored.stored_matrix(order))


def test_one_wrong_hex_digit_is_caught(monkeypatch):
    s = stored.TURYN_TYPE_36
    monkeypatch.setattr(stored, "TURYN_TYPE_36", s[:10] + format(int(s[10], 16) ^ 1, "x") + s[11:])
    stored.stored_matrix.cache_clear()
    try:
        with pytest.raises(AssertionError, match="autocorrelation"):
            stored.stored_matrix(428)
    finally:
        monkeypatch.undo()
        stored.stored_matrix.cache_clear()


def test_unknown_order():
    with pytest.raises(ValueError, match="no stored Hadamard matrix of order 92"):
        stored_matrix(92)
    with pytest.raises(ValueError, match="only '\\+' and '-'"):
        stored._signs("+-0")
