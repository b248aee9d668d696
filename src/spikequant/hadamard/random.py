"""Random rotations: randomized Hadamard (seeded ±1 diagonal) and Haar-random orthogonal matrices."""

from __future__ import annotations

import math

import torch

from spikequant.hadamard.constructions import hadamard_matrix
from spikequant.hadamard.transform import hadamard_transform


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


class RandomizedHadamard:
    """R = diag(s) · Hᵀ/√n with seeded signs s, so that x @ R = hadamard_transform(x * s) online.

    ``matrix()`` gives the dense R (to fuse into weights); ``apply(x)`` computes x @ R without it.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed
        self.signs = random_signs(n, seed)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        h = hadamard_matrix(self.n, torch.float64) / math.sqrt(self.n)
        return (self.signs[:, None] * h.T).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        # x @ diag(s) Hᵀ/√n = transform(x * s), the transform being x -> x @ Hᵀ/√n.
        return hadamard_transform(x * self.signs.to(x.device, x.dtype))


def random_orthogonal_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-distributed orthogonal matrix: QR of a Gaussian matrix with the signs of diag(R) fixed."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype)
