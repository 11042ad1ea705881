"""Helpers of the structures: option checks, small solves, ``sym``, spec copies (re-exported
by :mod:`structvi.structures.base`, where they were defined first)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["LOG_2PI_E", "check_int_option", "solve_dtype", "solve_small", "sym"]


def _copy_plain(x: Any) -> Any:
    """A copy of nested dicts, lists and tuples (the leaves, ints and strings, shared)."""
    if isinstance(x, dict):
        return {k: _copy_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_copy_plain(v) for v in x)
    return x


def _check_dim(dim: Any) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got dim={dim!r}")


def check_int_option(name: str, value: Any, low: int, high: int | None, structure: str) -> int:
    """Validate an integer option; the message names the argument, value and range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{structure}: {name} must be an integer, got {name}={value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{structure}: {name} must be {rng}, got {name}={value}")
    return value


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solves run in: ``dtype`` promoted to at least float32 (CPU has no half LU or
    triangular solve, and one rounding at the end keeps half-precision solves accurate)."""
    return torch.promote_types(dtype, torch.float32)


def solve_small(A: Tensor, X: Tensor) -> Tensor:
    """``A^{-1} X`` for a small dense (or batched ``(..., k, k)``) ``A`` and ``X`` ``(..., k, n)``.

    Computed in :func:`solve_dtype` of ``A`` and returned in that dtype (callers round once). A
    ``1×1`` system is a division (no LU); an empty one returns ``X``.
    """
    acc = solve_dtype(A.dtype)
    A, X = A.to(acc), X.to(acc)
    k = A.shape[-1]
    if k == 0:
        return X
    if k == 1:
        return X / A
    return torch.linalg.solve(A, X)


def sym(A: Tensor) -> Tensor:
    """``½(A + Aᵀ)``."""
    return (A + A.transpose(-1, -2)).mul_(0.5)  # one allocation; the bits of 0.5 * (A + Aᵀ)


LOG_2PI_E = math.log(2 * math.pi * math.e)
