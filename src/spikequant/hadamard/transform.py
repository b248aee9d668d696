"""Fast normalized Hadamard transform along the last dimension.

``hadamard_transform(x) == x @ hadamard_matrix(n, normalized=True).T`` (each vector v becomes H·v/√n) and
``inverse=True`` gives x @ H/√n (Hᵀ·v/√n), its inverse. H = H_{2^k} ⊗ H_{m1} ⊗ ..., so a vector is a
(2^k, m1, ...) grid in row-major order and every Kronecker factor acts on its own axis.

How it is computed (see docs/hadamard.md and docs/benchmarks.md for measurements): every factor is a
matmul with a small block. The last axis is contiguous, so its factor is one GEMM over all rows; the
base factors (Paley or stored) are used as they are, and the Sylvester factor is split into Sylvester blocks
(H_{2^k} = H_{2^a} ⊗ H_{2^b} ⊗ ...), each a batched matmul on its axis. A radix-2 butterfly pass costs one
add per element but a full read and write of the tensor; a 16 x 16 block does four such stages in one
pass, which is faster on CPU. A dense factor narrower than 32 absorbs factors H_2 (H_2 ⊗ H_12 is a 24 x 24
block) because a GEMM with a tiny inner dimension is inefficient. Single-threaded, rows go through in
chunks of about 1 MB so that the stages after the first read from cache, and a large Paley I factor over
GF(p^k), k >= 2 (e.g. 1332 = 11³ + 1, the factor of 2664), uses the block-circulant structure of its Jacobsthal
matrix (``structured.py``) instead of the GEMM. Cost: n·m plus n·(sum of the Sylvester blocks)
multiply-adds per vector (n·288 instead of n·1332 for that factor), against n² for a dense matmul.
"""

from __future__ import annotations

import math
import threading

import torch

from spikequant.hadamard.constructions import HadamardPlan, factor_matrix, plan, sylvester_matrix
from spikequant.hadamard.structured import PaleyOneFactor, applies

try:  # optional CUDA kernel for the power-of-two part (the fast-hadamard-transform package)
    from fast_hadamard_transform import hadamard_transform as _cuda_fwht  # type: ignore[import-not-found]
except ImportError:  # not installed on CPU machines
    _cuda_fwht = None

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fwht(x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Walsh–Hadamard transform (Sylvester, natural order) of the last dim, a power of two, by butterflies.

    The textbook O(n log n) algorithm, log2(n) passes of sums and differences; ``x @ H_n`` (H_n symmetric).
    :class:`HadamardTransform` is faster on CPU; this one is the simple reference.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        v = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]), dim=2).view(-1, n)
        h *= 2
    y = y.view(x.shape)
    return y / math.sqrt(n) if normalized else y


def _split_pow2(p: int, block: int) -> list[int]:
    """Split p = 2^k into the fewest near-equal power-of-two blocks of at most ``block`` (>= 2)."""
    k, kb = p.bit_length() - 1, max(block.bit_length() - 1, 1)
    if k == 0:
        return []
    parts = -(-k // kb)
    return [1 << (k // parts + (1 if i < k % parts else 0)) for i in range(parts)]


class HadamardTransform:
    """The normalized Hadamard transform of order n: its plan, its small factors, and a fast ``__call__``.

    ``block``: largest Sylvester block applied as one matmul (None: 16 when rows go through in chunks,
    else 32); ``widen``: a single dense factor (or the power-of-two case) absorbs factors H_2 until it is
    at least this wide; ``chunk_bytes``: CPU rows go through in chunks of about this size (None: 1 MB when
    torch runs single-threaded, else no chunks; 0: never); ``use_kernel``: the fast-hadamard-transform CUDA
    kernel for the power-of-two axis (None: when installed and the tensor is on CUDA); ``plan_``: another
    construction of order n (from ``alternatives(n)``) instead of ``plan(n)``, to time it.

    Why the defaults depend on the thread count: chunking keeps every stage after the first in cache, but
    each chunk's ops are separate parallel regions, and on a loaded machine every region waits for a
    descheduled thread (measured: 89 chunks x 3 stages at 2 threads and load 9 took 4.3 s instead of
    0.5 s). Without chunks there are only a few regions, and large blocks keep the memory passes few.
    """

    def __init__(self, n: int, block: int | None = None, widen: int = 32, chunk_bytes: int | None = None,
                 use_kernel: bool | None = None, plan_: HadamardPlan | None = None) -> None:
        if plan_ is not None and plan_.n != n:
            raise ValueError(f"plan_ is for n={plan_.n}, not {n}")
        # plan_ (one of ``alternatives(n)``) applies a different Hadamard matrix than hadamard_matrix(n):
        # for benchmarking the alternatives only.
        self.plan = plan(n) if plan_ is None else plan_
        self.n = n
        self.block, self.widen, self.chunk_bytes, self.use_kernel = block, widen, chunk_bytes, use_kernel
        self._cache: dict[tuple[int, torch.dtype, torch.device, bool], list[torch.Tensor]] = {}
        # A single large Paley I factor over GF(p^k), k >= 2, has a cheaper product than its GEMM (used
        # when it is the last axis as it is, i.e. not widened).
        factors = self.plan.factors
        self._structured = None
        if len(factors) == 1 and applies(factors[0]) and factors[0] >= widen:
            self._structured = PaleyOneFactor(factors[0])
        self._local = threading.local()  # per-thread work buffer: concurrent calls must not share it
        # For the CUDA kernel: the power-of-two part as one axis, then the whole dense factor H_m.
        self._kernel_dense = torch.ones(1, 1, dtype=torch.float64)
        for f in self.plan.factors:
            self._kernel_dense = torch.kron(self._kernel_dense, factor_matrix(f, torch.float64))

    def _tmp(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        # Reused between calls: an online rotation sees the same shapes call after call, and a fresh
        # buffer of many megabytes costs page faults every time. One buffer per thread is kept, as large
        # as the largest chunk seen (all rows when unchunked).
        buf = getattr(self._local, "tmp", None)
        if buf is None or buf.shape[0] < rows or buf.dtype != dtype:
            buf = self._local.tmp = torch.empty(rows, self.n, dtype=dtype)
        return buf[:rows]

    def _chunk_rows(self, element_size: int) -> int | None:
        """Rows per chunk on CPU, or None for one pass over all rows."""
        size = self.chunk_bytes
        if size is None:
            size = (1 << 20) if torch.get_num_threads() == 1 else 0
        return max(1, size // (self.n * element_size)) if size > 0 else None

    def _block(self, chunked: bool) -> int:
        return self.block if self.block is not None else (16 if chunked else 32)

    def _axes(self, block: int) -> list[torch.Tensor]:
        """The factor of each grid axis (float64), outermost first: Sylvester blocks, then dense factors.

        Factors of 2 moved into a lone dense factor are the innermost Sylvester ones,
        H_{2^k} ⊗ H_m = H_{2^(k-j)} ⊗ (H_{2^j} ⊗ H_m), so the matrix is unchanged.
        """
        dense = [factor_matrix(f, torch.float64) for f in self.plan.factors]
        dense = dense or [torch.ones(1, 1, dtype=torch.float64)]
        pow2 = self.plan.pow2
        while len(dense) == 1 and dense[0].shape[0] < self.widen and pow2 > 1:
            dense[0], pow2 = torch.kron(sylvester_matrix(2), dense[0]), pow2 // 2
        return [sylvester_matrix(b) for b in _split_pow2(pow2, block)] + dense

    def schedule(self, chunked: bool | None = None) -> list[int]:
        """Block sizes of the grid axes, outermost first (their product is n); by default as ``__call__`` on
        CPU with the current thread count would run."""
        if chunked is None:
            chunked = self._chunk_rows(4) is not None
        return [int(m.shape[0]) for m in self._axes(self._block(chunked))]

    def online_macs(self, chunked: bool | None = None) -> int:
        """Multiply-adds per vector of that schedule: n times the sum of its block sizes, with the structured
        cost for a large Paley I factor over GF(p^k) (used on the chunked path)."""
        if chunked is None:
            chunked = self._chunk_rows(4) is not None
        blocks = self.schedule(chunked)
        if chunked and self._structured is not None:
            return round(self.n * (sum(blocks[:-1]) + self._structured.macs_per_element))
        return self.n * sum(b for b in blocks if b > 1)

    def _matrices(self, block: int, dtype: torch.dtype, device: torch.device,
                  inverse: bool) -> list[torch.Tensor]:
        key = (block, dtype, device, inverse)
        if key not in self._cache:
            mats = [m.T if inverse else m for m in self._axes(block)]  # Hᵀ = ⊗ M_iᵀ
            # Stage i left-multiplies its axis by M_i. The last axis is contiguous, so there it is the
            # GEMM y @ M_iᵀ; the 1/√n is folded into that matrix.
            mats[-1] = mats[-1].T / math.sqrt(self.n)
            self._cache[key] = [m.to(device=device, dtype=dtype).contiguous() for m in mats]
        return self._cache[key]

    def _rows(self, y: torch.Tensor, mats: list[torch.Tensor], out: torch.Tensor | None,
              tmp: torch.Tensor | None, structured: bool = False, inverse: bool = False) -> torch.Tensor:
        """Transform the rows of y (r, n); with ``out`` and ``tmp`` (r, n) buffers nothing is allocated.

        Stages alternate between ``tmp`` and ``out`` so that the last one lands in ``out``. The buffers
        are written with out= ops, which autograd does not support: that path passes None. ``structured``:
        the last-axis factor goes through :class:`PaleyOneFactor` instead of the GEMM with ``mats[-1]``.
        """
        *lead, last = mats
        r = y.shape[0]
        stages = len(mats)

        def dst(i: int) -> torch.Tensor | None:
            if out is None or tmp is None:
                return None
            return out if (stages - 1 - i) % 2 == 0 else tmp

        d = dst(0)
        flat = y.reshape(-1, last.shape[0])
        if structured and self._structured is not None:
            z = self._structured(flat, inverse, 1 / math.sqrt(self.n), None if d is None else d.view_as(flat))
        elif d is None:
            z = torch.mm(flat, last)
        else:
            z = torch.mm(flat, last, out=d.view(-1, last.shape[0]))
        outer, inner = r, self.n
        for i, m in enumerate(lead, start=1):
            b = m.shape[0]
            inner //= b
            # (b x b) @ (b x inner) for each of the outer slices; expand shares m without copying it.
            src, lhs = z.view(outer, b, inner), m.expand(outer, b, b)
            d = dst(i)
            z = torch.bmm(lhs, src) if d is None else torch.bmm(lhs, src, out=d.view(outer, b, inner))
            outer *= b
        return z.reshape(r, self.n)

    def _with_kernel(self, y: torch.Tensor, inverse: bool) -> torch.Tensor:
        # The kernel transforms the last axis; the power-of-two axis is moved there and back.
        p = self.plan
        m = p.m
        if m > 1:
            a = self._kernel_dense.to(device=y.device, dtype=y.dtype)
            y = y.reshape(-1, m) @ (a if inverse else a.T)  # left-multiplies the m axis by A (or Aᵀ)
        z = y.reshape(-1, p.pow2, m).transpose(1, 2).contiguous()
        z = _cuda_fwht(z, 1.0 / math.sqrt(self.n))  # H_{2^k} is symmetric: same for the inverse
        return z.transpose(1, 2).reshape(-1, self.n)

    def __call__(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x @ Hᵀ/√n along the last dim (x @ H/√n if ``inverse``); any leading dims, float dtypes, devices."""
        if x.shape[-1] != self.n:
            raise ValueError(f"last dim {x.shape[-1]} != transform size {self.n}")
        if not x.is_floating_point():
            raise TypeError(f"the Hadamard transform needs a floating-point tensor, got {x.dtype}")
        if self.n == 1:
            return x.clone()
        y = x.reshape(-1, self.n)
        kernel = self.use_kernel if self.use_kernel is not None else (x.is_cuda and _cuda_fwht is not None)
        # The kernel zero-pads lengths that are not a multiple of 8, which would be a different matrix.
        if kernel and 8 <= self.plan.pow2 <= 32768 and x.dtype in _KERNEL_DTYPES:
            if _cuda_fwht is None:
                raise RuntimeError("use_kernel=True needs the fast-hadamard-transform package")
            return self._with_kernel(y, inverse).view(x.shape)
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            mats = self._matrices(self._block(False), x.dtype, x.device, inverse)
            return self._rows(y, mats, None, None).view(x.shape)  # one pass, autograd-friendly
        step = self._chunk_rows(x.element_size())
        chunked = step is not None
        mats = self._matrices(self._block(chunked), x.dtype, x.device, inverse)
        out = torch.empty((y.shape[0], self.n), dtype=x.dtype)
        step = y.shape[0] if step is None else step
        if y.shape[0] == 0:
            return out.view(x.shape)
        tmp = self._tmp(min(step, y.shape[0]), x.dtype) if len(mats) > 1 else out
        structured = chunked  # its extra passes pay off only while the chunk is in cache
        for r0 in range(0, y.shape[0], step):
            rows = min(step, y.shape[0] - r0)
            self._rows(y[r0:r0 + rows], mats, out[r0:r0 + rows], tmp[:rows], structured, inverse)
        return out.view(x.shape)


def kronecker_reference(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x @ Hᵀ/√n computed straight from the Kronecker definition, one factor per grid axis, in float64.

    An independent check of the fast transform that never forms the n x n matrix: with the factors
    checked exactly (``verify``), agreement on random probes shows the transform applies that H.
    """
    n = x.shape[-1]
    p = plan(n)
    factors = [sylvester_matrix(p.pow2)] + [factor_matrix(f, torch.float64) for f in p.factors]
    y = x.to(torch.float64).reshape(-1, *(int(f.shape[0]) for f in factors))
    for axis, f in enumerate(factors, start=1):
        # Left-multiply this axis by F (Fᵀ for the inverse): contract F's columns with the axis.
        y = torch.movedim(torch.tensordot(y, f if inverse else f.T, dims=([axis], [0])), -1, axis)
    return (y / math.sqrt(n)).reshape(x.shape)


_TRANSFORMS: dict[int, HadamardTransform] = {}


def hadamard_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Normalized Hadamard transform of the last dim: x @ Hᵀ/√n, or x @ H/√n with ``inverse``.

    H is ``hadamard_matrix(x.shape[-1])``; the :class:`HadamardTransform` of each size is cached.
    """
    n = x.shape[-1]
    if n not in _TRANSFORMS:
        _TRANSFORMS[n] = HadamardTransform(n)
    return _TRANSFORMS[n](x, inverse=inverse)
