"""Random rotations: the randomized Hadamard transform (seeded ±1 signs) and Haar-random orthogonal matrices.

Convention: activations are row vectors and a rotation is an orthogonal matrix R applied as x ↦ x @ R (the
convention the weight fusions use). :func:`hadamard_transform` is x ↦ x @ Hᵀ/√n, i.e. R = Hᵀ/√n.
"""

from __future__ import annotations

import torch

from spikequant.hadamard.constructions import hadamard_matrix
from spikequant.hadamard.transform import hadamard_transform


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n independent fair ±1 signs (float64) from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """R = diag(s)·Hᵀ/√n with H = ``hadamard_matrix(n)`` and s = ``random_signs(n, seed)``; orthogonal.

    ``x @ R`` is ``hadamard_transform(x * s)``, which :class:`RandomizedHadamard` computes without R.
    """
    h = hadamard_matrix(n, torch.float64, normalized=True)
    return (random_signs(n, seed)[:, None] * h.T).to(dtype)


class RandomizedHadamard:
    """The rotation R = diag(s)·Hᵀ/√n, seeded signs s: a dense matrix to fuse offline, a fast apply online.

    ``rh(x)`` (alias ``rh.apply(x)``) equals ``x @ rh.matrix()``: flip the signs, then the fast transform;
    ``rh(x, inverse=True)`` equals ``x @ rh.matrix().T``.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed
        self.signs = random_signs(n, seed)
        self._signs: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense orthogonal n x n matrix R."""
        return random_hadamard_matrix(self.n, self.seed, dtype)

    def _s(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        if key not in self._signs:
            self._signs[key] = self.signs.to(device=like.device, dtype=like.dtype)
        return self._signs[key]

    def __call__(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x @ R = hadamard_transform(x·s) along the last dim; x @ Rᵀ = hadamard_transform(x, inverse)·s."""
        if inverse:
            return hadamard_transform(x, inverse=True) * self._s(x)
        return hadamard_transform(x * self._s(x))

    apply = __call__


def random_orthogonal_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-distributed orthogonal n x n matrix (the baseline rotation), deterministic for a seed.

    QR of a standard Gaussian matrix, with column j of Q multiplied by sign(R_jj): without that fix the
    signs follow the QR routine's convention and Q is not Haar-distributed (Mezzadri, 2007).
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1  # probability zero, but keep Q orthogonal regardless
    return (q * d).to(dtype)

