"""Structured matrices for covariance-side factors ``K`` (``Σ = K Kᵀ``) and their coordinates.

Every module in this package that defines a structure registers it with :func:`register`;
they are imported here so that :func:`make_structure` knows all of them.
"""

from structvi.structures.base import NaiveFallbackWarning, Structure
from structvi.structures.registry import (
    STRUCTURES,
    get_structure_class,
    make_structure,
    register,
    structure_from_spec,
)

# Importing the modules registers the structures (order = listing order in the docs).
from structvi.structures import (  # noqa: E402,F401
    dense,
    diagonal,
    block_diagonal,
    triangular,
    low_rank_diagonal,
    hierarchical,
    triangular_toeplitz,
    kronecker,
    block_sites,
)

__all__ = [
    "STRUCTURES",
    "NaiveFallbackWarning",
    "Structure",
    "get_structure_class",
    "make_structure",
    "register",
    "structure_from_spec",
]
