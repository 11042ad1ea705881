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

    def matmul_rows(self, X: Tensor) -> Tensor:
        """``X Kᵀ`` in one product on the transposed view."""
        if not isinstance(X, Tensor) or X.dim() != 2 or X.shape[1] != self.dim:
            return super().matmul_rows(X)  # raises with the expected shape
        return torch.mm(X, self.matrix.T)

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

    def add_identity(self, alpha: float) -> Dense:
        out = self.matrix.clone()
        out.diagonal().add_(alpha)
        return self._new({"matrix": out})

    def retract(self, M: Structure, retraction: str = "quadratic") -> Dense:
        """``K h(M)``: ``K + KM + ½(KM)M`` (quadratic) or ``K + KM`` (first order) by two / one
        products, without forming ``h(M)`` (float32/float64); ``"expm"`` and half precisions
        (where the rounding of ``h(M)`` first is the tested behaviour) as the base class."""
        if retraction not in ("quadratic", "first_order") or type(M) is not Dense or \
                self.matrix.dtype not in (torch.float32, torch.float64):
            return super().retract(M, retraction)
        self._check_same(M, "M")
        K, A = self.matrix, M.matrix
        KM = K @ A
        out = K + KM
        return self._new({"matrix": torch.addmm(out, KM, A, alpha=0.5)
                          if retraction == "quadratic" else out})

    def power_trace_tensor(self, terms: int) -> Tensor:
        """``tr(M^k)``, ``k ≤ terms``, from the powers ``M..M^h``, ``h = ⌈terms/2⌉`` (``h − 1``
        products): ``tr(M^k)`` for ``k ≤ h`` from their diagonals and
        ``tr(M^(h+j)) = Σ_il (M^h)ᵀ_il (M^j)_il`` for the rest."""
        A = self.matrix
        if terms <= 0:
            return A.new_zeros(0)
        h = (terms + 1) // 2
        powers = [A]
        for _ in range(h - 1):
            powers.append(powers[-1] @ A)
        S = torch.stack(powers)
        low = S.diagonal(dim1=-2, dim2=-1).sum(-1)
        if terms == h:
            return low
        high = (S[: terms - h] * powers[-1].T).sum((-2, -1))
        return torch.cat([low, high])

    def gram_diagonal(self) -> Tensor:
        return self.matrix.square().sum(-1)

    def abs_row_sums(self) -> Tensor:
        return self.matrix.abs().sum(-1)

    def inf_norm(self) -> Tensor:
        return self.matrix.abs().sum(-1).max()

    def logabsdet(self) -> Tensor:
        # Monitoring only (entropy of a dense q); never called inside an update (MATH §2.6).
        return torch.linalg.slogdet(self.matrix.double())[1].to(self.dtype)
