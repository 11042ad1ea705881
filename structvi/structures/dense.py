r"""Dense factor: every entry free.

.. math:: K = \begin{pmatrix} k_{11} & \cdots & k_{1d} \\ \vdots & \ddots & \vdots \\
          k_{d1} & \cdots & k_{dd} \end{pmatrix}, \qquad \Sigma = K K^\top,\ S = K^{-\top} K^{-1}
          \text{ both dense.}

Coordinates ℳ = Sym(d), ``Π̂(Y) = Y``. Storage ``d²``; ``matmul`` O(d² n).
"""

from __future__ import annotations

import torch
from torch import Tensor

from structvi.structures.base import Structure, solve_small, sym
from structvi.structures.registry import register


@register
class Dense(Structure):
    """Dense ``d×d`` factor (tensor ``matrix``)."""

    name = "dense"

    @classmethod
    def shapes(cls, dim, **options):
        return {"matrix": (dim, dim)}

    @classmethod
    def identity_tensors(cls, dim, *, dtype, device, **options):
        return {"matrix": torch.eye(dim, dtype=dtype, device=device)}

    @property
    def matrix(self) -> Tensor:
        return self._t["matrix"]

    def to_dense(self) -> Tensor:
        return self.matrix

    def from_dense(self, A: Tensor) -> Dense:
        return self._new({"matrix": A.to(self.dtype)})

    def project(self, Y: Tensor) -> Dense:
        return self._new({"matrix": sym(Y).to(self.dtype)})

    def matmul(self, x: Tensor) -> Tensor:
        self._check_vec(x)
        return self.matrix @ x

    def rmatmul(self, x: Tensor) -> Tensor:
        self._check_vec(x)
        return self.matrix.T @ x

    def apply_along(self, X: Tensor, axis: int, transpose: bool = False) -> Tensor:
        A = self.matrix.T if transpose else self.matrix
        if axis == 0:
            return (A @ X.reshape(X.shape[0], -1)).reshape(X.shape)
        d1, d2, n = X.shape  # one GEMM on the unfolding (faster than d1 batched small ones)
        return (A @ X.transpose(0, 1).reshape(d2, -1)).reshape(d2, d1, n).transpose(0, 1)

    def solve(self, x: Tensor) -> Tensor:
        """``K^{-1} x`` by an LU solve, O(d³ + d² n), in float32 or wider (log-densities and
        diagnostics only; no update calls it)."""
        self._check_vec(x)
        X = x.reshape(self.dim, -1)
        return solve_small(self.matrix, X).to(self.dtype).reshape(x.shape)

    def compose(self, other: Structure) -> Dense:
        self._check_same(other)
        return self._new({"matrix": self.matrix @ other.matrix})

    def project_outer(self, U: Tensor, V: Tensor | None = None) -> Dense:
        V = U if V is None else V
        self._check_vec(U, "U")
        self._check_vec(V, "V")
        U, V = U.reshape(self.dim, -1), V.reshape(self.dim, -1)
        return self._new({"matrix": sym(U @ V.T).to(self.dtype)})

    def inner_project_self(self) -> Dense:
        return self._new({"matrix": sym(self.matrix.T @ self.matrix)})

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal()

    def retract(self, M: Structure, retraction: str = "quadratic") -> Dense:
        """``K h(M)``: ``K + KM + ½(KM)M`` (quadratic) or ``K + KM`` (first order) by two / one
        products, without forming ``h(M)``; ``"expm"`` as the base class."""
        if retraction not in ("quadratic", "first_order") or type(M) is not Dense:
            return super().retract(M, retraction)
        self._check_same(M, "M")
        K, A = self.matrix, M.matrix
        KM = K @ A
        out = K + KM
        return self._new({"matrix": torch.addmm(out, KM, A, alpha=0.5)
                          if retraction == "quadratic" else out})

    def power_traces(self, terms: int) -> list[float]:
        A, out, P = self.matrix, [], self.matrix
        for k in range(terms):
            out.append(P.diagonal().sum())
            if k + 1 < terms:
                P = P @ A
        return torch.stack(out).tolist() if out else []

    def gram_diagonal(self) -> Tensor:
        return self.matrix.square().sum(-1)

    def inf_norm(self) -> Tensor:
        return self.matrix.abs().sum(-1).max()

    def logabsdet(self) -> Tensor:
        # Monitoring only (entropy of a dense q); never called inside an update (MATH §2.6).
        return torch.linalg.slogdet(self.matrix.double())[1].to(self.dtype)
