"""Hadamard matrices of every constructible order (Sylvester, Paley I/II over GF(p^k), stored orders 156, 172
and 428 from published sequences, Kronecker products) and fast transforms; see docs/hadamard.md."""

from spikequant.hadamard.constructions import (
    FAST_FACTOR,
    HadamardPlan,
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
from spikequant.hadamard.coverage import MODEL_DIMS, Coverage, coverage, coverage_table
from spikequant.hadamard.fields import GaloisField
from spikequant.hadamard.random import (
    RandomizedHadamard,
    random_hadamard_matrix,
    random_orthogonal_matrix,
    random_signs,
)
from spikequant.hadamard.transform import HadamardTransform, fwht, hadamard_transform, kronecker_reference

__all__ = [
    "FAST_FACTOR", "MODEL_DIMS", "Coverage", "GaloisField", "HadamardPlan", "HadamardTransform",
    "NoHadamardError", "RandomizedHadamard", "alternatives", "coverage", "coverage_table",
    "dense_factor_matrix", "factor_matrix", "fwht", "hadamard_matrix", "hadamard_transform", "is_constructible",
    "kronecker_reference", "next_constructible", "paley_matrix", "plan", "previous_plan",
    "random_hadamard_matrix", "random_orthogonal_matrix", "random_signs", "sylvester_matrix", "verify",
]
