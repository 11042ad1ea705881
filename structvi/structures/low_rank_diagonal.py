r"""Low-rank-plus-diagonal precision: a factor with ``k`` dense rows over a diagonal.

.. math:: K = \begin{pmatrix} K_A & K_B \\ 0 & \operatorname{diag}(k_D) \end{pmatrix}
          \quad (K_A:\ k\times k,\ K_B:\ k\times(d-k),\ k_D \in \mathbb{R}^{d-k}),

.. math:: \Sigma = K K^\top = \begin{pmatrix} K_A K_A^\top + K_B K_B^\top & K_B D \\
          D K_B^\top & D^2 \end{pmatrix},\qquad
          S = K^{-\top} K^{-1} = \begin{pmatrix} 0 & 0 \\ 0 & D^{-2} \end{pmatrix} + W W^\top,

with :math:`D = \operatorname{diag}(k_D)` and
:math:`W = \begin{pmatrix} I_k \\ -D^{-1} K_B^\top \end{pmatrix} K_A^{-\top}` (rank ``k``): the
**precision** is rank-``k`` plus diagonal, which gives the structure its name. ``K = B^{-T}`` for
the precision factor ``B`` of the block lower-triangular group ``B_low(k)`` (MATH §2.4, §2.6).

Coordinates ℳ: ``[[M_A sym, M_B], [0, diag M_D]]``, with
``Π̂(Y) = [[Y_A, 2 Y_B], [0, diag Y_D]]`` (MATH §1.4). The group is closed under products:
``[[A₁A₂, A₁B₂ + B₁ diag(D₂)], [0, D₁D₂]]``.

Storage ``k² + k(d−k) + (d−k)`` (tensors ``A``, ``B``, ``D``); ``matmul``, ``rmatmul`` and
``project_outer`` cost O(k d n), ``compose`` and ``inner_project_self`` O(k² d).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from structvi.structures.base import (
    Structure,
    _check_dim,
    check_int_option,
    solve_dtype,
    solve_small,
    sym,
)
from structvi.structures.registry import register


@register
class LowRankDiagonal(Structure):
    """Factor ``[[A, B], [0, diag D]]`` with ``A`` of shape ``(k, k)`` (option ``rank = k``).

    Args:
        dim: matrix size ``d`` (at least 2).
        tensors: ``A`` of shape ``(k, k)``, ``B`` of shape ``(k, d − k)``, ``D`` of shape
            ``(d − k,)``.
        rank: ``k``, an integer in ``[1, d − 1]``.
    """

    name = "low_rank_diagonal"

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> dict[str, Any]:
        _check_dim(dim)
        unknown = sorted(set(options) - {"rank"})
        if unknown:
            raise TypeError(f"{cls.name} takes only the option 'rank', got {unknown}")
        if "rank" not in options:
            raise TypeError(f"{cls.name} requires the option rank (an integer in [1, dim-1])")
        rank = check_int_option("rank", options["rank"], 1, None, cls.name)
        if rank > dim - 1:
            raise ValueError(
                f"{cls.name}: rank must be in [1, dim-1] = [1, {dim - 1}], "
                f"got rank={rank} for dim={dim}"
            )
        return {"rank": rank}

    @classmethod
    def fit_options(cls, dim: int, **options: Any) -> dict[str, Any]:
        """``rank = min(rank, dim - 1)`` (a ``1×1`` matrix has no room for a rank)."""
        out = dict(options)
        k = out.get("rank")
        if isinstance(k, int) and not isinstance(k, bool) and dim >= 2 and k > dim - 1:
            out["rank"] = dim - 1
        return out

    @classmethod
    def shapes(cls, dim, *, rank, **options):
        return {"A": (rank, rank), "B": (rank, dim - rank), "D": (dim - rank,)}

    @classmethod
    def identity_tensors(cls, dim, *, dtype, device, rank, **options):
        return {
            "A": torch.eye(rank, dtype=dtype, device=device),
            "B": torch.zeros(rank, dim - rank, dtype=dtype, device=device),
            "D": torch.ones(dim - rank, dtype=dtype, device=device),
        }

    @property
    def rank(self) -> int:
        return self.options["rank"]

    @property
    def A(self) -> Tensor:
        return self._t["A"]

    @property
    def B(self) -> Tensor:
        return self._t["B"]

    @property
    def D(self) -> Tensor:
        return self._t["D"]

    def _make(self, A: Tensor, B: Tensor, D: Tensor) -> LowRankDiagonal:
        return self._new({"A": A.to(self.dtype), "B": B.to(self.dtype), "D": D.to(self.dtype)})

    def _check_square(self, Y: Tensor, arg: str) -> None:
        if not isinstance(Y, Tensor) or tuple(Y.shape) != self.shape:
            shape = tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__
            raise ValueError(f"{arg} must have shape {self.shape}, got {shape}")

    # ------------------------------------------------------------------ dense forms
    def to_dense(self) -> Tensor:
        lower_left = self.B.new_zeros(self.dim - self.rank, self.rank)
        top = torch.cat([self.A, self.B], dim=1)
        return torch.cat([top, torch.cat([lower_left, torch.diag(self.D)], dim=1)])

    def from_dense(self, A: Tensor) -> LowRankDiagonal:
        self._check_square(A, "A")
        k = self.rank
        return self._make(A[:k, :k].clone(), A[:k, k:].clone(), A[k:, k:].diagonal().clone())

    def project(self, Y: Tensor) -> LowRankDiagonal:
        # Π̂(sym Y): kept diagonal blocks, doubled off-diagonal block (MATH §1.4).
        self._check_square(Y, "Y")
        k = self.rank
        return self._make(sym(Y[:k, :k]), Y[:k, k:] + Y[k:, :k].T, Y[k:, k:].diagonal().clone())

    # ------------------------------------------------------------------ products
    def matmul(self, x: Tensor) -> Tensor:
        """``K @ x = [A x₁ + B x₂; D ⊙ x₂]`` in O(k d n)."""
        self._check_vec(x)
        X, k = x.reshape(self.dim, -1), self.rank
        top = self.A @ X[:k] + self.B @ X[k:]
        return torch.cat([top, self.D[:, None] * X[k:]]).reshape(x.shape)

    def rmatmul(self, x: Tensor) -> Tensor:
        """``Kᵀ @ x = [Aᵀ x₁; Bᵀ x₁ + D ⊙ x₂]`` in O(k d n)."""
        self._check_vec(x)
        X, k = x.reshape(self.dim, -1), self.rank
        bottom = self.B.T @ X[:k] + self.D[:, None] * X[k:]
        return torch.cat([self.A.T @ X[:k], bottom]).reshape(x.shape)

    def solve(self, x: Tensor) -> Tensor:
        """``K^{-1} x`` by block back substitution, O(k³ + k d n), in float32 or wider:
        ``y₂ = x₂ / D``, ``y₁ = A^{-1}(x₁ − B y₂)`` (a ``k×k`` LU solve). For log-densities and
        diagnostics only; no update calls it."""
        self._check_vec(x)
        acc, k = solve_dtype(self.dtype), self.rank
        X = x.reshape(self.dim, -1).to(acc)
        A, B, D = (t.to(acc) for t in (self.A, self.B, self.D))
        y2 = X[k:] / D[:, None]
        y1 = solve_small(A, X[:k] - B @ y2)
        return torch.cat([y1, y2]).to(self.dtype).reshape(x.shape)

    def compose(self, other: Structure) -> LowRankDiagonal:
        """``[[A₁A₂, A₁B₂ + B₁ diag(D₂)], [0, D₁D₂]]`` in O(k² d)."""
        self._check_same(other)
        return self._make(
            self.A @ other.A, self.A @ other.B + self.B * other.D, self.D * other.D
        )

    # ------------------------------------------------------------------ projections
    def project_outer(self, U: Tensor, V: Tensor | None = None) -> LowRankDiagonal:
        """``Π̂(½(U Vᵀ + V Uᵀ))`` from the first ``k`` rows and the diagonal: O(k d n)."""
        V = U if V is None else V
        self._check_vec(U, "U")
        self._check_vec(V, "V")
        U, V, k = U.reshape(self.dim, -1), V.reshape(self.dim, -1), self.rank
        A = sym(U[:k] @ V[:k].T)
        B = U[:k] @ V[k:].T + V[:k] @ U[k:].T
        return self._make(A, B, (U[k:] * V[k:]).sum(-1))

    def gram_rows(self) -> Tensor:
        """``K Kᵀ`` is diagonal outside the first ``k`` rows and columns."""
        return torch.arange(self.options["rank"], device=self.device)

    def inner_project_self(self) -> LowRankDiagonal:
        """``Π̂(Kᵀ K) = [[AᵀA, 2AᵀB], [0, diag(BᵀB) + D²]]`` in O(k² d)."""
        A, B, D = self.A, self.B, self.D
        return self._make(sym(A.T @ A), 2 * (A.T @ B), B.square().sum(0) + D.square())

    # ------------------------------------------------------------------ reductions
    def diagonal(self) -> Tensor:
        return torch.cat([self.A.diagonal(), self.D])

    def gram_diagonal(self) -> Tensor:
        top = self.A.square().sum(-1) + self.B.square().sum(-1)
        return torch.cat([top, self.D.square()])

    def inf_norm(self) -> Tensor:
        top = self.A.abs().sum(-1) + self.B.abs().sum(-1)
        return torch.cat([top, self.D.abs()]).max()

    def logabsdet(self) -> Tensor:
        """``log|det A| + Σ log|D|`` (block triangular).

        The k×k ``slogdet`` is for monitoring and the entropy only; no update calls it.
        """
        A, D = self.A.double(), self.D.double()
        return (torch.linalg.slogdet(A)[1] + D.abs().log().sum()).to(self.dtype)
