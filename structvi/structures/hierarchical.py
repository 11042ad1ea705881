r"""Hierarchical factor (singd's ``hierarchical{k1}_{k2}``): dense top rows, a diagonal middle,
dense bottom rows.

.. math:: K = \begin{pmatrix} A & B_m & B_e \\ 0 & \operatorname{diag}(c) & 0 \\ 0 & D & E
          \end{pmatrix},\qquad
          A:\ k_1\times k_1,\ B = (B_m\ B_e):\ k_1\times(d-k_1),\ c \in \mathbb{R}^{m},\
          D:\ k_2\times m,\ E:\ k_2\times k_2,

with ``m = d − k₁ − k₂``. Then, with :math:`C = \operatorname{diag}(c)`,

.. math:: \Sigma = K K^\top = \begin{pmatrix} AA^\top + BB^\top & B_m C & B_eE^\top + B_mD^\top
          \\ C B_m^\top & C^2 & C D^\top \\ E B_e^\top + D B_m^\top & D C & DD^\top + EE^\top
          \end{pmatrix},\qquad
          S = K^{-\top} K^{-1} = \operatorname{diag}(0_{k_1}, c^{-2}, 0_{k_2})
          + (\text{rank} \le k_1 + k_2),

since ``K⁻¹`` has the same pattern and ``S`` sums the outer products of its rows. ``k₂ = 0`` is
``low_rank_diagonal(rank=k₁)``; ``k₁ = k₂ = 0`` is ``diagonal``; ``k₁ + k₂ = d`` is a dense
``[[A, B], [0, E]]`` (MATH §2.4, §3.5).

Coordinates ℳ: the same pattern with ``A`` and ``E`` symmetric; ``Π̂(Y)`` keeps ``Y₁₁``, ``Y₃₃``
and ``diag Y_mid``, and doubles ``Y_{1,rest}`` and ``Y_{3,mid}`` (MATH §3.5). The group is closed
under products: with ``K₁ K₂`` written blockwise,
``A = A₁A₂``, ``B_m = A₁B_m₂ + B_m₁ diag(c₂) + B_e₁D₂``, ``B_e = A₁B_e₂ + B_e₁E₂``,
``c = c₁c₂``, ``D = D₁ diag(c₂) + E₁D₂``, ``E = E₁E₂``.

Storage ``k₁ d + m + k₂ m + k₂²`` (tensors ``A``, ``B``, ``c``, ``D``, ``E``; ``B`` holds
``(B_m B_e)`` as in singd); ``matmul``, ``rmatmul`` and ``project_outer`` cost
O((k₁ + k₂) d n), ``compose`` and ``inner_project_self`` O((k₁ + k₂)² d).
"""

from __future__ import annotations

from collections.abc import Callable
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
class Hierarchical(Structure):
    """Factor ``[[A, B_m, B_e], [0, diag c, 0], [0, D, E]]`` (options ``k1``, ``k2``).

    Args:
        dim: matrix size ``d``.
        tensors: ``A`` ``(k1, k1)``, ``B`` ``(k1, d − k1)``, ``c`` ``(m,)``, ``D`` ``(k2, m)``,
            ``E`` ``(k2, k2)`` with ``m = d − k1 − k2``; any of them may be empty.
        k1: size of the leading dense block, ``k1 >= 0``.
        k2: size of the trailing dense block, ``k2 >= 0`` and ``k1 + k2 <= d``.
    """

    name = "hierarchical"

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> dict[str, Any]:
        _check_dim(dim)
        unknown = sorted(set(options) - {"k1", "k2"})
        if unknown:
            raise TypeError(f"{cls.name} takes only the options 'k1' and 'k2', got {unknown}")
        missing = [key for key in ("k1", "k2") if key not in options]
        if missing:
            raise TypeError(
                f"{cls.name} requires the options k1 and k2 (integers >= 0 with "
                f"k1 + k2 <= dim), missing {missing}"
            )
        k1 = check_int_option("k1", options["k1"], 0, None, cls.name)
        k2 = check_int_option("k2", options["k2"], 0, None, cls.name)
        if k1 + k2 > dim:
            raise ValueError(
                f"{cls.name}: k1 + k2 must be <= dim, got k1={k1}, k2={k2} "
                f"(k1 + k2 = {k1 + k2}) for dim={dim}"
            )
        return {"k1": k1, "k2": k2}

    @classmethod
    def fit_options(cls, dim: int, **options: Any) -> dict[str, Any]:
        """singd's fill rule: ``dim ≤ k1`` → ``(dim, 0)``; ``k1 < dim < k1 + k2`` → ``(k1, dim − k1)``."""
        out = dict(options)
        k1, k2 = out.get("k1"), out.get("k2")
        ints = all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in (k1, k2))
        if ints and k1 + k2 > dim:
            out["k1"], out["k2"] = (dim, 0) if dim <= k1 else (k1, dim - k1)
        return out

    @classmethod
    def shapes(cls, dim, *, k1, k2, **options):
        m = dim - k1 - k2
        return {"A": (k1, k1), "B": (k1, dim - k1), "c": (m,), "D": (k2, m), "E": (k2, k2)}

    @classmethod
    def identity_tensors(cls, dim, *, dtype, device, k1, k2, **options):
        m = dim - k1 - k2
        return {
            "A": torch.eye(k1, dtype=dtype, device=device),
            "B": torch.zeros(k1, dim - k1, dtype=dtype, device=device),
            "c": torch.ones(m, dtype=dtype, device=device),
            "D": torch.zeros(k2, m, dtype=dtype, device=device),
            "E": torch.eye(k2, dtype=dtype, device=device),
        }

    @property
    def k1(self) -> int:
        return self.options["k1"]

    @property
    def k2(self) -> int:
        return self.options["k2"]

    @property
    def m(self) -> int:
        """Size of the diagonal middle block, ``d − k1 − k2``."""
        return self.dim - self.k1 - self.k2

    def _blocks(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(A, B_m, B_e, c, D, E)``; ``B_m``, ``B_e`` are column views of ``B``."""
        t, m = self._t, self.m
        return t["A"], t["B"][:, :m], t["B"][:, m:], t["c"], t["D"], t["E"]

    def _split(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Row blocks ``(X₁, X_mid, X₃)`` of a ``(d, n)`` matrix."""
        k1, m = self.k1, self.m
        return X[:k1], X[k1 : k1 + m], X[k1 + m :]

    def _make(self, A: Tensor, B: Tensor, c: Tensor, D: Tensor, E: Tensor) -> Hierarchical:
        parts = {"A": A, "B": B, "c": c, "D": D, "E": E}
        return self._new({key: t.to(self.dtype) for key, t in parts.items()})

    def _check_square(self, Y: Tensor, arg: str) -> None:
        if not isinstance(Y, Tensor) or tuple(Y.shape) != self.shape:
            shape = tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__
            raise ValueError(f"{arg} must have shape {self.shape}, got {shape}")

    # ------------------------------------------------------------------ dense forms
    def to_dense(self) -> Tensor:
        A, B, c, D, E = (self._t[key] for key in ("A", "B", "c", "D", "E"))
        k1, k2, m = self.k1, self.k2, self.m
        zeros = A.new_zeros
        mid = torch.cat([zeros(m, k1), torch.diag(c), zeros(m, k2)], dim=1)
        bottom = torch.cat([zeros(k2, k1), D, E], dim=1)
        return torch.cat([torch.cat([A, B], dim=1), mid, bottom])

    def from_dense(self, A: Tensor) -> Hierarchical:
        self._check_square(A, "A")
        k1, m = self.k1, self.m
        rows1, rows_mid, rows3 = self._split(A)
        return self._make(
            rows1[:, :k1].clone(), rows1[:, k1:].clone(),
            rows_mid[:, k1 : k1 + m].diagonal().clone(),
            rows3[:, k1 : k1 + m].clone(), rows3[:, k1 + m :].clone(),
        )

    def project(self, Y: Tensor) -> Hierarchical:
        # Π̂(sym Y): diagonal blocks kept, off-diagonal blocks of the pattern doubled (MATH §3.5).
        self._check_square(Y, "Y")
        k1, m = self.k1, self.m
        j3 = k1 + m
        return self._make(
            sym(Y[:k1, :k1]),
            Y[:k1, k1:] + Y[k1:, :k1].T,
            Y[k1:j3, k1:j3].diagonal().clone(),
            Y[j3:, k1:j3] + Y[k1:j3, j3:].T,
            sym(Y[j3:, j3:]),
        )

    # ------------------------------------------------------------------ products
    def matmul(self, x: Tensor) -> Tensor:
        """``K @ x = [A x₁ + B x_{2:3}; c ⊙ x_mid; D x_mid + E x₃]`` in O((k1 + k2) d n)."""
        self._check_vec(x)
        X = x.reshape(self.dim, -1)
        A, B, c, D, E = (self._t[key] for key in ("A", "B", "c", "D", "E"))
        X1, Xm, X3 = self._split(X)
        out = [A @ X1 + B @ X[self.k1 :], c[:, None] * Xm, D @ Xm + E @ X3]
        return torch.cat(out).reshape(x.shape)

    def rmatmul(self, x: Tensor) -> Tensor:
        """``Kᵀ @ x = [Aᵀ x₁; B_mᵀ x₁ + c ⊙ x_mid + Dᵀ x₃; B_eᵀ x₁ + Eᵀ x₃]``."""
        self._check_vec(x)
        X = x.reshape(self.dim, -1)
        A, Bm, Be, c, D, E = self._blocks()
        X1, Xm, X3 = self._split(X)
        out = [A.T @ X1, Bm.T @ X1 + c[:, None] * Xm + D.T @ X3, Be.T @ X1 + E.T @ X3]
        return torch.cat(out).reshape(x.shape)

    def solve(self, x: Tensor) -> Tensor:
        """``K^{-1} x`` by block substitution, O(k1³ + k2³ + (k1 + k2) d n), in float32 or wider:
        ``y_mid = x_mid / c``, ``y₃ = E^{-1}(x₃ − D y_mid)``, ``y₁ = A^{-1}(x₁ − B [y_mid; y₃])``
        (LU solves of the ``k1×k1`` and ``k2×k2`` blocks). For log-densities and diagnostics only;
        no update calls it."""
        self._check_vec(x)
        acc = solve_dtype(self.dtype)
        A, B, c, D, E = (self._t[key].to(acc) for key in ("A", "B", "c", "D", "E"))
        X1, Xm, X3 = self._split(x.reshape(self.dim, -1).to(acc))
        ym = Xm / c[:, None]
        y3 = solve_small(E, X3 - D @ ym)
        rest = torch.cat([ym, y3])
        y1 = solve_small(A, X1 - B @ rest)
        return torch.cat([y1, rest]).to(self.dtype).reshape(x.shape)

    def compose(self, other: Structure) -> Hierarchical:
        """``self @ other`` blockwise (module docstring), in O((k1 + k2)² d)."""
        self._check_same(other)
        A1, Bm1, Be1, c1, D1, E1 = self._blocks()
        A2, Bm2, Be2, c2, D2, E2 = other._blocks()
        Bm = A1 @ Bm2 + Bm1 * c2 + Be1 @ D2
        Be = A1 @ Be2 + Be1 @ E2
        return self._make(
            A1 @ A2, torch.cat([Bm, Be], dim=1), c1 * c2, D1 * c2 + E1 @ D2, E1 @ E2
        )

    # ------------------------------------------------------------------ projections
    def project_outer(self, U: Tensor, V: Tensor | None = None) -> Hierarchical:
        """``Π̂(½(U Vᵀ + V Uᵀ))`` from the ``k1 + k2`` dense rows and the diagonal."""
        V = U if V is None else V
        self._check_vec(U, "U")
        self._check_vec(V, "V")
        U, V, k1 = U.reshape(self.dim, -1), V.reshape(self.dim, -1), self.k1
        U1, Um, U3 = self._split(U)
        V1, Vm, V3 = self._split(V)
        return self._make(
            sym(U1 @ V1.T),
            U1 @ V[k1:].T + V1 @ U[k1:].T,
            (Um * Vm).sum(-1),
            U3 @ Vm.T + V3 @ Um.T,
            sym(U3 @ V3.T),
        )

    def gram_rows(self) -> Tensor:
        """``K Kᵀ`` is diagonal outside the first ``k1`` and the last ``k2`` rows and columns."""
        k1, k2 = self.options["k1"], self.options["k2"]
        return torch.cat([torch.arange(k1, device=self.device),
                          torch.arange(self.dim - k2, self.dim, device=self.device)])

    def inner_project_self(self) -> Hierarchical:
        """``Π̂(Kᵀ K)`` from the column blocks ``[A; 0; 0]``, ``[B_m; diag c; D]``,
        ``[B_e; 0; E]``, in O((k1 + k2)² d)."""
        A, Bm, Be, c, D, E = self._blocks()
        B = self._t["B"]
        return self._make(
            sym(A.T @ A),
            2 * (A.T @ B),
            Bm.square().sum(0) + c.square() + D.square().sum(0),
            2 * (Be.T @ Bm + E.T @ D),
            sym(Be.T @ Be + E.T @ E),
        )

    # ------------------------------------------------------------------ reductions
    def _row_reduce(self, f: Callable[[Tensor], Tensor]) -> Tensor:
        """``f`` applied entrywise and summed over each row of ``K``, shape ``(d,)``."""
        A, B, c, D, E = (self._t[key] for key in ("A", "B", "c", "D", "E"))
        top = f(A).sum(-1) + f(B).sum(-1)
        return torch.cat([top, f(c), f(D).sum(-1) + f(E).sum(-1)])

    def diagonal(self) -> Tensor:
        return torch.cat([self._t["A"].diagonal(), self._t["c"], self._t["E"].diagonal()])

    def gram_diagonal(self) -> Tensor:
        return self._row_reduce(torch.square)

    def inf_norm(self) -> Tensor:
        return self._row_reduce(torch.abs).max()

    def logabsdet(self) -> Tensor:
        """``log|det A| + Σ log|c| + log|det E|`` (block triangular after a permutation).

        The ``slogdet`` of the small blocks is for monitoring and the entropy only; no update
        calls it.
        """
        A, c, E = (self._t[key].double() for key in ("A", "c", "E"))
        logdet = torch.linalg.slogdet(A)[1] + c.abs().log().sum() + torch.linalg.slogdet(E)[1]
        return logdet.to(self.dtype)
