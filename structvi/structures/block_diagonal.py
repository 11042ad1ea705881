r"""Block-diagonal factor: independent dense blocks of size ``b`` along the diagonal.

.. math:: K = \begin{pmatrix} K_1 & & & \\ & \ddots & & \\ & & K_{n_b} & \\ & & & K_r
          \end{pmatrix}, \qquad
          \Sigma = K K^\top = \operatorname{blockdiag}(K_i K_i^\top),\
          S = K^{-\top} K^{-1} = \operatorname{blockdiag}(K_i^{-\top} K_i^{-1}),

with ``n_b = ⌊d/b⌋`` full ``b×b`` blocks ``K_i`` and a ragged last block ``K_r`` of size
``r = d mod b`` (absent when ``b`` divides ``d``). Both Σ and the precision S are block-diagonal:
the blocks of the parameter vector are independent under ``q``.

Coordinates ℳ = ⊕ Sym(b) ⊕ Sym(r), ``Π̂(Y)`` = the diagonal blocks of ``sym(Y)`` (MATH §2.4,
§3.5). Storage ``n_b b² + r² ≤ d b``; ``matmul`` O(d b n) as one batched matmul; never a ``d×d``
matrix except in :meth:`BlockDiagonal.to_dense`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from structvi.structures.base import (
    Structure,
    _check_dim,
    check_int_option,
    solve_small,
    sym,
)
from structvi.structures.registry import register


@register
class BlockDiagonal(Structure):
    """Block-diagonal factor (tensors ``blocks`` ``(n_b, b, b)`` and ``last`` ``(r, r)``).

    Args:
        dim: matrix size ``d``.
        tensors: ``{"blocks": (d // b, b, b), "last": (d % b, d % b)}``; ``last`` has shape
            ``(0, 0)`` when ``b`` divides ``d``.
        block_size: ``b``, an integer in ``[1, d]`` (``1`` is diagonal, ``d`` is dense).
    """

    name = "block_diagonal"

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> dict[str, Any]:
        _check_dim(dim)
        unknown = sorted(set(options) - {"block_size"})
        if unknown:
            raise TypeError(
                f"{cls.name}: unknown option(s) {unknown}; the only option is block_size"
            )
        if "block_size" not in options:
            raise TypeError(f"{cls.name}: option block_size is required (an integer in [1, dim])")
        b = check_int_option("block_size", options["block_size"], 1, dim, cls.name)
        return {"block_size": b}

    @classmethod
    def fit_options(cls, dim: int, **options: Any) -> dict[str, Any]:
        """``block_size = min(block_size, dim)``."""
        out = dict(options)
        b = out.get("block_size")
        if isinstance(b, int) and not isinstance(b, bool) and b > dim:
            out["block_size"] = dim
        return out

    @classmethod
    def shapes(cls, dim, *, block_size, **options):
        nb, r = divmod(dim, block_size)
        return {"blocks": (nb, block_size, block_size), "last": (r, r)}

    @classmethod
    def identity_tensors(cls, dim, *, dtype, device, block_size, **options):
        nb, r = divmod(dim, block_size)
        eye = torch.eye(block_size, dtype=dtype, device=device)
        return {
            "blocks": eye.expand(nb, block_size, block_size).clone(),
            "last": torch.eye(r, dtype=dtype, device=device),
        }

    @property
    def blocks(self) -> Tensor:
        return self._t["blocks"]

    @property
    def last(self) -> Tensor:
        return self._t["last"]

    @property
    def _split(self) -> int:
        """``m = n_b · b``: rows ``[:m]`` belong to full blocks, ``[m:]`` to the last block."""
        return self.blocks.shape[0] * self.options["block_size"]

    # ------------------------------------------------------------------ dense forms
    def to_dense(self) -> Tensor:
        nb, b, _ = self.blocks.shape
        m = self._split
        grid = self.blocks.new_zeros(nb, b, nb, b)
        grid.diagonal(dim1=0, dim2=2).copy_(self.blocks.permute(1, 2, 0))
        out = self.blocks.new_zeros(self.dim, self.dim)
        out[:m, :m] = grid.reshape(m, m)
        out[m:, m:] = self.last
        return out

    def _blocks_of(self, A: Tensor) -> tuple[Tensor, Tensor]:
        """The diagonal blocks of a ``d×d`` matrix: ``(n_b, b, b)`` and ``(r, r)``."""
        nb, b, _ = self.blocks.shape
        m = self._split
        full = A[:m, :m].reshape(nb, b, nb, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return full, A[m:, m:]

    def from_dense(self, A: Tensor) -> BlockDiagonal:
        full, last = self._blocks_of(A.to(self.dtype))
        return self._new({"blocks": full.contiguous(), "last": last.contiguous()})

    def project(self, Y: Tensor) -> BlockDiagonal:
        """``Π̂(Y)``: the diagonal blocks of ``sym(Y)``."""
        full, last = self._blocks_of(Y.to(self.dtype))
        return self._new({"blocks": sym(full), "last": sym(last)})

    # ------------------------------------------------------------------ products
    def _apply(self, x: Tensor, transpose: bool) -> Tensor:
        self._check_vec(x)
        nb, b, _ = self.blocks.shape
        m = self._split
        x2 = x.reshape(self.dim, -1)
        blocks, last = self.blocks, self.last
        if transpose:
            blocks, last = blocks.mT, last.mT
        top = torch.bmm(blocks, x2[:m].reshape(nb, b, -1)).reshape(m, -1)
        return torch.cat([top, last @ x2[m:]]).reshape(x.shape)

    def matmul(self, x: Tensor) -> Tensor:
        return self._apply(x, transpose=False)

    def rmatmul(self, x: Tensor) -> Tensor:
        return self._apply(x, transpose=True)

    def solve(self, x: Tensor) -> Tensor:
        """``K^{-1} x`` block by block: one batched LU solve of the ``(n_b, b, b)`` blocks and one
        of the ragged block, O(d b² + d b n), in float32 or wider (log-densities and diagnostics
        only; no update calls it)."""
        self._check_vec(x)
        nb, b, _ = self.blocks.shape
        m = self._split
        x2 = x.reshape(self.dim, -1)
        top = solve_small(self.blocks, x2[:m].reshape(nb, b, -1)).reshape(m, -1)
        out = torch.cat([top, solve_small(self.last, x2[m:])])
        return out.to(self.dtype).reshape(x.shape)

    def compose(self, other: Structure) -> BlockDiagonal:
        self._check_same(other)
        return self._new({
            "blocks": torch.bmm(self.blocks, other.blocks),
            "last": self.last @ other.last,
        })

    def project_outer(self, U: Tensor, V: Tensor | None = None) -> BlockDiagonal:
        """``Π̂(sym(U Vᵀ))``: the blocks ``sym(U_i V_iᵀ)`` of the row blocks, O(d b n)."""
        V = U if V is None else V
        self._check_vec(U, "U")
        self._check_vec(V, "V")
        nb, b, _ = self.blocks.shape
        m = self._split
        U, V = U.reshape(self.dim, -1), V.reshape(self.dim, -1)
        full = torch.bmm(U[:m].reshape(nb, b, -1), V[:m].reshape(nb, b, -1).mT)
        return self._new({"blocks": sym(full), "last": sym(U[m:] @ V[m:].T)})

    def inner_project_self(self) -> BlockDiagonal:
        """``Π̂(KᵀK)``: the blocks ``K_iᵀ K_i``."""
        return self._new({
            "blocks": sym(torch.bmm(self.blocks.mT, self.blocks)),
            "last": sym(self.last.T @ self.last),
        })

    # ------------------------------------------------------------------ reductions
    def diagonal(self) -> Tensor:
        full = self.blocks.diagonal(dim1=-2, dim2=-1).reshape(-1)
        return torch.cat([full, self.last.diagonal()])

    def gram_diagonal(self) -> Tensor:
        return torch.cat([self.blocks.square().sum(-1).reshape(-1), self.last.square().sum(-1)])

    def inf_norm(self) -> Tensor:
        rows = torch.cat([self.blocks.abs().sum(-1).reshape(-1), self.last.abs().sum(-1)])
        return rows.max()

    def logabsdet(self) -> Tensor:
        """``Σ_i log|det K_i|`` by a batched ``slogdet`` in float64.

        Monitoring and the entropy only (MATH §2.6): a decomposition, never called in an update.
        """
        total = torch.linalg.slogdet(self.blocks.double())[1].sum()
        if self.last.numel():
            total = total + torch.linalg.slogdet(self.last.double())[1]
        return total.to(self.dtype)
