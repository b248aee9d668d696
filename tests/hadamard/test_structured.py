import math

import pytest
import torch

from spikequant.hadamard import HadamardTransform, kronecker_reference, paley_matrix, plan, previous_plan
from spikequant.hadamard.constructions import PASS_COST, factor_cost, jacobsthal
from spikequant.hadamard.structured import PASSES, PaleyOneFactor, applies, real_fourier_basis, structured_cost


def test_which_orders_apply():
    # Paley I over GF(p^k), k >= 2, where the block form saves at least half: 7³, 11³, 19³, 23³, ...
    assert [o for o in range(4, 20000, 4) if applies(o)] == [344, 1332, 6860, 12168, 16808]
    assert not applies(28) and not applies(244) and not applies(148) and not applies(108)
    with pytest.raises(ValueError):
        PaleyOneFactor(148)


@pytest.mark.parametrize("p", [3, 5, 7, 11])
def test_real_fourier_basis_is_orthonormal_and_diagonalizes_circulants(p):
    t = real_fourier_basis(p)
    assert torch.allclose(t @ t.T, torch.eye(p, dtype=torch.float64), atol=1e-14)
    c = torch.randn(p, dtype=torch.float64)
    circ = torch.stack([c.roll(i) for i in range(p)])
    d = t @ circ @ t.T  # 1 x 1 then 2 x 2 blocks
    mask = torch.block_diag(torch.ones(1, 1), *[torch.ones(2, 2)] * ((p - 1) // 2)).bool()
    assert d[~mask].abs().max() < 1e-12


def test_jacobsthal_of_343_is_block_circulant():
    q = torch.from_numpy(jacobsthal(343)).view(7, 49, 7, 49)
    for i in range(7):
        for j in range(7):
            assert torch.equal(q[i, :, j, :], q[(i - j) % 7, :, 0, :])


@pytest.mark.parametrize("order", [344, 1332])
def test_structured_product_is_the_paley_matrix(order):
    f = PaleyOneFactor(order)
    h = paley_matrix(order, torch.float64)
    z = torch.randn(6, order, dtype=torch.float64, generator=torch.Generator().manual_seed(order))
    s = 1 / math.sqrt(order)
    assert (f(z, scale=s) - z @ h.T * s).abs().max() < 1e-12
    assert (f(z, inverse=True, scale=s) - z @ h * s).abs().max() < 1e-12
    out = torch.empty(6, order, dtype=torch.float64)
    assert f(z, scale=2.0, out=out) is out and (out - 2 * z @ h.T).abs().max() < 1e-11
    assert f.macs_per_element < order / 2


def test_planner_cost_of_the_structured_product():
    f = PaleyOneFactor(344)
    assert structured_cost(344) == PASSES * PASS_COST + f.macs_per_element
    assert factor_cost(344) == min(structured_cost(344), PASS_COST + 344) and structured_cost(148) is None
    # 11008: the Williamson factor 172 beats even the structured 344 in the model
    assert plan(11008).factors == (172,) and previous_plan(11008).factors == (344,)


def test_transform_uses_it_when_chunked():
    n = 2664  # 1332 x 2: Paley I over GF(11³)
    t = HadamardTransform(n, chunk_bytes=1 << 20)
    assert t.plan.factors == (1332,)
    assert t._structured is not None and t.online_macs(True) < t.online_macs(False) / 2
    x = torch.randn(40, n, dtype=torch.float64)
    for inverse in (False, True):
        assert (t(x, inverse=inverse) - kronecker_reference(x, inverse=inverse)).abs().max() < 1e-10
    x32 = x.float()
    assert (t(x32).double() - kronecker_reference(x)).abs().max() < 1e-4
    # the previous plan of 11008 (344 x 2^5) still runs structured when asked for
    t344 = HadamardTransform(11008, chunk_bytes=1 << 20, plan_=previous_plan(11008))
    assert t344._structured is not None and t344.schedule(True) == [8, 4, 344]
