r"""Diagonal factor (mean-field).

.. math:: K = \operatorname{diag}(k_1, \dots, k_d), \qquad
          \Sigma = \operatorname{diag}(k_i^2),\ S = \operatorname{diag}(k_i^{-2}).

Coordinates ℳ = diagonal matrices, ``Π̂(Y) = diag(Y)``. Storage ``d``; ``matmul`` O(d n).
"""

from __future__ import annotations

import torch
from torch import Tensor

from structvi.structures.base import Structure
from structvi.structures.registry import register


@register
class Diagonal(Structure):
    """Diagonal factor (tensor ``diag`` of shape ``(d,)``)."""

    name = "diagonal"

    @classmethod
    def shapes(cls, dim, **options):
        return {"diag": (dim,)}

    @classmethod
    def identity_tensors(cls, dim, *, dtype, device, **options):
        return {"diag": torch.ones(dim, dtype=dtype, device=device)}

    @property
    def diag(self) -> Tensor:
        return self._t["diag"]

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)

    def from_dense(self, A: Tensor) -> Diagonal:
        return self._new({"diag": A.diagonal().to(self.dtype)})

    def project(self, Y: Tensor) -> Diagonal:
        return self._new({"diag": Y.diagonal().to(self.dtype).clone()})

    def _scale_rows(self, x: Tensor) -> Tensor:
        self._check_vec(x)
        return self.diag * x if x.dim() == 1 else self.diag[:, None] * x

    def matmul(self, x: Tensor) -> Tensor:
        return self._scale_rows(x)

    def rmatmul(self, x: Tensor) -> Tensor:
        return self._scale_rows(x)

    def apply_along(self, X: Tensor, axis: int, transpose: bool = False) -> Tensor:
        return X * (self.diag[:, None, None] if axis == 0 else self.diag[None, :, None])

    def solve(self, x: Tensor) -> Tensor:
        """``K^{-1} x = x / k`` row-wise, O(d n) (log-densities and diagnostics only)."""
        self._check_vec(x)
        return x / self.diag if x.dim() == 1 else x / self.diag[:, None]

    def compose(self, other: Structure) -> Diagonal:
        self._check_same(other)
        return self._new({"diag": self.diag * other.diag})

    def project_outer(self, U: Tensor, V: Tensor | None = None) -> Diagonal:
        V = U if V is None else V
        self._check_vec(U, "U")
        self._check_vec(V, "V")
        prod = U.reshape(self.dim, -1) * V.reshape(self.dim, -1)
        return self._new({"diag": prod.sum(-1).to(self.dtype)})

    def gram_rows(self) -> Tensor:
        """``K Kᵀ`` is diagonal: ``J = ∅``."""
        return torch.zeros(0, dtype=torch.long, device=self.device)

    def inner_project_self(self) -> Diagonal:
        return self._new({"diag": self.diag.square()})

    def diagonal(self) -> Tensor:
        return self.diag

    def add_identity(self, alpha: float) -> Diagonal:
        return self._new({"diag": self.diag + alpha})

    def retract(self, M: Structure, retraction: str = "quadratic") -> Diagonal:
        """``k·h(m)`` entrywise: ``k(1 + m + ½m²)`` (quadratic) or ``k(1 + m)``."""
        if retraction not in ("quadratic", "first_order") or type(M) is not Diagonal or \
                self.diag.dtype not in (torch.float32, torch.float64):
            return super().retract(M, retraction)
        self._check_same(M, "M")
        m = M.diag
        h = 1 + m + 0.5 * m * m if retraction == "quadratic" else 1 + m
        return self._new({"diag": self.diag * h})

    def power_trace_tensor(self, terms: int) -> Tensor:
        """``Σ_i m_i^k`` for ``k = 1..terms`` (running products, as the compose loop)."""
        if terms <= 0:
            return self.diag.new_zeros(0)
        return self.diag.expand(terms, self.dim).cumprod(0).sum(-1)

    def gram_diagonal(self) -> Tensor:
        return self.diag.square()

    def abs_row_sums(self) -> Tensor:
        return self.diag.abs()

    def inf_norm(self) -> Tensor:
        return self.diag.abs().max()

    def logabsdet(self) -> Tensor:
        return self.diag.abs().log().sum()
