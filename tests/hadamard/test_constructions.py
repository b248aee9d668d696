import math

import pytest
import torch

from spikequant.hadamard import (
    FAST_FACTOR,
    NoHadamardError,
    alternatives,
    dense_factor_matrix,
    factor_matrix,
    hadamard_matrix,
    is_constructible,
    next_constructible,
    paley_matrix,
    plan,
    previous_plan,
    sylvester_matrix,
    verify,
)
from spikequant.hadamard.constructions import COST_TOLERANCE, _exactly_hadamard, plan_cost

STORED_ORDERS = {156, 172, 428}  # Baumert–Hall, Williamson, Goethals–Seidel (stored.py)

LIMIT = 1024


def _is_prime_power(q: int) -> bool:  # deliberately independent of fields.prime_power
    for d in range(2, math.isqrt(q) + 1):
        if q % d == 0:
            while q % d == 0:
                q //= d
            return q == 1
    return q >= 2


def _reachable(limit: int, sylvester: bool = True) -> set[int]:
    """Orders the rules reach, by closing {1, 2, Paley orders, stored orders} under products (no plan());
    without ``sylvester``, the dense factors: products of Paley and stored orders only."""
    paley = {q + 1 for q in range(3, limit) if q % 4 == 3 and _is_prime_power(q)}
    paley |= {2 * (q + 1) for q in range(5, limit // 2) if q % 4 == 1 and _is_prime_power(q)}
    paley |= STORED_ORDERS
    base = paley - {2 ** i for i in range(limit.bit_length())} | ({2} if sylvester else set())
    reach = {1, 2} if sylvester else {1}
    frontier = set(reach)
    while frontier:
        new = {a * b for a in frontier for b in base if a * b <= limit} - reach
        reach |= new
        frontier = new
    return reach


def _is_hadamard(h: torch.Tensor) -> bool:
    h = h.to(torch.float64)
    n = h.shape[0]
    return bool(torch.all(h.abs() == 1)) and torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


def test_every_constructible_order_up_to_1024_is_hadamard():
    orders = [n for n in range(1, LIMIT + 1) if is_constructible(n)]
    assert set(orders) == _reachable(LIMIT)
    for n in orders:
        assert _exactly_hadamard(hadamard_matrix(n, torch.int8)), n
    assert {1, 2} | set(range(4, 92, 4)) <= set(orders)  # every multiple of 4 below 92


def test_orders_the_rules_miss():
    missing = [n for n in range(4, LIMIT + 1, 4) if not is_constructible(n)]
    assert missing == sorted(set(range(4, LIMIT + 1, 4)) - _reachable(LIMIT))
    # 92 (Williamson) and 668 (the smallest order with no known Hadamard matrix) are famous; 716 and 764
    # need constructions beyond Sylvester/Paley/Kronecker too. The stored orders and 856 = 2·428 are covered.
    assert missing[0] == 92 and {92, 116, 668, 716, 764} <= set(missing)
    assert not {156, 172, 428, 856} & set(missing) and len(missing) == 54
    assert all(not is_constructible(n) for n in (3, 5, 6, 10, 14, 18, 22, 1026))


@pytest.mark.parametrize("n,m,pow2,construction", [
    (576, 36, 16, "paley2(q=17)"), (1536, 12, 128, "paley1(q=11)"), (11008, 172, 64, "williamson(43)"),
    (13696, 428, 32, "goethals-seidel(T107)"), (156, 156, 1, "baumert-hall(13)"), (344, 172, 2, "williamson(43)"),
    (14336, 28, 512, "paley1(q=27)"), (18944, 148, 128, "paley2(q=73)"), (4096, 1, 4096, "sylvester"),
    (96, 12, 8, "paley1(q=11)"), (1904, 1904, 1, "paley1(q=27) x paley1(q=67)"),
    (1040, 1040, 1, "paley1(q=19) x paley2(q=25)"),  # cheaper than Paley I with q = 1039
])
def test_plans_of_real_sizes(n, m, pow2, construction):
    p = plan(n)
    assert (p.m, p.pow2, p.construction) == (m, pow2, construction)
    assert p.online_macs == n * (int(math.log2(pow2)) + sum(p.factors)) and p.dense_macs == n * n
    assert math.prod(p.factors) == m


@pytest.mark.parametrize("n", [11008, 13696, 14336, 18944, 576, 1536])
def test_real_sizes_are_hadamard(n):
    # Above the dense limit each Kronecker factor is checked exactly; (A⊗B)(A⊗B)ᵀ = AAᵀ⊗BBᵀ does the rest.
    assert "exactly" in verify(n)
    p = plan(n)
    assert _is_hadamard(sylvester_matrix(p.pow2))
    for f in p.factors:
        assert _is_hadamard(factor_matrix(f))


def test_full_matrix_is_the_kronecker_product():
    for n in (24, 96, 576, 688, 2080):  # 688 = 4 · 172 (Williamson); 2080 = 2 · 20 · 52
        p = plan(n)
        h = hadamard_matrix(n)
        assert torch.equal(h, torch.kron(sylvester_matrix(p.pow2), dense_factor_matrix(n)))
        hn = hadamard_matrix(n, torch.float64, normalized=True)
        assert torch.allclose(hn @ hn.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert hadamard_matrix(12, torch.int8).dtype == torch.int8
    assert torch.equal(hadamard_matrix(12), hadamard_matrix(12))  # deterministic (and cached inside)


def test_paley_structure():
    h1 = paley_matrix(344, torch.int64)  # Paley I: H - I is skew-symmetric
    s = h1 - torch.eye(344, dtype=torch.int64)
    assert torch.equal(s.T, -s)
    h2 = paley_matrix(148, torch.int64)  # Paley II is symmetric
    assert torch.equal(h2, h2.T)
    with pytest.raises(ValueError, match="not a Paley order"):
        paley_matrix(92)
    with pytest.raises(ValueError, match="power-of-two"):
        sylvester_matrix(12)


def test_least_cost_plan_is_chosen():
    """Against an independent list of splits (n = 2^j · m with m reachable): the chosen plan costs at most
    (1 + COST_TOLERANCE) times the least, and no smaller m is that cheap; the alternatives are the rest."""
    limit = 4096
    dense = _reachable(limit, sylvester=False)
    for n in range(4, limit + 1, 4):
        splits = [m for m in (n >> j for j in range(n.bit_length())) if m << (n // m).bit_length() - 1 == n
                  and m in dense]
        if not splits:
            assert not is_constructible(n), n
            continue
        p, alts = plan(n), alternatives(n)
        assert sorted([p.m] + [a.m for a in alts]) == sorted(splits), n
        least = min([p.cost] + [a.cost for a in alts])
        assert p.cost <= least * (1 + COST_TOLERANCE), n
        assert all(a.m > p.m for a in alts if a.cost <= least * (1 + COST_TOLERANCE)), n
        assert [a.cost for a in alts] == sorted(a.cost for a in alts)
        assert p.cost == plan_cost(p.pow2, p.factors)


def test_previous_rule_is_kept_for_comparison():
    assert previous_plan(11008).name == "344 x 2^5, paley1(q=343)" and previous_plan(13696) is None
    assert previous_plan(576) == plan(576) and previous_plan(1536) == plan(1536)
    # a size whose plan changed: the previous one is still constructible, among the alternatives
    assert previous_plan(11008) in alternatives(11008) and plan(11008).cost < previous_plan(11008).cost


def test_no_construction_for_3776_names_sizes_above():
    with pytest.raises(NoHadamardError) as info:
        plan(3776)  # 59 · 2^6: none of 236, 472, ..., 3776 is a base order or a product of them
    e = info.value
    assert isinstance(e, ValueError)
    msg = str(e)
    assert msg.startswith("no Hadamard construction for n=3776; nearest constructible sizes above: "
                          "3840, 3904")
    assert "3780" in msg and "expand: +64 -> 3840" in msg and "\n" not in msg
    assert e.fast_above == next_constructible(3776, 3, max_factor=FAST_FACTOR) == [3840, 3904, 3968]
    assert e.above == next_constructible(3776) == [3780, 3792, 3804]
    assert plan(3840).m == 60
    assert not is_constructible(3776) and is_constructible(13696)


def test_next_constructible():
    assert next_constructible(88, 4) == [96, 100, 104, 108]  # 92 is skipped
    assert next_constructible(0, 3) == [1, 2, 4]
    assert all(is_constructible(n) for n in next_constructible(668, 5))


def test_bad_orders():
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError):
            plan(bad)
