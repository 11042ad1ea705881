r"""Lower-triangular Toeplitz factor, stored by its first column ``t`` (singd's ``triltoeplitz``).

.. math:: K = \begin{pmatrix} t_0 & & & \\ t_1 & t_0 & & \\ \vdots & \ddots & \ddots & \\
          t_{d-1} & \cdots & t_1 & t_0 \end{pmatrix}
          = \sum_{j=0}^{d-1} t_j N^j, \qquad \Sigma = K K^\top,\ S = K^{-\top} K^{-1},

with ``N`` the down-shift matrix: ``K`` is a polynomial in ``N``, so products and inverses of such
matrices stay lower-triangular Toeplitz (the group is commutative); ``K^{-1}`` is again one. Σ and
the precision S are dense and in general not Toeplitz, but built from ``d`` numbers: both have
displacement rank 1 (``Σ − N Σ Nᵀ = t tᵀ``, ``S − Nᵀ S N = r rᵀ`` with ``rᵀ`` the last row of
``K^{-1}``).

Coordinates ℳ = the same ``d``-dimensional space. ``Π̂(Y)`` (MATH §3.5): ``t_0`` = mean of
``diag(Y)``, ``t_j`` = 2 × mean of the ``j``-th subdiagonal of ``sym(Y)`` — the diagonals of
``Y + Yᵀ`` averaged.

Storage ``d``. ``K x`` is a causal convolution, computed tile by tile as ``≈ √d`` matrix products
(O(d² n) work, O(d √d + d n) memory, never a ``d×d`` matrix; ``conv1d`` was not used: on CPU its
float64 path builds an ``n d × d`` im2col buffer, and on CUDA it runs float32 in TF32). ``K₁ K₂`` is
the truncated polynomial product of the columns, ``K₁ t₂``. ``Π̂(U Vᵀ)`` needs only the lagged
cross-correlations of the rows of ``U`` and ``V`` (O(d² n), same tiling).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structvi.structures.base import Structure
from structvi.structures.registry import register


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half precisions, the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _tiling(d: int) -> tuple[int, int]:
    """Tile size ``c ≈ √d`` (at least 16, at most ``d``) and tile count ``p = ⌈d / c⌉``."""
    c = min(d, max(16, math.isqrt(d - 1) + 1))
    return c, -(-d // c)


def _to_tiles(X: Tensor, c: int, p: int) -> Tensor:
    """Rows of ``X`` ``(d, n)`` zero-padded to ``p c`` and laid out as ``(c, p n)``.

    Column block ``I`` (columns ``[I n, I n + n)``) holds rows ``[I c, I c + c)``.
    """
    d, n = X.shape
    Xp = torch.cat([X, X.new_zeros(p * c - d, n)])
    return Xp.reshape(p, c, n).transpose(0, 1).reshape(c, p * n)


def _from_tiles(Xc: Tensor, d: int, c: int, p: int) -> Tensor:
    """Inverse of :func:`_to_tiles`, cut back to ``d`` rows."""
    n = Xc.shape[1] // p
    return Xc.reshape(c, p, n).transpose(0, 1).reshape(p * c, n)[:d]


def _toeplitz_tiles(t: Tensor, c: int, p: int) -> Tensor:
    """The distinct ``c×c`` tiles of ``K``: ``T[k, a, b] = t[k c + a − b]`` (0 outside ``[0, d)``).

    ``K``'s tile ``(I, J)`` is ``T[I − J]`` for ``I ≥ J``. Shape ``(p, c, c)``, about ``d c``
    numbers.
    """
    ext = torch.cat([t.new_zeros(c), t, t.new_zeros(p * c - t.shape[0])])  # ext[c + l] = t_l
    return ext[1:].unfold(0, c, 1)[: p * c].reshape(p, c, c).flip(-1)


def _toeplitz_matmul(t: Tensor, X: Tensor, transpose: bool) -> Tensor:
    """``K X`` (or ``Kᵀ X``) for ``X`` ``(d, n)``, tile by tile: ``Y_I = Σ_k T_k X_{I−k}``.

    ``p ≈ √d`` matrix products of ``c×c`` tiles with ``c×(p − k) n`` slabs: O(d² n) work, O(d √d +
    d n) memory. Computed in float32 or wider and rounded once.
    """
    d, n = X.shape
    c, p = _tiling(d)
    acc = _acc(X.dtype)
    T = _toeplitz_tiles(t.to(acc), c, p)
    Xc = _to_tiles(X.to(acc), c, p)
    Yc = torch.zeros_like(Xc)
    for k in range(p):
        m = (p - k) * n
        if transpose:  # (Kᵀ X)_J = Σ_k T_kᵀ X_{J+k}
            Yc[:, :m] += T[k].T @ Xc[:, k * n :]
        else:  # (K X)_I = Σ_k T_k X_{I−k}
            Yc[:, k * n :] += T[k] @ Xc[:, :m]
    return _from_tiles(Yc, d, c, p).to(X.dtype)


def _tile_lag_sums(tiles: Tensor, d: int) -> Tensor:
    """``s_j = Σ_k Σ_{k c + a − b = j} tiles[k, a, b]`` for ``j = 0..d−1`` (``(p, c, c)``).

    Each tile's diagonal sums (offset ``o = a − b``) land at lag ``k c + o``: ``o ≥ 0`` in block
    ``k``, ``o < 0`` at position ``c + o`` of block ``k − 1`` (negative lags are dropped).
    """
    p, c, _ = tiles.shape
    Z = torch.cat([tiles, tiles.new_zeros(p, c, c)], dim=-1).reshape(p, -1)
    cols = torch.cat([Z, Z.new_zeros(p, c)], dim=-1).reshape(p, c, 2 * c + 1).sum(1)
    # cols[:, m]: offset −m (m < c); cols[:, 2c + 1 − j]: offset +j (0 < j < c); see
    # _diagonal_sums for the shift.
    s = torch.cat([cols[:, :1], cols[:, c + 2 :].flip(-1)], dim=-1)
    s[:-1, 1:] += cols[1:, 1:c].flip(-1)
    return s.reshape(-1)[:d]


def _lag_sums(U: Tensor, V: Tensor | None) -> Tensor:
    """``s_j = Σ_i U_{i+j}·V_i + Σ_i V_{i+j}·U_i``: the ``j``-th subdiagonal sum of ``U Vᵀ + V Uᵀ``.

    With rows in tiles of ``c``, ``F_k = Σ_I A_{I+k} B_Iᵀ`` (``A = [U V]``, ``B = [V U]``) holds
    every product at lags ``k c − c < j < k c + c``: ``p`` products of ``c×(p − k) 2n`` slabs,
    O(d² n) work and O(d √d + d n) memory, never a ``d×d`` matrix.
    """
    d, n = U.shape
    c, p = _tiling(d)
    acc = _acc(U.dtype)
    if V is None:
        A = B = U.to(acc)
    else:
        A, B = torch.cat([U, V], dim=1).to(acc), torch.cat([V, U], dim=1).to(acc)
    n2 = A.shape[1]
    Ac, Bc = _to_tiles(A, c, p), _to_tiles(B, c, p)
    tiles = torch.stack([Ac[:, k * n2 :] @ Bc[:, : (p - k) * n2].T for k in range(p)])
    s = _tile_lag_sums(tiles, d)
    return 2 * s if V is None else s


def _diagonal_sums(Y: Tensor) -> Tensor:
    """``s_j`` = sum of the ``j``-th sub- and superdiagonal of ``Y`` (``s_0 = 2 tr Y``).

    Padding each row of ``Y`` to length ``2d`` and re-reading the flat buffer with rows of length
    ``2d + 1`` shifts row ``i`` left by ``i``: column ``c < d`` then holds the superdiagonal ``c``
    and column ``2d + 1 − j`` the subdiagonal ``j`` (O(d²), vectorized).
    """
    d = Y.shape[0]
    Z = torch.cat([Y, Y.new_zeros(d, d)], dim=1).reshape(-1)
    cols = torch.cat([Z, Z.new_zeros(d)]).reshape(d, 2 * d + 1).sum(0)
    upper = cols[:d]
    lower = torch.cat([cols[:1], cols[d + 2 :].flip(0)])
    return upper + lower


@register
class TriangularToeplitz(Structure):
    """Lower-triangular Toeplitz factor ``K[i, j] = t[i − j]`` (tensor ``column`` ``(d,)``)."""

    name = "triangular_toeplitz"
    # Π̂ averages the diagonals, so the step is not a Newton step: with exact curvature on a
    # condition-1e4 Gaussian the linearized step has eigenvalues 1 − β λ with λ up to ≈ 2.4
    # (β = 1 oscillates: spectral radius 1.2–1.4, a limit cycle 0.1–0.2 nats above the optimum);
    # β = 0.5 is stable for λ < 4 (measured radius 0.78–0.84). See docs/vi_defaults.md.
    newton_step = False
    stable_step_size = 0.5

    def is_newton(self) -> bool:
        """A 1×1 Toeplitz factor is diagonal: its step is a Newton step."""
        return self.dim == 1

    def default_step_size(self) -> float:
        """0.5 (see above); 1 for ``dim = 1``, where Π̂ averages nothing."""
        return 1.0 if self.dim == 1 else float(self.stable_step_size)

    @classmethod
    def shapes(cls, dim, **options):
        return {"column": (dim,)}

    @classmethod
    def identity_tensors(cls, dim, *, dtype, device, **options):
        t = torch.zeros(dim, dtype=dtype, device=device)
        t[0] = 1
        return {"column": t}

    @property
    def column(self) -> Tensor:
        return self._t["column"]

    def _from_sums(self, s: Tensor) -> TriangularToeplitz:
        """``Π̂`` from the two-sided diagonal sums ``s`` of a symmetric matrix (MATH §3.5).

        ``t_0 = s_0 / (2d)`` (mean of the diagonal), ``t_j = s_j / (d − j)`` (twice the mean of
        the ``j``-th subdiagonal).
        """
        acc = _acc(s.dtype)  # d − j is not exact in bf16
        counts = torch.arange(self.dim, 0, -1, dtype=acc, device=s.device)
        counts[0] = 2 * self.dim
        return self._new({"column": (s.to(acc) / counts).to(self.dtype)})

    # ------------------------------------------------------------------ dense forms
    def to_dense(self) -> Tensor:
        i = torch.arange(self.dim, device=self.device)
        lag = i[:, None] - i[None, :]
        t = self.column
        return torch.where(lag >= 0, t[lag.clamp(min=0)], t.new_zeros(()))

    def from_dense(self, A: Tensor) -> TriangularToeplitz:
        return self._new({"column": A[:, 0].to(self.dtype).clone()})

    def project(self, Y: Tensor) -> TriangularToeplitz:
        """``Π̂(Y)``: the averaged diagonals of ``sym(Y)``, O(d²) for the ``d×d`` input."""
        return self._from_sums(_diagonal_sums(Y.to(self.dtype).to(_acc(self.dtype))))

    # ------------------------------------------------------------------ products
    def matmul(self, x: Tensor) -> Tensor:
        self._check_vec(x)
        return _toeplitz_matmul(self.column, x.reshape(self.dim, -1), False).reshape(x.shape)

    def rmatmul(self, x: Tensor) -> Tensor:
        self._check_vec(x)
        return _toeplitz_matmul(self.column, x.reshape(self.dim, -1), True).reshape(x.shape)

    def inverse(self) -> TriangularToeplitz:
        """``K⁻¹``, again lower-triangular Toeplitz: its column is the power series ``1/t(x)``.

        Newton's iteration ``u ← u (2 − t u)`` doubles the number of correct terms per step, so
        ``⌈log₂ d⌉ + 1`` steps of two structured products each (O(d² log d), no ``d×d``
        matrix, no decomposition), in float32 or wider. For log-densities and diagnostics.
        """
        acc = _acc(self.dtype)
        K = self.to(acc)
        e0 = torch.zeros(self.dim, dtype=acc, device=self.device)
        e0[0] = 1.0
        u = K._new({"column": e0 / K.column[0]})
        for _ in range(math.ceil(math.log2(self.dim)) + 1 if self.dim > 1 else 0):
            residual = K._new({"column": 2.0 * e0 - K.compose(u).column})
            u = u.compose(residual)
        return u.to(self.dtype)

    def solve(self, x: Tensor) -> Tensor:
        """``K^{-1} x = (K⁻¹) x`` with :meth:`inverse` (no ``d×d`` matrix), in float32 or wider."""
        self._check_vec(x)
        inv = self.to(_acc(self.dtype)).inverse()
        return inv.matmul(x.to(inv.dtype)).to(self.dtype)

    def compose(self, other: Structure) -> TriangularToeplitz:
        """``K₁ K₂``: its first column is ``K₁ t₂`` (the truncated product of the polynomials)."""
        self._check_same(other)
        return self._new({"column": self.matmul(other.column)})

    def project_outer(self, U: Tensor, V: Tensor | None = None) -> TriangularToeplitz:
        """``Π̂(sym(U Vᵀ))`` from the lagged row correlations of ``U`` and ``V``, O(d² n)."""
        self._check_vec(U, "U")
        if V is not None:
            self._check_vec(V, "V")
            V = V.reshape(self.dim, -1)
        return self._from_sums(_lag_sums(U.reshape(self.dim, -1), V))

    def inner_project_self(self) -> TriangularToeplitz:
        """``Π̂(KᵀK)`` in O(d²) time and O(d) memory.

        The ``j``-th subdiagonal of ``KᵀK`` sums to ``Σ_{m≥j} (d − m) t_m t_{m−j}``, i.e.
        ``(Kᵀ w)_j`` with ``w_m = (d − m) t_m``.
        """
        t = self.column.to(_acc(self.dtype))
        w = torch.arange(self.dim, 0, -1, dtype=t.dtype, device=t.device) * t
        return self._from_sums(2 * _toeplitz_matmul(t, w[:, None], True).reshape(self.dim))

    # ------------------------------------------------------------------ reductions
    def diagonal(self) -> Tensor:
        return self.column[:1].repeat(self.dim)

    def gram_diagonal(self) -> Tensor:
        """``diag(K Kᵀ)_i = Σ_{j≤i} t_j²``, a cumulative sum (accumulated in float32 or wider)."""
        return torch.cumsum(self.column.square(), 0, dtype=_acc(self.dtype)).to(self.dtype)

    def inf_norm(self) -> Tensor:
        """``‖K‖_∞ = Σ_j |t_j|`` (the last row holds every ``t_j``)."""
        return self.column.abs().sum()

    def logabsdet(self) -> Tensor:
        """``d · log|t_0|``."""
        return self.dim * self.column[0].abs().log()
