"""The :class:`Structure` interface: a structured ``d×d`` matrix stored compactly.

A structure instance is either a **group element** (the covariance-side factor ``K`` with
``Σ = K Kᵀ``, DESIGN.md decision 1) or a **coordinate element** ``M`` of the local coordinate
space ℳ (the natural gradient ``Π̂(·)`` and the momentum ``m_K`` of MATH §1.4–1.5). Both share
the same storage pattern for every structure except ``kronecker`` (see its module).

Operations return new objects; nothing mutates in place. Each op has a dense fallback here that
emits :class:`NaiveFallbackWarning`; concrete structures override them with work proportional to
their storage, never a hidden ``d×d`` matrix.

Conventions for vectors: ``x`` has shape ``(d,)`` or ``(d, n)`` (``n`` column vectors), so
``K.matmul(x)`` is ``K @ x`` and ``K.rmatmul(x)`` is ``Kᵀ @ x``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from structvi.structures._util import (  # noqa: F401 -- re-exported (their first home)
    LOG_2PI_E, _check_dim, _copy_plain, check_int_option, solve_dtype, solve_small, sym,
)
from structvi.structures.retraction import apply_retraction

__all__ = ["NaiveFallbackWarning", "Structure"]


class NaiveFallbackWarning(UserWarning):
    """An operation fell back to a dense ``d×d`` computation (specialize it)."""


class Structure:
    """A structured square matrix: compact tensors plus a JSON-able spec.

    Subclasses set :attr:`name`, implement :meth:`shapes`, :meth:`identity_tensors`,
    :meth:`to_dense`, :meth:`from_dense` and :meth:`project`, and override the dense fallbacks
    (:meth:`matmul`, :meth:`rmatmul`, :meth:`compose`, :meth:`project_outer`, ...).

    Args:
        dim: matrix size ``d``.
        tensors: the storage, ``{name: tensor}`` with the shapes of :meth:`shapes`.
        **options: integer options of the structure (e.g. ``block_size``).
    """

    name: ClassVar[str] = ""
    #: Whether a factor step with exact curvature and step size 1 is a Newton step (the
    #: linearized VI fixed-point map has spectral radius ``1 − β``): true when ``Π̂`` is the
    #: metric projection of the structure's own pattern. Structures whose coordinates average
    #: over a pattern (Toeplitz diagonals, Kronecker partial traces) set it to ``False``.
    newton_step: ClassVar[bool] = True
    #: The factor step size the default VI schedules use (:meth:`default_step_size`): 1 for
    #: Newton structures, a smaller measured-stable value for the others.
    stable_step_size: ClassVar[float] = 1.0

    def __init__(self, dim: int, tensors: Mapping[str, Tensor], **options: Any) -> None:
        self.options = self.check_options(dim, **options)
        self.dim = int(dim)
        expected = self.shapes(self.dim, **self.options)
        if set(tensors) != set(expected):
            raise ValueError(
                f"{self.name}: tensors must have keys {sorted(expected)}, got {sorted(tensors)}"
            )
        first = next(iter(tensors.values()))
        for key, shape in expected.items():
            t = tensors[key]
            if not isinstance(t, Tensor):
                raise TypeError(f"{self.name}: tensor {key!r} must be a torch.Tensor, got {type(t)}")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"{self.name}(dim={dim}, {self.options}): tensor {key!r} must have shape "
                    f"{tuple(shape)}, got {tuple(t.shape)}"
                )
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"{self.name}: all tensors must share dtype and device; {key!r} is "
                    f"{t.dtype}/{t.device}, expected {first.dtype}/{first.device}"
                )
        self._t = {k: tensors[k] for k in expected}
        self._setup()

    def _setup(self) -> None:
        """Derive further attributes from ``dim``, ``options`` and ``_t`` (both constructors call
        it; e.g. a composite structure's parts)."""

    @classmethod
    def _trusted(cls, dim: int, tensors: Mapping[str, Tensor], options: dict[str, Any]) -> Structure:
        """Internal constructor that skips the checks of ``__init__``.

        For results of operations on validated instances only: ``options`` must be normalized
        (an existing instance's ``options``, shared, never mutated) and ``tensors`` have the keys
        and shapes of :meth:`shapes`. Every op returns a new object, so this is the hot path of a
        step (the checks cost more than the small tensor ops they guard).
        """
        obj = cls.__new__(cls)
        obj.options = options
        obj.dim = dim
        obj._t = dict(tensors)
        obj._setup()
        return obj

    # ------------------------------------------------------------------ spec and storage
    @classmethod
    def check_options(cls, dim: int, **options: Any) -> dict[str, Any]:
        """Validate ``dim`` and the options; return the normalized options."""
        if options:
            raise TypeError(f"{cls.name} takes no options, got {sorted(options)}")
        _check_dim(dim)
        return {}

    @classmethod
    def fit_options(cls, dim: int, **options: Any) -> dict[str, Any]:
        """Options shrunk to fit a ``dim×dim`` matrix (e.g. ``block_size = min(block_size, dim)``).

        Used where one structure spec serves matrices of many sizes (the optimizer's layers).
        The default returns the options unchanged; :meth:`check_options` still validates them.
        """
        return dict(options)

    @classmethod
    def shapes(cls, dim: int, **options: Any) -> dict[str, tuple[int, ...]]:
        """Shapes of the stored tensors for this ``dim`` and options."""
        raise NotImplementedError

    @classmethod
    def identity_tensors(
        cls, dim: int, *, dtype: torch.dtype, device: torch.device | str | None, **options: Any
    ) -> dict[str, Tensor]:
        """Storage of the identity matrix."""
        raise NotImplementedError

    @classmethod
    def identity(cls, dim: int, *, dtype=torch.float32, device=None, **options: Any) -> Structure:
        """The identity matrix in this structure."""
        opts = cls.check_options(dim, **options)
        return cls(dim, cls.identity_tensors(dim, dtype=dtype, device=device, **opts), **opts)

    @classmethod
    def zeros(cls, dim: int, *, dtype=torch.float32, device=None, **options: Any) -> Structure:
        """The zero matrix in this structure (a coordinate element)."""
        opts = cls.check_options(dim, **options)
        shapes = cls.shapes(dim, **opts)
        return cls(dim, {k: torch.zeros(s, dtype=dtype, device=device) for k, s in shapes.items()},
                   **opts)

    def spec(self) -> dict[str, Any]:
        """JSON-able description: ``{"name", "dim", "options"}`` (a copy: instances made by an
        operation share their ``options``)."""
        return {"name": self.name, "dim": self.dim, "options": _copy_plain(self.options)}

    def same_spec(self, other: Any) -> bool:
        """Whether ``other`` is a structure with this :meth:`spec` (without copying specs)."""
        return (isinstance(other, Structure) and other.name == self.name
                and other.dim == self.dim
                and (other.options is self.options or other.options == self.options))

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors, ``{name: tensor}`` (shared, not copied)."""
        return dict(self._t)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], spec: Mapping[str, Any]) -> Structure:
        """Rebuild from :meth:`tensors` and :meth:`spec` (e.g. after ``torch.load``)."""
        if spec.get("name") != cls.name:
            raise ValueError(f"spec names structure {spec.get('name')!r}, expected {cls.name!r}")
        return cls(spec["dim"], tensors, **spec.get("options", {}))

    def _new(self, tensors: Mapping[str, Tensor]) -> Structure:
        """Same structure and options, new storage (the same keys and shapes)."""
        return type(self)._trusted(self.dim, tensors, self.options)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._t.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._t.values())).device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def num_params(self) -> int:
        """Number of stored numbers."""
        return sum(t.numel() for t in self._t.values())

    def to(self, dtype: torch.dtype | None = None, device=None) -> Structure:
        """A copy in another dtype and/or on another device (``self`` when both are unchanged:
        structures are immutable, and ``Tensor.to`` shares unchanged tensors anyway)."""
        if self._same_place(dtype, device):
            return self
        return self._new({k: t.to(dtype=dtype, device=device) for k, t in self._t.items()})

    def _same_place(self, dtype: torch.dtype | None, device: Any) -> bool:
        return (dtype is None or dtype == self.dtype) and (
            device is None or torch.device(device) == self.device)

    def identity_like(self) -> Structure:
        return self._new(self.identity_tensors(self.dim, dtype=self.dtype, device=self.device,
                                               **self.options))

    def zeros_like(self) -> Structure:
        return self._new({k: torch.zeros_like(t) for k, t in self._t.items()})

    def coord_identity(self) -> Structure:
        """``Π̂(I)``, the coordinate element of the identity matrix (MATH §1.4)."""
        return self.identity_like()

    def default_step_size(self) -> float:
        """Factor step size of the default VI configuration (``stable_step_size``; see
        :func:`structvi.schedules.default_config`)."""
        return float(self.stable_step_size)

    def is_newton(self) -> bool:
        """Whether step size 1 with exact curvature is a Newton step (``newton_step``)."""
        return bool(self.newton_step)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{type(self).__name__}(dim={self.dim}{opts}, dtype={self.dtype})"

    # ------------------------------------------------------------------ linear-space ops
    def _check_same(self, other: Structure, arg: str = "other") -> None:
        if type(other) is type(self) and other.options is self.options and other.dim == self.dim:
            a, b = next(iter(self._t.values())), next(iter(other._t.values()))
            if a.dtype == b.dtype and a.device == b.device:
                return
        if not self.same_spec(other):
            got = other.spec() if isinstance(other, Structure) else type(other).__name__
            raise ValueError(f"{arg} must be a structure with spec {self.spec()}, got {got}")
        if other.dtype != self.dtype or other.device != self.device:
            raise ValueError(
                f"{arg} has dtype={other.dtype}, device={other.device}; expected "
                f"dtype={self.dtype}, device={self.device} (convert with .to())"
            )

    def add(self, other: Structure, alpha: float = 1.0) -> Structure:
        """``self + alpha * other`` (same structure)."""
        self._check_same(other)
        if isinstance(alpha, (int, float)) and alpha == 1.0:  # = t + 1.0·o, one kernel fewer
            return self._new({k: t + other._t[k] for k, t in self._t.items()})
        return self._new({k: t + alpha * other._t[k] for k, t in self._t.items()})

    def add_identity(self, alpha: float) -> Structure:
        """``self + alpha·Π̂(I)`` (a coordinate element plus a multiple of the coordinate
        identity; structures override it without building ``Π̂(I)``)."""
        return self.add(self.coord_identity(), alpha=alpha)

    def scale(self, c: float | Tensor) -> Structure:
        """``c * self``."""
        return self._new({k: t * c for k, t in self._t.items()})

    def _memo(self, key: str, compute) -> Any:
        """``compute()``, kept on this (immutable) instance while its tensors are unmodified
        (their version counters unchanged): e.g. the engine's and the step rule's ``‖m‖_∞`` of
        the same momentum."""
        versions = tuple(t._version for t in self._t.values())
        memo = self.__dict__.setdefault("_memo_values", {})
        hit = memo.get(key)
        if hit is not None and hit[0] == versions:
            return hit[1]
        value = compute()
        memo[key] = (versions, value)
        return value

    def max_abs(self) -> Tensor:
        """Largest absolute stored entry (SINGD's ``normalize_lr_cov`` norm)."""
        return torch.stack([t.abs().max() for t in self._t.values() if t.numel()]).max()

    def trace(self) -> Tensor:
        """``tr(self)``."""
        return self.diagonal().sum()

    def power_traces(self, terms: int) -> list[float]:
        """``[tr(M), tr(M²), …, tr(M^terms)]`` (the series of ``log|det h(M)|``); one host
        transfer of :meth:`power_trace_tensor`."""
        return self.power_trace_tensor(terms).tolist()

    def power_trace_tensor(self, terms: int) -> Tensor:
        """``tr(M^k)`` for ``k = 1..terms`` as a tensor of shape ``(terms,)``, with
        ``M^(k+1) = M^k.compose(M)``. Structures override it without the per-power structure
        objects (dense: half the products, ``tr(M^(h+j)) = Σ (M^h)ᵀ ∘ M^j``)."""
        out, P = [], self
        for k in range(terms):
            out.append(P.trace())
            if k + 1 < terms:
                P = P.compose(self)
        return torch.stack(out) if out else torch.zeros(0, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ dense forms
    def to_dense(self) -> Tensor:
        """The ``d×d`` matrix."""
        raise NotImplementedError

    def from_dense(self, A: Tensor) -> Structure:
        """The structure holding ``A``'s entries on this pattern (``A`` assumed in the pattern)."""
        raise NotImplementedError

    def project(self, Y: Tensor) -> Structure:
        """``Π̂(Y)`` for a symmetric ``d×d`` matrix ``Y`` (MATH §1.4, §3.5): a coordinate element."""
        raise NotImplementedError

    # ------------------------------------------------------------------ dense fallbacks
    def _warn(self, op: str) -> None:
        warnings.warn(
            f"{type(self).__name__}.{op} uses a dense d×d fallback; specialize it",
            NaiveFallbackWarning,
            stacklevel=3,
        )

    def _check_vec(self, x: Tensor, arg: str = "x") -> None:
        t = next(iter(self._t.values()))
        if isinstance(x, Tensor) and x.dim() in (1, 2) and x.shape[0] == self.dim and (
                x.dtype == t.dtype and x.device == t.device):
            return
        if not isinstance(x, Tensor) or x.dim() not in (1, 2) or x.shape[0] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{arg} must have shape ({self.dim},) or ({self.dim}, n), got {shape}")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(
                f"{arg} has dtype={x.dtype}, device={x.device}; expected dtype={self.dtype}, "
                f"device={self.device} like the structure"
            )

    def matmul(self, x: Tensor) -> Tensor:
        """``K @ x`` for ``x`` of shape ``(d,)`` or ``(d, n)``."""
        self._warn("matmul")
        self._check_vec(x)
        return self.to_dense() @ x

    def rmatmul(self, x: Tensor) -> Tensor:
        """``Kᵀ @ x`` for ``x`` of shape ``(d,)`` or ``(d, n)``."""
        self._warn("rmatmul")
        self._check_vec(x)
        return self.to_dense().T @ x

    def matmul_rows(self, X: Tensor) -> Tensor:
        """``X Kᵀ`` for ``X`` of shape ``(n, d)``: ``K`` applied to every row (``(K Xᵀ)ᵀ``;
        structures may skip the transposes)."""
        if not isinstance(X, Tensor) or X.dim() != 2 or X.shape[1] != self.dim:
            shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(f"X must have shape (n, {self.dim}), got {shape}")
        return self.matmul(X.T).T

    def apply_along(self, X: Tensor, axis: int, transpose: bool = False) -> Tensor:
        """``K`` (``Kᵀ`` if ``transpose``) applied along axis 0 or 1 of a 3-D ``X`` whose size
        on that axis is ``d`` (a Kronecker factor's product; structures may skip the copies of
        this generic unfolding)."""
        op = self.rmatmul if transpose else self.matmul
        if axis == 0:
            return op(X.reshape(X.shape[0], -1)).reshape(X.shape)
        d1, d2, n = X.shape
        return op(X.transpose(0, 1).reshape(d2, -1)).reshape(d2, d1, n).transpose(0, 1)

    def solve(self, x: Tensor) -> Tensor:
        """``K^{-1} @ x`` for ``x`` of shape ``(d,)`` or ``(d, n)``, in the structure's dtype.

        For log-densities, the KL divergence and diagnostics only: no update calls it (updates
        are inverse-free, DESIGN.md decision 2). This fallback builds the dense ``d×d`` matrix and
        solves it by LU in float32 or wider, rounding the result once.

        Args:
            x: right-hand sides, shape ``(d,)`` or ``(d, n)``, same dtype and device as ``K``.

        Returns:
            ``K^{-1} x``, same shape and dtype as ``x``.
        """
        self._warn("solve")
        self._check_vec(x)
        acc = solve_dtype(self.dtype)
        return torch.linalg.solve(self.to_dense().to(acc), x.to(acc)).to(self.dtype)

    def compose(self, other: Structure) -> Structure:
        """``self @ other``, closed in the structure's group (MATH §2.4 note (i))."""
        self._warn("compose")
        self._check_same(other)
        return self.from_dense(self.to_dense() @ other.to_dense())

    def project_outer(self, U: Tensor, V: Tensor | None = None) -> Structure:
        """``Π̂(½(U Vᵀ + V Uᵀ))`` for ``U, V`` of shape ``(d, n)`` (``V = U`` if omitted)."""
        self._warn("project_outer")
        V = U if V is None else V
        self._check_vec(U, "U")
        self._check_vec(V, "V")
        outer = U.reshape(self.dim, -1) @ V.reshape(self.dim, -1).T
        return self.project(0.5 * (outer + outer.T))

    def inner_project(self, X: Tensor) -> Structure:
        """``Π̂(Kᵀ X Xᵀ K)`` without forming a ``d×d`` matrix (``X``: ``(d,)`` or ``(d, n)``)."""
        return self.project_outer(self.rmatmul(X).reshape(self.dim, -1))

    def gram_rows(self) -> Tensor | None:
        """Indices ``J`` such that ``K Kᵀ`` is diagonal outside the rows and columns ``J``.

        Lets a caller keep ``K Kᵀ`` as a diagonal plus ``|J|`` dense rows (``d + |J|·d``
        numbers); ``None`` when the structure has no such sparse Gram form (the default).
        """
        return None

    def inner_project_self(self) -> Structure:
        """``Π̂(Kᵀ K)`` (singd's ``from_inner()``), without a ``d×d`` matrix."""
        self._warn("inner_project_self")
        Kd = self.to_dense()
        return self.project(Kd.T @ Kd)

    def diagonal(self) -> Tensor:
        """``diag(K)``, shape ``(d,)``."""
        self._warn("diagonal")
        return self.to_dense().diagonal()

    def gram_diagonal(self) -> Tensor:
        """``diag(K Kᵀ)`` (the marginal variances when ``Σ = K Kᵀ``), shape ``(d,)``."""
        self._warn("gram_diagonal")
        return self.to_dense().square().sum(-1)

    def abs_row_sums(self) -> Tensor:
        """Row sums of ``|K|`` (shape ``(dim,)``): ``|K|`` as the same structure with
        ``|tensors|``. Exact for structures that store every entry of their matrix at its own
        position (dense, diagonal, triangular, block families); for a sum of products such as
        ``D + U Vᵀ`` an upper bound (triangle inequality), so norms built on it stay safe."""
        absf = self._new({k: t.abs() for k, t in self._t.items()})
        return absf.matmul(torch.ones(self.dim, dtype=self.dtype, device=self.device))

    def inf_norm(self) -> Tensor:
        """``‖K‖_∞``, the largest absolute row sum (the trust-region norm, MATH §2.6)."""
        self._warn("inf_norm")
        return self.to_dense().abs().sum(-1).max()

    def logabsdet(self) -> Tensor:
        """``log|det K|``; used for the entropy and monitoring, never inside an update."""
        self._warn("logabsdet")
        return torch.linalg.slogdet(self.to_dense().double())[1].to(self.dtype)

    def retract(self, M: Structure, retraction: str = "quadratic") -> Structure:
        """``K h(M)`` for a coordinate element ``M`` (MATH §1.2); see
        :mod:`structvi.structures.retraction`."""
        return self.compose(apply_retraction(M, retraction))
