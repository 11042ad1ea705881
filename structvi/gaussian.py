r"""``StructuredGaussian``: a multivariate normal stored as a mean and a structured factor.

.. math:: q(z) = \mathcal N(z;\ \mu,\ K K^\top), \qquad z = \mu + K\varepsilon,\quad
          \varepsilon \sim \mathcal N(0, I)

with ``K`` a :class:`~structvi.structures.Structure` (the covariance-side factor, DESIGN.md
decision 1). Sampling, the mean and the marginal variances are structured products (no ``d×d``
matrix); the log-density needs ``K^{-1}(x − μ)`` (:func:`whiten`, the factor's own
:meth:`~structvi.structures.Structure.solve`: elementwise for a diagonal factor, a substitution
for triangular-type factors, small block solves for the others); dense quantities
(``covariance_matrix``, ``precision_matrix``, ``scale_tril``) are lazy and meant for diagnostics.

The closed-form KL divergence is registered with :func:`torch.distributions.kl.register_kl`
against itself and :class:`~torch.distributions.MultivariateNormal`, in both directions::

    kl_divergence(q, MultivariateNormal(m, scale_tril=L))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, MultivariateNormal, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import lazy_property

from structvi.structures import Structure, make_structure

__all__ = ["StructuredGaussian", "whiten"]

_LOG_2PI = math.log(2 * math.pi)


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype dense diagnostics run in: the widest input, at least float32."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def whiten(factor: Structure, r: Tensor) -> Tensor:
    """``K^{-1} r`` for ``r`` of shape ``(d, n)``, in ``r``'s dtype (at least float32).

    The factor's own :meth:`~structvi.structures.Structure.solve` (elementwise for a diagonal
    factor, a substitution for triangular-type factors, small block solves for the others; no
    ``d×d`` matrix except for the dense and Toeplitz factors), run in the wider of ``r``'s and the
    factor's dtype, at least float32. Log-densities, KL and diagnostics only — never called by
    an update.

    Args:
        factor: the factor ``K``.
        r: right-hand sides, shape ``(d, n)``.

    Returns:
        ``K^{-1} r``, shape ``(d, n)``.
    """
    dt = _work_dtype(r.dtype, factor.dtype)
    K = factor if factor.dtype == dt else factor.to(dt)
    return K.solve(r.to(dt))


class StructuredGaussian(Distribution):
    """Multivariate normal ``N(loc, K Kᵀ)`` with a structured covariance factor ``K``.

    Args:
        loc: mean, shape ``batch_shape + (d,)``.
        factor: the covariance factor ``K`` (``d×d`` structure), shared by every batch element.
        validate_args: as for :class:`torch.distributions.Distribution`.

    Raises:
        TypeError: ``factor`` is not a Structure or ``loc`` not a tensor.
        ValueError: ``loc``'s last dimension differs from ``factor.dim``, or devices differ.
    """

    arg_constraints = {"loc": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, factor: Structure, validate_args: bool | None = None) -> None:
        if not isinstance(factor, Structure):
            raise TypeError(
                f"factor must be a structvi Structure, got factor={type(factor).__name__}"
            )
        if not isinstance(loc, Tensor) or loc.dim() < 1 or loc.shape[-1] != factor.dim:
            shape = tuple(loc.shape) if isinstance(loc, Tensor) else type(loc).__name__
            raise ValueError(
                f"loc must have shape batch_shape + ({factor.dim},) to match factor.dim="
                f"{factor.dim}, got loc of shape {shape}"
            )
        if loc.device != factor.device:
            raise ValueError(f"loc is on device {loc.device} but factor is on {factor.device}")
        self.loc = loc
        self.factor = factor
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    @classmethod
    def standard(
        cls,
        dim: int,
        structure: str = "dense",
        init_scale: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> StructuredGaussian:
        """``N(0, init_scale² I)`` with a factor of the named structure.

        Args:
            dim: dimension ``d``.
            structure: a registered structure name (``structvi.structures.STRUCTURES``).
            init_scale: standard deviation of every coordinate (> 0).
            dtype: dtype of the mean and the factor (``None``: ``torch.get_default_dtype()``).
            device: device of the mean and the factor.
            **options: structure options, e.g. ``rank=4`` or ``block_size=8``.

        Returns:
            The distribution.

        Raises:
            ValueError: non-positive ``init_scale`` (and the errors of ``make_structure``).
        """
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not (
            math.isfinite(init_scale) and init_scale > 0
        ):
            raise ValueError(
                f"init_scale must be a finite number > 0, got init_scale={init_scale!r}"
            )
        dtype = torch.get_default_dtype() if dtype is None else dtype
        K = make_structure(structure, dim, dtype=dtype, device=device, **options)
        return cls(torch.zeros(dim, dtype=dtype, device=device), K.scale(float(init_scale)))

    # ------------------------------------------------------------------ cheap quantities
    @property
    def dim(self) -> int:
        """The event dimension ``d``."""
        return self.factor.dim

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        """``diag(K Kᵀ)`` from the structure (no ``d×d`` matrix), shape ``batch_shape + (d,)``."""
        var = self.factor.gram_diagonal().to(self.loc.dtype)
        return var.expand(self._batch_shape + self._event_shape)

    def entropy(self) -> Tensor:
        """``(d/2) log(2πe) + log|det K|`` (dense factors use ``slogdet``: monitoring only)."""
        d = self.dim
        h = 0.5 * d * (1.0 + _LOG_2PI) + self.factor.logabsdet().to(self.loc.dtype)
        return h.expand(self._batch_shape)

    # ------------------------------------------------------------------ sampling, density
    def rsample(
        self, sample_shape: torch.Size | tuple[int, ...] = torch.Size(),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Reparameterized samples ``μ + K ε``, shape ``sample_shape + batch_shape + (d,)``.

        Args:
            sample_shape: leading sample dimensions.
            generator: source of ``ε`` (``None``: torch's default generator).

        Returns:
            The samples, differentiable with respect to ``loc`` and the factor's tensors.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self._color(eps)

    def sample(
        self, sample_shape: torch.Size | tuple[int, ...] = torch.Size(),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Like :meth:`rsample`, without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)

    def _color(self, eps: Tensor) -> Tensor:
        """``K ε`` for ``ε`` of shape ``(..., d)``."""
        flat = eps.reshape(-1, self.dim).T.to(self.factor.dtype)
        return self.factor.matmul(flat).T.to(eps.dtype).reshape(eps.shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """``−½‖K^{-1}(x − μ)‖² − log|det K| − (d/2) log 2π``, shape ``broadcast batch``."""
        if self._validate_args:
            self._validate_sample(value)
        diff = value - self.loc
        w = whiten(self.factor, diff.reshape(-1, self.dim).T)
        maha = w.square().sum(0).reshape(diff.shape[:-1]).to(diff.dtype)
        logdet = self.factor.logabsdet().to(diff.dtype)
        return -0.5 * (maha + self.dim * _LOG_2PI) - logdet

    # ------------------------------------------------------------------ dense diagnostics
    @lazy_property
    def covariance_matrix(self) -> Tensor:
        """Dense ``K Kᵀ`` (diagnostics), shape ``batch_shape + (d, d)``."""
        A = self.factor.to_dense().to(self.loc.dtype)
        return (A @ A.T).expand(self._batch_shape + (self.dim, self.dim))

    @lazy_property
    def precision_matrix(self) -> Tensor:
        """Dense ``K^{-T} K^{-1}`` (diagnostics), shape ``batch_shape + (d, d)``."""
        eye = torch.eye(self.dim, dtype=self.loc.dtype, device=self.loc.device)
        W = whiten(self.factor, eye)
        return (W.T @ W).to(self.loc.dtype).expand(self._batch_shape + (self.dim, self.dim))

    @lazy_property
    def scale_tril(self) -> Tensor:
        """Cholesky factor of :attr:`covariance_matrix` (diagnostics, for MVN interop)."""
        cov = self.covariance_matrix[(0,) * len(self._batch_shape)]
        L = torch.linalg.cholesky(cov.to(_work_dtype(cov.dtype))).to(cov.dtype)
        return L.expand(self._batch_shape + (self.dim, self.dim))

    def to_multivariate_normal(self) -> MultivariateNormal:
        """The same distribution as a dense :class:`~torch.distributions.MultivariateNormal`."""
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril)

    def expand(
        self, batch_shape: torch.Size | tuple[int, ...], _instance: Any = None
    ) -> StructuredGaussian:
        new = self._get_checked_instance(StructuredGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self._event_shape)
        new.factor = self.factor
        super(StructuredGaussian, new).__init__(batch_shape, self._event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self) -> str:
        return (f"StructuredGaussian(dim={self.dim}, factor={self.factor!r}, "
                f"batch_shape={tuple(self._batch_shape)})")


# ---------------------------------------------------------------------- closed-form KL
def _kl_from_factors(
    loc_p: Tensor, Kp_dense: Tensor, logdet_p: Tensor,
    loc_q: Tensor, whiten_q: Any, logdet_q: Tensor,
) -> Tensor:
    r"""``KL(N(μ_p, K_p K_pᵀ) ‖ N(μ_q, K_q K_qᵀ))``.

    .. math:: \tfrac12\big(\|K_q^{-1}K_p\|_F^2 + \|K_q^{-1}(μ_q − μ_p)\|^2 − d\big)
              + \log|\det K_q| − \log|\det K_p|
    """
    d = Kp_dense.shape[-1]
    lq, lp = torch.broadcast_tensors(loc_q, loc_p)
    diff = lq - lp
    batch = diff.shape[:-1]
    W = whiten_q(Kp_dense)
    delta = whiten_q(diff.reshape(-1, d).T)
    maha = delta.square().sum(0).reshape(batch)
    dt = W.dtype
    kl = 0.5 * (W.square().sum() + maha.to(dt) - d) + logdet_q.to(dt) - logdet_p.to(dt)
    return kl.to(diff.dtype)


def _mvn_parts(p: MultivariateNormal) -> tuple[Tensor, Any, Tensor]:
    L = p.scale_tril
    if L.dim() != 2:
        raise ValueError(
            f"KL with a StructuredGaussian needs an unbatched MultivariateNormal scale "
            f"(shape (d, d)), got scale_tril of shape {tuple(L.shape)}"
        )
    dt = _work_dtype(L.dtype)

    def whiten_L(r: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(L.to(dt), r.to(dt), upper=False)

    return L, whiten_L, L.diagonal().abs().log().sum()


def _check_dims(p: Distribution, q: Distribution) -> None:
    if p.event_shape != q.event_shape:
        raise ValueError(f"KL needs equal event shapes, got {tuple(p.event_shape)} and "
                         f"{tuple(q.event_shape)}")


@register_kl(StructuredGaussian, StructuredGaussian)
def _kl_structured_structured(p: StructuredGaussian, q: StructuredGaussian) -> Tensor:
    _check_dims(p, q)
    return _kl_from_factors(
        p.loc, p.factor.to_dense(), p.factor.logabsdet(),
        q.loc, lambda r: whiten(q.factor, r), q.factor.logabsdet(),
    )


@register_kl(StructuredGaussian, MultivariateNormal)
def _kl_structured_mvn(p: StructuredGaussian, q: MultivariateNormal) -> Tensor:
    _check_dims(p, q)
    _, whiten_q, logdet_q = _mvn_parts(q)
    return _kl_from_factors(p.loc, p.factor.to_dense(), p.factor.logabsdet(), q.loc, whiten_q,
                            logdet_q)


@register_kl(MultivariateNormal, StructuredGaussian)
def _kl_mvn_structured(p: MultivariateNormal, q: StructuredGaussian) -> Tensor:
    _check_dims(p, q)
    Lp, _, logdet_p = _mvn_parts(p)
    return _kl_from_factors(p.loc, Lp, logdet_p, q.loc, lambda r: whiten(q.factor, r),
                            q.factor.logabsdet())
