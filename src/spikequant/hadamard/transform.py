"""Fast normalized Hadamard transform along the last dimension.

For n = 2^k · m the transform of x is x @ Hᵀ/√n with H = H_{2^k} ⊗ H_m. Viewing x as (..., 2^k, m), that
is X ↦ B X Aᵀ (B Sylvester, A the dense factor): one GEMM of all rows against the small m x m factor on
the contiguous last axis, and radix-2 butterflies over the 2^k axis, each moving contiguous blocks.
"""

from __future__ import annotations

import math

import torch

from spikequant.hadamard.constructions import factor_matrix, plan

try:  # optional CUDA kernel for the power-of-two part
    from fast_hadamard_transform import hadamard_transform as _cuda_fwht  # type: ignore
except ImportError:  # pragma: no cover - not installed on CPU machines
    _cuda_fwht = None


def _butterflies(y: torch.Tensor, p: int, inner: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalized Sylvester transform over the middle axis of y viewed as (rows, p, inner).

    Stages ping-pong between ``y`` and ``scratch`` (both may be overwritten); the last stage writes a
    fresh tensor, which is returned.
    """
    rows = y.numel() // (p * inner)
    buf = torch.empty_like(y) if scratch is None else scratch
    h = 1
    while h < p:
        src = y.view(rows, p // (2 * h), 2, h * inner)
        out = torch.empty_like(y) if 2 * h >= p else buf
        dst = out.view(rows, p // (2 * h), 2, h * inner)
        a, b = src[:, :, 0], src[:, :, 1]
        torch.add(a, b, out=dst[:, :, 0])
        torch.sub(a, b, out=dst[:, :, 1])
        y, buf = out, y
        h *= 2
    return y


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester, natural order) of the last dim, a power of 2."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    if x.is_cuda and _cuda_fwht is not None and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return _cuda_fwht(x.contiguous(), 1.0)
    return _butterflies(x.contiguous().clone(), n, 1).view(x.shape)


class HadamardTransform:
    """x -> x @ Hᵀ/√n (``inverse``: x @ H/√n) for the Hadamard matrix of :func:`hadamard_matrix`."""

    # Narrow dense factors are widened with Sylvester blocks up to this width: H_{2^k} ⊗ H_m equals
    # H_{2^(k-j)} ⊗ (H_{2^j} ⊗ H_m), and one GEMM beats the first, cache-unfriendly butterfly stages.
    MIN_DENSE_WIDTH = 64

    def __init__(self, n: int) -> None:
        self.plan = plan(n)
        self.n = n
        factor = factor_matrix(self.plan.m) if self.plan.m > 1 else torch.ones(1, 1, dtype=torch.int8)
        m, pow2 = self.plan.m, self.plan.pow2
        h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
        while m < self.MIN_DENSE_WIDTH and pow2 > 1:
            factor, m, pow2 = torch.kron(h2, factor), m * 2, pow2 // 2
        self.m, self.pow2 = m, pow2  # execution split (the matrix is the same as the plan's)
        self._factor = factor if m > 1 else None
        self._cache: dict[tuple[torch.dtype, torch.device, bool], torch.Tensor] = {}
        # Reused work buffers: an online rotation sees the same shapes call after call, and fresh
        # multi-megabyte allocations cost page faults on every call.
        self._work: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.numel(), like.dtype, like.device)
        if key not in self._work:
            self._work.clear()  # keep one shape only: bounded memory
            self._work[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return self._work[key].view(like.shape)

    def _dense(self, dtype: torch.dtype, device: torch.device, inverse: bool) -> torch.Tensor:
        key = (dtype, device, inverse)
        if key not in self._cache:
            assert self._factor is not None
            a = self._factor.to(device=device, dtype=dtype) / math.sqrt(self.n)  # normalization folded in
            # Rows times Aᵀ applies A; rows times A applies Aᵀ (the inverse, as H_{2^k} is symmetric).
            self._cache[key] = (a if inverse else a.T).contiguous()
        return self._cache[key]

    def __call__(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"last dim {x.shape[-1]} != transform size {self.n}")
        m, pow2 = self.m, self.pow2
        y = x.reshape(-1, m)
        y = y @ self._dense(x.dtype, x.device, inverse) if m > 1 else y * (1.0 / math.sqrt(self.n))
        if pow2 > 1:
            if x.is_cuda and _cuda_fwht is not None:  # CUDA kernel on the power-of-two axis
                y = _cuda_fwht(y.view(-1, pow2, m).transpose(1, 2).contiguous(), 1.0).transpose(1, 2)
            else:
                reuse = not (torch.is_grad_enabled() and x.requires_grad)  # autograd needs fresh tensors
                y = _butterflies(y, pow2, m, self._scratch(y) if reuse else None)
        return y.reshape(x.shape)


_TRANSFORMS: dict[int, HadamardTransform] = {}


def hadamard_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Normalized Hadamard transform of the last dim (cached plan per size)."""
    n = x.shape[-1]
    if n not in _TRANSFORMS:
        _TRANSFORMS[n] = HadamardTransform(n)
    return _TRANSFORMS[n](x, inverse=inverse)
