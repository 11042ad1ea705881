"""Conformance checks for structures, shipped so that users who add a structure get our suite.

A :class:`StructureCase` describes one structure configuration by **independent dense oracles**:
a random in-group factor, a random coordinate element, the dense projection ``Π̂`` and the
sparsity mask. The ``check_*`` functions compare every :class:`~structvi.structures.Structure`
operation against the float64 oracle evaluated on the *already rounded* inputs, so only the
operation's own rounding error is measured, with tolerances from :func:`tol`.

Typical use (see ``tests/structures/test_conformance.py``)::

    case = pattern_case("block_diagonal", 7, block_mask(7, 3), block_size=3)
    for check in CHECKS:
        check(case, torch.float32, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from structvi.structures import Structure, make_structure, structure_from_spec

__all__ = [
    "StructureCase",
    "assert_close",
    "pattern_case",
    "pattern_project",
    "tol",
]

# c_op in rtol = atol = c_op · eps(dtype) · √d (STYLE §4.5); one table for all ops.
TOLERANCE_FACTORS = {"exact": 0.0, "matmul": 8.0, "compose": 16.0, "inner": 32.0, "reduce": 16.0}


def tol(dtype: torch.dtype, dim: int, op: str = "matmul") -> float:
    """Tolerance ``c_op · eps(dtype) · √dim`` (``float64`` gets at least ``1e-12``)."""
    eps = torch.finfo(dtype).eps
    return max(TOLERANCE_FACTORS[op] * eps * math.sqrt(dim), 1e-12 if op != "exact" else 0.0)


def assert_close(actual: Tensor, expected: Tensor, rtol: float, what: str = "") -> None:
    """``|a − e| ≤ rtol·(scale + |e|)`` with ``scale = max(1, max|e|)``; reports where and how much."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    err = (a - e).abs()
    bound = rtol * (scale + e.abs())
    bad = ~(err <= bound)
    if bad.any():
        idx = [tuple(int(i) for i in ix) for ix in bad.nonzero()[:5]]
        detail = ", ".join(f"{i}: got {float(a[i]):.6g}, want {float(e[i]):.6g}" for i in idx)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{e.numel()} entries off (max err {float(err.max()):.3g}, "
            f"rtol {rtol:.3g}, scale {scale:.3g}); first: {detail}"
        )


def pattern_project(Y: Tensor, mask: Tensor) -> Tensor:
    """Dense ``Π̂`` for a pattern structure whose coordinates are the pattern itself.

    Entries whose mirror is in the pattern are kept, entries whose mirror is not are doubled,
    the rest are zero (MATH §1.4: ``½(Π̂(Y) + Π̂(Y)ᵀ)`` is the orthogonal projection).
    """
    m = mask.to(torch.bool)
    both = m & m.T
    return torch.where(both, Y, torch.where(m, 2 * Y, torch.zeros_like(Y)))


@dataclass
class StructureCase:
    """One structure configuration and its independent float64 oracles.

    Attributes:
        name: registered structure name.
        dim: matrix size.
        options: structure options.
        random_group: ``gen -> (structure, dense)``, a random invertible factor (float64).
        random_coord: ``gen -> (structure, dense)``, a random coordinate element (float64).
        oracle_project: dense ``Π̂`` of a symmetric matrix (float64).
        mask: boolean ``d×d`` pattern (entries outside must stay exactly zero).
        storage: expected :meth:`Structure.num_params`.
        orthogonal: whether group elements and coordinates share one pattern, so the projection
            identities apply as written (false for Kronecker).
    """

    name: str
    dim: int
    options: dict[str, Any]
    random_group: Callable[[torch.Generator], tuple[Structure, Tensor]]
    random_coord: Callable[[torch.Generator], tuple[Structure, Tensor]]
    oracle_project: Callable[[Tensor], Tensor]
    mask: Tensor
    storage: int
    orthogonal: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        if "blocks" in self.options:  # block_sites: the blocks' names and sizes
            inner = "+".join(f"{b['name']}{b['dim']}" for b in self.options["blocks"])
            return f"{self.name}({inner})-d={self.dim}"
        opts = ",".join(f"{k}={_short(v)}" for k, v in self.options.items())
        return f"{self.name}({opts})-d={self.dim}" if opts else f"{self.name}-d={self.dim}"

    def make(self, init: str = "identity", dtype: torch.dtype = torch.float64) -> Structure:
        return make_structure(self.name, self.dim, dtype=dtype, init=init, **self.options)


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(_short(x) for x in v)
    if isinstance(v, dict):
        return "-".join(f"{k}{_short(x)}" for k, x in v.items())
    return str(v)


def pattern_case(name: str, dim: int, mask: Tensor, **options: Any) -> StructureCase:
    """A case for a structure whose group and coordinates are 'entries on a fixed pattern'."""
    mask = mask.to(torch.bool)
    eye = torch.eye(dim, dtype=torch.float64)

    def random_group(gen: torch.Generator) -> tuple[Structure, Tensor]:
        A = eye + 0.3 * torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        A = torch.where(mask, A, torch.zeros_like(A))
        return make_structure(name, dim, dtype=torch.float64, **options).from_dense(A), A

    def random_coord(gen: torch.Generator) -> tuple[Structure, Tensor]:
        Y = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        M = pattern_project(0.15 * (Y + Y.T), mask)
        return make_structure(name, dim, dtype=torch.float64, **options).from_dense(M), M

    return StructureCase(
        name, dim, dict(options), random_group, random_coord,
        lambda Y: pattern_project(Y, mask), mask, int(mask.sum()),
    )


def state_roundtrip(s: Structure) -> Structure:
    """Save ``tensors()``/``spec()`` with ``torch.save`` and load with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save({"tensors": s.tensors(), "spec": json.loads(json.dumps(s.spec()))}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    return structure_from_spec(loaded["tensors"], loaded["spec"])
