r"""Kronecker factor for matrix-shaped variables: ``K = K₁ ⊗ K₂``, each factor any structure.

For ``z ∈ R^{d₁×d₂}`` flattened **row-major** (``z.reshape(-1)``, ``d = d₁d₂``) and
``X = x.reshape(d₁, d₂)``:

.. math:: K = K_1 \otimes K_2,\qquad K x = \operatorname{vec_{row}}(K_1 X K_2^\top),\qquad
          \Sigma = K K^\top = (K_1K_1^\top) \otimes (K_2K_2^\top),\
          S = (K_1^{-\top}K_1^{-1}) \otimes (K_2^{-\top}K_2^{-1})

(``torch.kron`` order; ``K₁`` acts on the rows of ``X``, ``K₂`` on its columns). ``K₁``, ``K₂``
are instances of any other registered structure (``factors=("dense", ("block_diagonal",
{"block_size": 2}))``), so Σ is the Kronecker product of the two factors' covariances (MATH
§2.4, §3.2: the KFAC/INGD preconditioner ``KKᵀ ⊗ CCᵀ``).

Unlike the other structures, group and coordinate elements are stored differently, so one
instance has a ``kind``:

* ``"product"`` — a group element ``K₁ ⊗ K₂`` (:meth:`~Kronecker.identity`, a factor);
* ``"sum"`` — a coordinate element ``M₁ ⊗ I + I ⊗ M₂`` (:meth:`~Kronecker.zeros`,
  :meth:`~Kronecker.project`, momenta). ``add`` needs two sums, ``compose`` two products.

**Retraction, factor-wise** (:meth:`Kronecker.retract`): ``K h(M) := (K₁ h(M₁)) ⊗ (K₂ h(M₂))``.
For ``h = exp`` this is exact, ``exp(M₁ ⊗ I + I ⊗ M₂) = exp(M₁) ⊗ exp(M₂)``; for the truncated
retractions it is the INGD convention (each factor updated on its own, MATH §3.2).

**Projection by partial traces, with the scale gauge fixed** (MATH §2.6, §3.2). The coordinates
``M₁ ⊗ I + I ⊗ M₂`` are redundant along ``(cI) ⊗ I − I ⊗ (cI) = 0`` (the gauge ``K₁ → cK₁,
K₂ → K₂/c``). structvi fixes it by keeping the common scale in the first factor: ``tr M₂ = 0``.
On that subspace the metric (1.3), ``2[d₂‖M₁‖² + d₁‖M₂‖² + 2 tr M₁ tr M₂]`` for symmetric parts,
is block-diagonal *exactly* (the coupling term vanishes), so the natural gradient is, for a
symmetric ``Y`` seen as ``Y[i, j, i', j']`` with ``tr₂(Y)[i, i'] = Σ_j Y[i, j, i', j]``:

.. math:: \hat\Pi(Y) = \hat\Pi_1(\mathrm{tr}_2 Y / d_2) \otimes I
          + I \otimes \big(P_2 - \bar{\mathrm{tr}}(P_2)\, I\big),\qquad
          P_2 = \hat\Pi_2(\mathrm{tr}_1 Y / d_1),

and ``Π̂(I) = I ⊗ I + I ⊗ 0``. For ``Ē = A ⊗ G`` the engine's ``ν = ½(Π̂(KᵀĒK) − τΠ̂(I))`` is
``ν₁ = ½[tr̄(K₂ᵀGK₂)·Π̂₁(K₁ᵀAK₁) − τI]`` (INGD's) and ``ν₂`` its traceless counterpart. INGD's
convention (subtract ``τI`` in both factors, i.e. no gauge fixing) counts the scale twice: near
the fixed point its scale error is multiplied by ``1 − 2β`` per step, so ``β = 1`` stalls; with
the gauge fixed ``β = 1`` is the Newton-like step of the other structures. The optimizer
(:mod:`structvi.optim`) keeps INGD's convention with its own factors; this class is for VI.

Storage: the two factors' storage (tensors ``"0.<key>"``, ``"1.<key>"``). ``matmul`` costs the
factors' ``matmul`` on ``(d₁, d₂n)`` and ``(d₂, d₁n)``; ``project_outer`` the factors'
``project_outer``; no ``d×d`` matrix except in :meth:`Kronecker.to_dense` and in the argument
of :meth:`Kronecker.project`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from structvi.structures.base import Structure, _check_dim, check_int_option
from structvi.structures.registry import get_structure_class, register

__all__ = ["KINDS", "Kronecker"]

KINDS = ("product", "sum")
_KIND_TEXT = {"product": "group element K₁ ⊗ K₂", "sum": "coordinate element M₁ ⊗ I + I ⊗ M₂"}


def _normalize_factor(i: int, spec: Any, dim: int) -> dict[str, Any]:
    """A factor spec (name, ``(name, options)`` or ``{"name", "options"}``) in normal form."""
    if isinstance(spec, str):
        name, opts = spec, {}
    elif isinstance(spec, Mapping) and set(spec) <= {"name", "options"}:
        name, opts = spec.get("name"), spec.get("options", {})
    elif isinstance(spec, Sequence) and len(spec) == 2 and isinstance(spec[1], Mapping):
        name, opts = spec
    else:
        raise ValueError(
            f"kronecker: factors[{i}] must be a structure name or (name, {{options}}), "
            f"got {spec!r}"
        )
    if name == "kronecker":
        raise ValueError(f"kronecker: factors[{i}] cannot be 'kronecker' (no nested Kronecker "
                         "products); use one of the other structures")
    try:
        cls = get_structure_class(name)
        opts = cls.check_options(dim, **opts)
    except (TypeError, ValueError) as err:
        raise type(err)(f"kronecker: factors[{i}] (dim {dim}): {err}") from err
    return {"name": name, "options": dict(opts)}


def _factor_spec(f: Structure) -> dict[str, Any]:
    return {"name": f.name, "options": dict(f.options)}


def _along(op: Callable[[Tensor], Tensor], X: Tensor, axis: int) -> Tensor:
    """Apply a ``d_axis × d_axis`` operator to axis 0 or 1 of ``X`` of shape ``(d₁, d₂, n)``."""
    if axis == 0:
        return op(X.reshape(X.shape[0], -1)).reshape(X.shape)
    d1, d2, n = X.shape
    return op(X.transpose(0, 1).reshape(d2, -1)).reshape(d2, d1, n).transpose(0, 1)


def _unfold(U: Tensor, dims: tuple[int, int], axis: int) -> Tensor:
    """``U`` (``(d,)`` or ``(d, n)``) as the ``(d_axis, rest)`` matrix whose rows index ``axis``."""
    d1, d2 = dims
    U3 = U.reshape(d1, d2, -1)
    return U3.reshape(d1, -1) if axis == 0 else U3.transpose(0, 1).reshape(d2, -1)


@register
class Kronecker(Structure):
    """``K₁ ⊗ K₂`` (kind ``"product"``) or ``M₁ ⊗ I + I ⊗ M₂`` (kind ``"sum"``).

    Args:
        dim: matrix size ``d = d₁ d₂``.
        tensors: the factors' tensors, keys ``"0.<key>"`` (first factor) and ``"1.<key>"``.
        dims: ``(d₁, d₂)``, the shape of the matrix-shaped variable (row-major flattening).
        factors: two factor specs, each a structure name or ``(name, {options})``, e.g.
            ``("dense", ("block_diagonal", {"block_size": 2}))``; default two dense factors.
        kind: ``"product"`` (group element) or ``"sum"`` (coordinate element).

    Build one with ``make_structure("kronecker", 12, dims=(3, 4), factors=...)`` or from two
    structures with :meth:`from_factors`.
    """

    name = "kronecker"
    # Partial traces average: exact Newton only for a Kronecker-structured target. On a
    # condition-1e4 Gaussian the linearized step has eigenvalues 1 − β λ, λ ∈ [0.2, 1.8]:
    # linear convergence (radius 0.6–0.8 at β = 1, unstable above β ≈ 1.1); β = 0.9 keeps a
    # margin (stable for λ < 2.2) at a small cost in rate. See docs/vi_defaults.md.
    newton_step = False
    stable_step_size = 0.9

    def _setup(self) -> None:
        # the constructor has checked options, keys, shapes and a shared dtype/device
        factors = []
        for i, (d, spec) in enumerate(zip(self.options["dims"], self.options["factors"])):
            own = {k.split(".", 1)[1]: t for k, t in self._t.items() if k.startswith(f"{i}.")}
            factors.append(get_structure_class(spec["name"])._trusted(d, own, spec["options"]))
        self.factors: tuple[Structure, Structure] = (factors[0], factors[1])

    # ------------------------------------------------------------------ spec and storage
    @classmethod
    def check_options(
        cls, dim: int, *, dims: Any = None, factors: Any = ("dense", "dense"),
        kind: str = "product", **unknown: Any,
    ) -> dict[str, Any]:
        _check_dim(dim)
        if unknown:
            raise TypeError(f"kronecker: unknown option(s) {sorted(unknown)}; the options are "
                            "dims, factors and kind")
        if dims is None:
            raise TypeError("kronecker: option dims=(d1, d2) is required (d1·d2 = dim)")
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) != 2:
            raise ValueError(f"kronecker: dims must be a pair (d1, d2), got dims={dims!r}")
        d1, d2 = (check_int_option(f"dims[{i}]", v, 1, None, cls.name) for i, v in enumerate(dims))
        if d1 * d2 != dim:
            raise ValueError(f"kronecker: mismatched Kronecker shapes: dims=({d1}, {d2}) gives "
                             f"d1·d2 = {d1 * d2}, but dim={dim}")
        if isinstance(factors, (str, bytes, Mapping)) or not isinstance(factors, Sequence) \
                or len(factors) != 2:
            raise ValueError(f"kronecker: factors must be a pair of structure specs, "
                             f"got factors={factors!r}")
        specs = [_normalize_factor(i, f, d) for i, (f, d) in enumerate(zip(factors, (d1, d2)))]
        if kind not in KINDS:
            raise ValueError(f"kronecker: kind must be one of {KINDS}, got kind={kind!r}")
        return {"dims": [d1, d2], "factors": specs, "kind": kind}

    @classmethod
    def shapes(cls, dim, *, dims, factors, **options):
        return {
            f"{i}.{k}": shape
            for i, (d, f) in enumerate(zip(dims, factors))
            for k, shape in get_structure_class(f["name"]).shapes(d, **f["options"]).items()
        }

    @classmethod
    def identity_tensors(cls, dim, *, dtype, device, dims, factors, **options):
        return {
            f"{i}.{k}": t
            for i, (d, f) in enumerate(zip(dims, factors))
            for k, t in get_structure_class(f["name"]).identity_tensors(
                d, dtype=dtype, device=device, **f["options"]).items()
        }

    @classmethod
    def _options_of_kind(cls, dim: int, kind: str, options: dict[str, Any]) -> dict[str, Any]:
        opts = cls.check_options(dim, **{"kind": kind, **options})
        if opts["kind"] != kind:
            raise ValueError(f"kronecker: this constructor makes a {kind}-kind element "
                             f"({_KIND_TEXT[kind]}), got kind={opts['kind']!r}")
        return opts

    @classmethod
    def identity(cls, dim: int, *, dtype=torch.float32, device=None, **options: Any) -> Kronecker:
        """``I = I ⊗ I`` as a product-kind (group) element."""
        opts = cls._options_of_kind(dim, "product", options)
        return cls(dim, cls.identity_tensors(dim, dtype=dtype, device=device, **opts), **opts)

    @classmethod
    def zeros(cls, dim: int, *, dtype=torch.float32, device=None, **options: Any) -> Kronecker:
        """``0 = 0 ⊗ I + I ⊗ 0`` as a sum-kind (coordinate) element."""
        opts = cls._options_of_kind(dim, "sum", options)
        shapes = cls.shapes(dim, **opts)
        return cls(dim, {k: torch.zeros(s, dtype=dtype, device=device) for k, s in shapes.items()},
                   **opts)

    @classmethod
    def from_factors(cls, f1: Structure, f2: Structure, kind: str = "product") -> Kronecker:
        """``f1 ⊗ f2`` (``kind="product"``) or ``f1 ⊗ I + I ⊗ f2`` (``kind="sum"``)."""
        for i, f in enumerate((f1, f2)):
            if not isinstance(f, Structure) or isinstance(f, Kronecker):
                raise ValueError(f"kronecker: factor {i} must be a non-Kronecker Structure, "
                                 f"got {f!r}")
        tensors = {f"{i}.{k}": t for i, f in enumerate((f1, f2)) for k, t in f.tensors().items()}
        options = {"dims": [f1.dim, f2.dim], "factors": [_factor_spec(f1), _factor_spec(f2)],
                   "kind": kind}
        return cls(f1.dim * f2.dim, tensors, **options)

    def num_params(self) -> int:
        """The factors' numbers of free entries."""
        return sum(f.num_params() for f in self.factors)

    def _pair(self, f1: Structure, f2: Structure, kind: str | None = None) -> Kronecker:
        """``f1 ⊗ f2`` or ``f1 ⊗ I + I ⊗ f2`` from factors made by ops on this one's factors
        (same dims and specs up to their options): no re-validation, no rebuilt factors."""
        kind = kind or self.kind
        g1, g2 = self.factors
        if kind == self.kind and f1.options is g1.options and f2.options is g2.options \
                and f1.name == g1.name and f2.name == g2.name:
            options = self.options
        else:
            options = {"dims": self.options["dims"], "kind": kind,
                       "factors": [{"name": f.name, "options": f.options} for f in (f1, f2)]}
        tensors = {f"{i}.{k}": t for i, f in enumerate((f1, f2)) for k, t in f._t.items()}
        out = type(self).__new__(type(self))
        out.options, out.dim, out._t, out.factors = options, self.dim, tensors, (f1, f2)
        return out

    def spec(self) -> dict[str, Any]:
        """``{"name": "kronecker", "dim", "options": {"dims", "factors", "kind"}}`` (a copy)."""
        o = self.options
        options = {"dims": list(o["dims"]), "kind": o["kind"],
                   "factors": [{"name": f["name"], "options": dict(f["options"])}
                               for f in o["factors"]]}
        return {"name": self.name, "dim": self.dim, "options": options}

    @property
    def dims(self) -> tuple[int, int]:
        return tuple(self.options["dims"])

    @property
    def kind(self) -> str:
        return self.options["kind"]

    def identity_like(self) -> Kronecker:
        return self._pair(*(f.identity_like() for f in self.factors), "product")

    def zeros_like(self) -> Kronecker:
        return self._pair(*(f.zeros_like() for f in self.factors), "sum")

    def coord_identity(self) -> Kronecker:
        """``Π̂(I) = I ⊗ I + I ⊗ 0`` (the scale lives in the first factor; module doc)."""
        f1, f2 = self.factors
        return self._pair(f1.coord_identity(), f2.zeros_like(), "sum")

    def add_identity(self, alpha: float) -> Kronecker:
        """``(M₁ + αI) ⊗ I + I ⊗ M₂`` for a sum (``Π̂(I) = I ⊗ I + I ⊗ 0``); a product raises
        as :meth:`add` does."""
        if self.kind != "sum":
            return super().add_identity(alpha)
        f1, f2 = self.factors
        return self._pair(f1.add_identity(alpha), f2)

    def _fix_gauge(self, m1: Structure, m2: Structure) -> Kronecker:
        """The sum ``m1 ⊗ I + I ⊗ (m2 − tr̄(m2) I)``: the common scale kept in the first factor."""
        eye2 = m2.coord_identity()
        return self._pair(m1, m2.add(eye2, alpha=-(m2.trace() / self.dims[1])), "sum")

    def __repr__(self) -> str:
        parts = []
        for f in self.factors:
            opts = ", ".join(f"{k}={v}" for k, v in f.options.items())
            parts.append(f"{f.name}({f.dim}{', ' + opts if opts else ''})")
        return f"Kronecker({' ⊗ '.join(parts)}, kind={self.kind}, dtype={self.dtype})"

    def _require(self, kind: str, op: str) -> None:
        if self.kind != kind:
            raise ValueError(f"Kronecker.{op} is defined for a {kind}-kind {_KIND_TEXT[kind]}, "
                             f"got a {self.kind}-kind {_KIND_TEXT[self.kind]}")

    # ------------------------------------------------------------------ linear-space ops
    def add(self, other: Structure, alpha: float = 1.0) -> Kronecker:
        """Factor-wise, for two sums: ``(M₁ + αN₁) ⊗ I + I ⊗ (M₂ + αN₂)``.

        Raises:
            ValueError: other structure/kind/dtype, or two products (``K₁⊗K₂ + L₁⊗L₂`` is not
                a Kronecker product).
        """
        self._check_same(other)
        if self.kind == "product":
            raise ValueError(
                "Kronecker.add: K₁ ⊗ K₂ + L₁ ⊗ L₂ is not a Kronecker product; add is defined for "
                "coordinate elements M₁ ⊗ I + I ⊗ M₂ (kind 'sum')"
            )
        return self._pair(*(f.add(g, alpha) for f, g in zip(self.factors, other.factors)))

    def scale(self, c: float | Tensor) -> Kronecker:
        """``c·(M₁ ⊗ I + I ⊗ M₂)`` scales both factors; ``c·(K₁ ⊗ K₂) = (cK₁) ⊗ K₂``."""
        f1, f2 = self.factors
        return self._pair(f1.scale(c), f2.scale(c) if self.kind == "sum" else f2)

    def max_abs(self) -> Tensor:
        """Product: ``max|K₁|·max|K₂|``, the largest entry of ``K₁ ⊗ K₂``. Sum: the largest
        stored entry ``max(max|M₁|, max|M₂|)`` (per factor, as INGD's ``normalize_lr_cov``)."""
        a, b = (f.max_abs() for f in self.factors)
        return a * b if self.kind == "product" else torch.maximum(a, b)

    # ------------------------------------------------------------------ dense forms
    def to_dense(self) -> Tensor:
        A1, A2 = (f.to_dense() for f in self.factors)
        if self.kind == "product":
            return torch.kron(A1, A2)
        I1, I2 = (torch.eye(d, dtype=self.dtype, device=self.device) for d in self.dims)
        return torch.kron(A1, I2) + torch.kron(I1, A2)

    def from_dense(self, A: Tensor) -> Kronecker:
        """The factors of ``A = K₁ ⊗ K₂`` (product) or ``A = M₁ ⊗ I + I ⊗ M₂`` (sum).

        Product: ``K₁ ∝ A[:, j, :, l]`` and ``K₂ ∝ A[i, :, k, :]`` at the largest ``|A[i,j,k,l]|``.
        Sum: ``M₁ = A[:, 0, :, 0] − (a/2)I`` and ``M₂ = A[0, :, 0, :] − (a/2)I``, ``a = A[0,0,0,0]``
        (the trace split between the factors is a gauge; this one splits it evenly).
        """
        d1, d2 = self.dims
        A4 = A.to(self.dtype).reshape(d1, d2, d1, d2)
        f1, f2 = self.factors
        if self.kind == "product":
            i, j, k, l = torch.unravel_index(A4.abs().argmax(), A4.shape)
            return self._pair(f1.from_dense(A4[:, j, :, l]),
                              f2.from_dense(A4[i, :, k, :] / A4[i, j, k, l]))
        half = 0.5 * A4[0, 0, 0, 0]
        return self._pair(
            f1.from_dense(A4[:, 0, :, 0] - half * torch.eye(d1, dtype=A4.dtype, device=A4.device)),
            f2.from_dense(A4[0, :, 0, :] - half * torch.eye(d2, dtype=A4.dtype, device=A4.device)),
        )

    def project(self, Y: Tensor) -> Kronecker:
        """``Π̂(Y)`` by partial traces, gauge fixed (module doc), for a symmetric ``d×d`` ``Y``."""
        if not isinstance(Y, Tensor) or tuple(Y.shape) != (self.dim, self.dim):
            shape = tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__
            raise ValueError(f"Y must have shape ({self.dim}, {self.dim}), got {shape}")
        d1, d2 = self.dims
        Y4 = Y.reshape(d1, d2, d1, d2)
        f1, f2 = self.factors
        return self._fix_gauge(f1.project(torch.einsum("ijkj->ik", Y4) / d2),
                               f2.project(torch.einsum("ijil->jl", Y4) / d1))

    # ------------------------------------------------------------------ products
    def _apply(self, x: Tensor, transpose: bool) -> Tensor:
        self._check_vec(x)
        f1, f2 = self.factors
        if f1.name == "dense" and f2.name == "dense":
            return self._apply_dense(x, f1._t["matrix"], f2._t["matrix"], transpose)
        X = x.reshape(*self.dims, -1)
        if self.kind == "product":  # K₁ X K₂ᵀ
            out = f2.apply_along(f1.apply_along(X, 0, transpose), 1, transpose)
        else:  # M₁ X + X M₂ᵀ
            out = f1.apply_along(X, 0, transpose) + f2.apply_along(X, 1, transpose)
        return out.reshape(x.shape)

    def _apply_dense(self, x: Tensor, A1: Tensor, A2: Tensor, transpose: bool) -> Tensor:
        """Two dense factors, ``x`` of shape ``(d,)`` or ``(d, n)``: the ``n`` columns as a
        batch of ``d₁×d₂`` matrices, ``K₁ X K₂ᵀ`` (product) or ``M₁ X + X M₂ᵀ`` (sum) by two
        (batched) products (a transposed ``x``, as ``εᵀ``, is read without a copy)."""
        vector = x.dim() == 1
        n = 1 if vector else x.shape[1]
        Xt = x.reshape(*self.dims) if vector else x.T.reshape(n, *self.dims)
        if transpose:  # Kᵀ: K₁ᵀ X K₂, M₁ᵀ X + X M₂
            A1 = A1.T
        else:
            A2 = A2.T
        out = A1 @ Xt @ A2 if self.kind == "product" else A1 @ Xt + Xt @ A2
        return out.reshape(-1) if vector else out.reshape(n, self.dim).T

    def matmul(self, x: Tensor) -> Tensor:
        return self._apply(x, transpose=False)

    def rmatmul(self, x: Tensor) -> Tensor:
        return self._apply(x, transpose=True)

    def solve(self, x: Tensor) -> Tensor:
        """``(K₁ ⊗ K₂)^{-1} x = vec_row(K₁^{-1} X K₂^{-T})`` by the factors' ``solve`` (product kind).

        For log-densities and diagnostics only; no update calls it.

        Raises:
            ValueError: a sum-kind coordinate element (coordinates are never inverted; only group
                elements ``K₁ ⊗ K₂`` are), or a bad ``x``.
        """
        if self.kind != "product":
            raise ValueError(
                f"Kronecker.solve is defined for a product-kind {_KIND_TEXT['product']}, got a "
                f"{self.kind}-kind {_KIND_TEXT[self.kind]}: coordinates are never inverted"
            )
        self._check_vec(x)
        f1, f2 = self.factors
        X = x.reshape(*self.dims, -1)
        return _along(f2.solve, _along(f1.solve, X, 0), 1).reshape(x.shape)

    def compose(self, other: Structure) -> Kronecker:
        """``(K₁ ⊗ K₂)(L₁ ⊗ L₂) = (K₁L₁) ⊗ (K₂L₂)``.

        Raises:
            ValueError: other structure/kind/dtype, or sums (a product of Kronecker sums is not a
                Kronecker sum; coordinates enter the group through :meth:`retract`).
        """
        self._check_same(other)
        if self.kind == "sum":
            raise ValueError(
                "Kronecker.compose: (M₁ ⊗ I + I ⊗ M₂)(N₁ ⊗ I + I ⊗ N₂) is not a Kronecker sum; "
                "compose group elements (kind 'product'), and map coordinates into the group "
                "with K.retract(M) (factor-wise)"
            )
        return self._pair(*(f.compose(g) for f, g in zip(self.factors, other.factors)))

    def default_step_size(self) -> float:
        """``stable_step_size``, or a factor's smaller default (e.g. a Toeplitz factor)."""
        return min([float(self.stable_step_size)] + [f.default_step_size() for f in self.factors])

    def retract(self, M: Structure, retraction: str = "quadratic") -> Kronecker:
        """``(K₁ h(M₁)) ⊗ (K₂ h(M₂))`` for ``M = M₁ ⊗ I + I ⊗ M₂`` (exact for ``"expm"``)."""
        self._require("product", "retract")
        o = self.options
        if not (isinstance(M, Kronecker) and M.kind == "sum" and M.dim == self.dim
                and M.options["dims"] == o["dims"] and M.options["factors"] == o["factors"]):
            want = self.spec()
            want["options"]["kind"] = "sum"
            got = M.spec() if isinstance(M, Structure) else type(M).__name__
            raise ValueError(f"M must be a sum-kind coordinate element with spec {want}, got {got}")
        return self._pair(*(f.retract(m, retraction) for f, m in zip(self.factors, M.factors)))

    def project_outer(self, U: Tensor, V: Tensor | None = None) -> Kronecker:
        """``Π̂(sym(U Vᵀ))`` from the factors' ``project_outer`` on unfoldings of ``U``, ``V``:
        ``tr₂(U Vᵀ) = U₍₁₎ V₍₁₎ᵀ`` with ``U₍₁₎ = U.reshape(d₁, d₂ n)``, and likewise for ``tr₁``."""
        self._check_vec(U, "U")
        if V is not None:
            self._check_vec(V, "V")
        d1, d2 = self.dims
        f1, f2 = self.factors
        if f1.name == "dense" and f2.name == "dense" and U.dim() == 2:  # the same, batched
            n = U.shape[1]
            Ut = U.T.reshape(n, d1, d2)
            Vt = Ut if V is None else V.T.reshape(n, d1, d2)
            A1 = torch.tensordot(Ut, Vt, dims=([0, 2], [0, 2]))  # tr₂(U Vᵀ)
            A2 = Ut.reshape(n * d1, d2).T @ Vt.reshape(n * d1, d2)  # tr₁(U Vᵀ)
            P1 = (0.5 / d2) * (A1 + A1.T)
            P2 = (0.5 / d1) * (A2 + A2.T)
            P2.diagonal().sub_(P2.diagonal().sum() / d2)  # the gauge: tr M₂ = 0
            return self._pair(f1._new({"matrix": P1.to(f1.dtype)}),
                              f2._new({"matrix": P2.to(f2.dtype)}), "sum")
        parts = []
        for axis, (f, rest) in enumerate(zip(self.factors, (d2, d1))):
            Ua = _unfold(U, self.dims, axis)
            Va = None if V is None else _unfold(V, self.dims, axis)
            parts.append(f.project_outer(Ua, Va).scale(1.0 / rest))
        return self._fix_gauge(*parts)

    def inner_project_self(self) -> Kronecker:
        """``Π̂((K₁ᵀK₁) ⊗ (K₂ᵀK₂)) = Π̂₁(K₁ᵀK₁)·tr̄(K₂ᵀK₂) ⊗ I + I ⊗ Π̂₂(K₂ᵀK₂)·tr̄(K₁ᵀK₁)``,
        since ``tr₂(A ⊗ B) = tr(B)·A``; ``tr(KᵢᵀKᵢ) = Σ diag(KᵢKᵢᵀ)``."""
        self._require("product", "inner_project_self")
        f1, f2 = self.factors
        t1, t2 = (f.gram_diagonal().mean() for f in self.factors)
        return self._fix_gauge(f1.inner_project_self().scale(t2), f2.inner_project_self().scale(t1))

    # ------------------------------------------------------------------ reductions
    def diagonal(self) -> Tensor:
        a, b = (f.diagonal() for f in self.factors)
        return torch.kron(a, b) if self.kind == "product" else (a[:, None] + b[None, :]).reshape(-1)

    def gram_diagonal(self) -> Tensor:
        """Product: ``diag(K₁K₁ᵀ) ⊗ diag(K₂K₂ᵀ)``.
        Sum: ``diag(MMᵀ)[ij] = g₁ᵢ + g₂ⱼ + 2m₁ᵢᵢm₂ⱼⱼ``, ``gₖ = diag(MₖMₖᵀ)``."""
        g1, g2 = (f.gram_diagonal() for f in self.factors)
        if self.kind == "product":
            return torch.kron(g1, g2)
        a, b = (f.diagonal() for f in self.factors)
        return (g1[:, None] + g2[None, :] + 2 * a[:, None] * b[None, :]).reshape(-1)

    def inf_norm(self) -> Tensor:
        """Product: ``‖K₁‖∞‖K₂‖∞`` (exact). Sum: ``max_ij r₁ᵢ + r₂ⱼ + |m₁ᵢᵢ + m₂ⱼⱼ|`` (exact),
        ``r`` the off-diagonal absolute row sums; O(d) entries."""
        if self.kind == "product":
            return self.factors[0].inf_norm() * self.factors[1].inf_norm()
        a, b = (f.diagonal() for f in self.factors)
        r1, r2 = (f.abs_row_sums() - f.diagonal().abs() for f in self.factors)
        return (r1[:, None] + r2[None, :] + (a[:, None] + b[None, :]).abs()).max()

    def logabsdet(self) -> Tensor:
        """``log|det(K₁ ⊗ K₂)| = d₂ log|det K₁| + d₁ log|det K₂|`` (product kind)."""
        self._require("product", "logabsdet")
        d1, d2 = self.dims
        return d2 * self.factors[0].logabsdet() + d1 * self.factors[1].logabsdet()
