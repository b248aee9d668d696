"""Hadamard matrices of every constructible order (Sylvester, Paley I/II, Kronecker) and fast transforms."""

from spikequant.hadamard.constructions import (
    HadamardPlan,
    NoHadamardError,
    factor_matrix,
    hadamard_matrix,
    is_constructible,
    next_constructible,
    plan,
    verify,
)
from spikequant.hadamard.coverage import MODEL_DIMS, coverage, coverage_table
from spikequant.hadamard.random import RandomizedHadamard, random_orthogonal_matrix, random_signs
from spikequant.hadamard.transform import HadamardTransform, fwht, hadamard_transform

__all__ = [
    "MODEL_DIMS", "HadamardPlan", "HadamardTransform", "NoHadamardError", "RandomizedHadamard", "coverage",
    "coverage_table", "factor_matrix", "fwht", "hadamard_matrix", "hadamard_transform", "is_constructible",
    "next_constructible", "plan", "random_orthogonal_matrix", "random_signs", "verify",
]
