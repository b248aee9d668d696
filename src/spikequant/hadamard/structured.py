"""A faster product with a Paley I factor over GF(p^k), k >= 2: the Jacobsthal matrix is block-circulant.

Field elements are integers whose base-p digits are polynomial coefficients, and field subtraction is
digit-wise mod p. So with the elements laid out as a (p, r) grid, r = q/p, the top digit outermost,
Q[(i, ·), (j, ·)] = χ(((i - j) mod p, ·)) depends only on i - j mod p: Q is block-circulant with p blocks
of r x r. The orthonormal real Fourier basis T of Z_p (rows 1, cos f, sin f for f = 1..(p-1)/2)
block-diagonalizes it, (T ⊗ I_r)·Q·(T ⊗ I_r)ᵀ = diag(D_0, D_1, ..., D_h) with D_0 r x r and D_f 2r x 2r, so
    z·Qᵀ = ((T applied to the blocks of z) · blockdiag(D)) with Tᵀ applied back,
costing about 2(p + 1) + 2r multiply-adds per element instead of q (frequency 0 is padded to a 2r block so
that one batched matmul does all blocks). For q = 343 = 7³ (order 344, the previous dense factor of 11008) that is
128 instead of 343.

The blocks are computed numerically in float64 from the exact Q and checked to be block-diagonal, so the
result is the same matrix as the dense factor (tested to 1e-10), not an approximation of it.
"""

from __future__ import annotations

import math

import torch

from spikequant.hadamard.constructions import PASS_COST, jacobsthal, paley_rule
from spikequant.hadamard.fields import prime_power

MIN_ORDER = 128  # below this the extra passes cost more than the multiply-adds saved
# Passes over the data in PaleyOneFactor.__call__: the Fourier matmul, the batched block product, the matmul
# back, and the two elementwise updates (the first column's sums are small next to them).
PASSES = 5


def _macs(p: int, r: int) -> float:
    return 2 * (p + 1) + 2 * r * (p + 1) / p


def applies(order: int) -> bool:
    """Whether ``order`` is a Paley I order q + 1, q = p^k with k >= 2, where this saves at least half the
    multiply-adds of the dense product (and the order is large enough for that to pay for the passes)."""
    rule = paley_rule(order)
    if rule is None or rule[0] != "paley1" or order < MIN_ORDER:
        return False
    pk = prime_power(rule[1])
    return pk is not None and pk[1] >= 2 and _macs(pk[0], rule[1] // pk[0]) <= order / 2


def real_fourier_basis(p: int) -> torch.Tensor:
    """Orthonormal p x p real Fourier basis of Z_p (p odd): 1/√p, then √(2/p)·cos, sin per frequency."""
    j = torch.arange(p, dtype=torch.float64)
    rows = [torch.full((p,), 1 / math.sqrt(p), dtype=torch.float64)]
    for f in range(1, (p - 1) // 2 + 1):
        rows += [math.sqrt(2 / p) * torch.cos(2 * math.pi * f * j / p),
                 math.sqrt(2 / p) * torch.sin(2 * math.pi * f * j / p)]
    return torch.stack(rows)


def structured_cost(order: int) -> float | None:
    """Modelled online cost per element (multiply-add equivalents, as ``constructions.plan_cost``) of this
    product, or None where it does not apply."""
    if not applies(order):
        return None
    p = prime_power(order - 1)[0]  # type: ignore[index]
    return PASSES * PASS_COST + _macs(p, (order - 1) // p)


class PaleyOneFactor:
    """Applies z ↦ z·Hᵀ·scale (or z·H·scale) for the Paley I matrix H = I + [[0, 1ᵀ], [-1, Q]] of ``order``
    along the last axis, through the block-diagonal form of Q (see the module docstring)."""

    def __init__(self, order: int) -> None:
        if not applies(order):
            raise ValueError(f"{order} is not a Paley I order over GF(p^k), k >= 2, >= {MIN_ORDER}")
        self.order = order
        q = order - 1
        p = prime_power(q)[0]  # type: ignore[index]
        self.p, self.r, self.h = p, q // p, (p - 1) // 2
        qm = torch.from_numpy(jacobsthal(q)).to(torch.float64)
        k = torch.kron(real_fourier_basis(p), torch.eye(self.r, dtype=torch.float64))
        # Pad the p frequency rows to 2(h + 1) = p + 1 with a zero row after frequency 0, so that it is a
        # 2r block too (second half zero) and one batched matmul does every block: groups (1, 0),
        # (cos 1, sin 1), (cos 2, sin 2), ...
        basis = real_fourier_basis(p)
        self._t = torch.cat([basis[:1], torch.zeros(1, p, dtype=torch.float64), basis[1:]])
        self._blocks: dict[bool, torch.Tensor] = {}
        for inverse in (False, True):
            g = qm if inverse else qm.T  # z·Qᵀ for the forward transform, z·Q for the inverse
            d = k @ g @ k.T
            blocks = torch.zeros(self.h + 1, 2 * self.r, 2 * self.r, dtype=torch.float64)
            blocks[0, :self.r, :self.r] = d[:self.r, :self.r]
            for f in range(1, self.h + 1):
                s = self.r + 2 * self.r * (f - 1)
                blocks[f] = d[s:s + 2 * self.r, s:s + 2 * self.r]
            rebuilt = torch.block_diag(blocks[0, :self.r, :self.r], *blocks[1:])
            if (rebuilt - d).abs().max() > 1e-9:  # would mean Q is not block-circulant in this layout
                raise AssertionError(f"the Jacobsthal matrix of GF({q}) did not block-diagonalize")
            self._blocks[inverse] = blocks
        self._cache: dict[tuple[torch.dtype, torch.device, bool, float], tuple[torch.Tensor, ...]] = {}

    @property
    def macs_per_element(self) -> float:
        """Multiply-adds per element of the structured product (T, the blocks, Tᵀ; padding included)."""
        return _macs(self.p, self.r)

    def _mats(self, dtype: torch.dtype, device: torch.device, inverse: bool,
              scale: float) -> tuple[torch.Tensor, ...]:
        key = (dtype, device, inverse, scale)
        if key not in self._cache:
            t = self._t.to(device=device, dtype=dtype)
            blocks = (self._blocks[inverse] * scale).to(device=device, dtype=dtype)
            self._cache[key] = (t, t.T.contiguous(), blocks)
        return self._cache[key]

    def __call__(self, z: torch.Tensor, inverse: bool = False, scale: float = 1.0,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """z (rows, order) ↦ z·Hᵀ·scale (z·H·scale if ``inverse``), written into ``out`` if given."""
        t, t_back, blocks = self._mats(z.dtype, z.device, inverse, scale)
        rows, p, r, groups = z.shape[0], self.p, self.r, self.h + 1
        z0, zr = z[:, :1], z[:, 1:]
        f = torch.matmul(t, zr.reshape(rows, p, r))  # (rows, p + 1, r): Fourier coefficients of the blocks
        f = f.view(rows, groups, 2 * r).transpose(0, 1)  # (groups, rows, 2r), strided: no copy
        g = torch.bmm(f, blocks)  # every block product in one batched matmul
        y = torch.matmul(t_back, g.transpose(0, 1).reshape(rows, p + 1, r))  # back: z_r·Qᵀ·scale
        out = torch.empty_like(z, memory_format=torch.contiguous_format) if out is None else out
        # H = I + S, S = [[0, 1ᵀ], [-1, Q]]:
        # z·Hᵀ = z + (Σ z_r, -z_0 + z_r·Qᵀ) and z·H = z + (-Σ z_r, z_0 + z_r·Q).
        sign = -1.0 if inverse else 1.0
        torch.add(y.view(rows, p * r), zr, alpha=scale, out=out[:, 1:])
        out[:, 1:].sub_(z0, alpha=sign * scale)
        torch.add(z0, zr.sum(dim=1, keepdim=True), alpha=sign, out=out[:, :1])
        out[:, :1].mul_(scale)
        return out
