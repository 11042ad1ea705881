r"""Triangular factors: lower (a Cholesky factor of Σ) and upper.

``lower_triangular``:

.. math:: K = \begin{pmatrix} k_{11} & & \\ \vdots & \ddots & \\ k_{d1} & \cdots & k_{dd}
          \end{pmatrix}, \qquad \Sigma = K K^\top \text{ (K is its Cholesky factor)},\
          S = K^{-\top} K^{-1} \text{ (} K^{-\top} \text{ upper triangular)}.

``upper_triangular``:

.. math:: K = \begin{pmatrix} k_{11} & \cdots & k_{1d} \\ & \ddots & \vdots \\ & & k_{dd}
          \end{pmatrix}, \qquad \Sigma = K K^\top,\
          S = K^{-\top} K^{-1} \text{ (} K^{-\top} \text{ lower triangular: S's Cholesky factor)}.

Both give a full Σ and a full precision S (every Gaussian is reachable), with ``d(d+1)/2`` free
numbers. Coordinates ℳ = the same triangle (diagonal included); ``Π̂(Y)`` keeps the diagonal,
doubles the kept triangle and zeroes the other (MATH §1.4): the metric at the origin weighs
diagonal entries by 2 and off-diagonal ones by 1.

Storage: one ``d×d`` tensor ``matrix`` whose other triangle holds exact zeros (kept exact by
every operation); :meth:`num_params` counts the ``d(d+1)/2`` free entries. ``matmul`` O(d² n);
``log|det K| = Σ log|k_ii|`` needs no decomposition.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from structvi.structures.base import Structure, solve_dtype
from structvi.structures.registry import register


class _Triangular(Structure):
    """Shared code: a ``d×d`` tensor ``matrix`` masked to one triangle (set :attr:`upper`)."""

    upper: ClassVar[bool] = False

    @classmethod
    def shapes(cls, dim, **options):
        return {"matrix": (dim, dim)}

    @classmethod
    def identity_tensors(cls, dim, *, dtype, device, **options):
        return {"matrix": torch.eye(dim, dtype=dtype, device=device)}

    @property
    def matrix(self) -> Tensor:
        return self._t["matrix"]

    def num_params(self) -> int:
        """Free entries, ``d(d+1)/2`` (the stored ``d×d`` tensor also holds the zero triangle)."""
        return self.dim * (self.dim + 1) // 2

    def _mask(self, A: Tensor) -> Tensor:
        """``A`` restricted to the pattern (a new tensor; outside entries exactly zero).

        An element-wise ``where`` rather than ``tril``/``triu``: those parallelize even a
        ``7×7`` matrix and were measured 10⁴× slower on a loaded 2-core machine.
        """
        i = torch.arange(self.dim, device=A.device)
        keep = i[:, None] <= i[None, :] if self.upper else i[:, None] >= i[None, :]
        return torch.where(keep, A, A.new_zeros(()))

    def _project_sym2(self, Y2: Tensor, diag: Tensor) -> _Triangular:
        """``Π̂`` from ``Y2 = Y + Yᵀ`` (already doubled) and ``diag(Y)``."""
        P = self._mask(Y2.to(self.dtype))
        P.diagonal().copy_(diag)
        return self._new({"matrix": P})

    def to_dense(self) -> Tensor:
        return self.matrix

    def from_dense(self, A: Tensor) -> _Triangular:
        return self._new({"matrix": self._mask(A.to(self.dtype))})

    def project(self, Y: Tensor) -> _Triangular:
        """``Π̂(Y)`` of ``sym(Y)``: diagonal kept, kept triangle ``Y + Yᵀ``, the other zero."""
        return self._project_sym2(Y + Y.mT, Y.diagonal().to(self.dtype))

    def matmul(self, x: Tensor) -> Tensor:
        """``K @ x``, O(d² n), reading only the kept triangle.

        The mask (O(d²), elementwise) keeps ``matmul`` consistent with :meth:`solve` and
        :meth:`logabsdet`, which read only the triangle, and gives the zero triangle no gradient
        when the storage is trained by autograd (the Pyro guide under a torch optimizer).
        """
        self._check_vec(x)
        return self._mask(self.matrix) @ x

    def rmatmul(self, x: Tensor) -> Tensor:
        """``Kᵀ @ x``, O(d² n), reading only the kept triangle (see :meth:`matmul`)."""
        self._check_vec(x)
        return self._mask(self.matrix).T @ x

    def solve(self, x: Tensor) -> Tensor:
        """``K^{-1} x`` by triangular substitution (no factorization), O(d² n), in float32 or
        wider (log-densities and diagnostics only; no update calls it)."""
        self._check_vec(x)
        acc = solve_dtype(self.dtype)
        X = x.reshape(self.dim, -1).to(acc)
        Y = torch.linalg.solve_triangular(self.matrix.to(acc), X, upper=self.upper)
        return Y.to(self.dtype).reshape(x.shape)

    def compose(self, other: Structure) -> _Triangular:
        self._check_same(other)
        return self._new({"matrix": self._mask(self.matrix @ other.matrix)})

    def project_outer(self, U: Tensor, V: Tensor | None = None) -> _Triangular:
        """``Π̂(sym(U Vᵀ))``, O(d² n)."""
        V = U if V is None else V
        self._check_vec(U, "U")
        self._check_vec(V, "V")
        U, V = U.reshape(self.dim, -1), V.reshape(self.dim, -1)
        W = U @ V.T
        return self._project_sym2(W + W.T, (U * V).sum(-1))

    def inner_project_self(self) -> _Triangular:
        """``Π̂(KᵀK)``, O(d³) for a storage of ``d²`` (the dense structure costs the same)."""
        G = self.matrix.T @ self.matrix
        return self._project_sym2(G + G.T, self.matrix.square().sum(0))

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal()

    def gram_diagonal(self) -> Tensor:
        return self.matrix.square().sum(-1)

    def inf_norm(self) -> Tensor:
        return self.matrix.abs().sum(-1).max()

    def logabsdet(self) -> Tensor:
        return self.matrix.diagonal().abs().log().sum()


@register
class LowerTriangular(_Triangular):
    """Lower-triangular factor ``K`` (the Cholesky factor of Σ); tensor ``matrix`` ``(d, d)``."""

    name = "lower_triangular"
    upper = False


@register
class UpperTriangular(_Triangular):
    """Upper-triangular factor ``K``; tensor ``matrix`` ``(d, d)``.

    ``K^{-T}`` is lower triangular: the Cholesky factor of the precision ``S``.
    """

    name = "upper_triangular"
    upper = True
