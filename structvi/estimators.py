r"""Monte-Carlo estimators of the engine's statistics ``E_q[∇f]`` and ``Π̂(Kᵀ Ē K)`` (MATH §2.6).

With ``q = N(μ, K Kᵀ)``, ``z = μ + K ε`` and ``f = −log_joint``, every estimator returns
``NGDStats(grad, curvature)`` with ``grad ≈ E_q[∇f(z)]`` (Bonnet) and
``curvature ≈ Π̂(Kᵀ E_q[∇²f(z)] K)`` (a coordinate element of the factor's structure):

* ``"stein"`` (gradient only): Stein's lemma gives ``Kᵀ Ē K = E[(Kᵀ∇f(z)) εᵀ]``; the estimate
  is ``Π̂(sym(mean_s (Kᵀ∇f(z_s) − c ε_s) ε_sᵀ)) + c Π̂(I)`` computed by ``K.project_outer``
  (only the entries in the pattern), over antithetic pairs ``(ε, −ε)``, which cancel the
  ``∇f(μ)``-term exactly (MATH §2.3). The control variate ``c(mean_s ε_s ε_sᵀ − I)`` has mean
  zero; with ``c = τ`` (the value ``Kᵀ Ē K`` takes at the fixed point) it removes the noise of
  the sample second moment, so for a Gaussian target the error scales with ``‖KᵀĒK − τI‖`` and
  vanishes at the optimum. Cost: ``n`` gradients plus ``O(pattern × n)``.
* ``"hessian"``: Hessian-vector products ``∇²f(z_s) k_j`` with the ``d`` columns ``k_j`` of
  ``K`` (the directions ``Kᵀ ∇²f K`` needs), reverse-over-reverse through :mod:`torch.func`,
  vectorized over the directions with ``vmap``; then ``Π̂(Kᵀ (H̄ K))``. Cost: ``n·d`` HVPs and
  ``O(d²)`` memory — use it for ``d`` up to a few thousand. Exact for quadratic ``f`` (any samples, since antithetic
  pairs also make the mean gradient exact), which makes a step a Newton step.
* ``"reparam"``: the plain reparameterization gradient in local coordinates — for ``K(M) = K(I+M)``,
  ``∂/∂M f(μ + K(I+M)ε) = (Kᵀ∇f) εᵀ``, i.e. the Stein formula — with independent samples and no
  antithetic pairs: the baseline the ``"stein"`` estimator improves on.

``log_joint`` maps a batch of points ``(n, d)`` to ``(n,)``; all estimators draw ``ε`` from the
given :class:`torch.Generator` and return the log-joint values at the samples for monitoring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from structvi.engine import NGDStats
from structvi.structures import Structure

if TYPE_CHECKING:
    from structvi.gaussian import StructuredGaussian

__all__ = [
    "ESTIMATORS", "Estimate", "LogJoint", "elbo", "estimate", "hessian", "reparam", "stein",
]

LogJoint = Callable[[Tensor], Tensor]


class Estimate(NamedTuple):
    """An estimator's output.

    Attributes:
        stats: ``NGDStats(grad, curvature)`` for :func:`structvi.engine.step`.
        log_joint: ``log_joint`` at the ``n`` sample points, shape ``(n,)`` (detached).
        quad_form: ``u ↦ uᵀ (Kᵀ Ē K) u`` from the same samples, unprojected (the curvature along
            the direction ``K u``; used by the fitter's mean line search). ``u``: shape ``(d,)``.
    """

    stats: NGDStats
    log_joint: Tensor
    quad_form: Callable[[Tensor], Tensor]


def _compute_dtype(loc: Tensor, factor: Structure) -> torch.dtype:
    """Estimates are computed in the wider of the mean's and the factor's dtypes."""
    return torch.promote_types(loc.dtype, factor.dtype)


def draw_eps(
    dim: int, num_samples: int, *, antithetic: bool, generator: torch.Generator | None,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    """Standard normal draws, shape ``(num_samples, dim)``; ``[ε; −ε]`` when antithetic."""
    n = num_samples // 2 if antithetic else num_samples
    eps = torch.randn(n, dim, generator=generator, dtype=dtype, device=device)
    return torch.cat([eps, -eps]) if antithetic else eps


def sample_points(loc: Tensor, factor: Structure, eps: Tensor) -> Tensor:
    """``z_s = μ + K ε_s`` for ``ε`` of shape ``(n, d)``; returns ``(n, d)``."""
    return loc + factor.matmul(eps.T).T


def value_and_grad_f(log_joint: LogJoint, Z: Tensor) -> tuple[Tensor, Tensor]:
    """``log_joint(Z)`` and ``∇f(Z) = −∇ log_joint(Z)`` row by row (``Z``: ``(n, d)``).

    Raises:
        ValueError: ``log_joint`` does not return shape ``(n,)``.
    """
    with torch.enable_grad():
        Zg = Z.detach().requires_grad_(True)
        values = log_joint(Zg)
        _check_output(values, Z)
        (grad,) = torch.autograd.grad(values.sum(), Zg)
    return values.detach(), -grad


def _check_output(values: object, Z: Tensor) -> None:
    if not isinstance(values, Tensor) or values.shape != Z.shape[:1]:
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            f"log_joint must map a batch of points of shape (n, d) = {tuple(Z.shape)} to shape "
            f"({Z.shape[0]},), got output {got}"
        )


def _check_num_samples(name: str, num_samples: int, antithetic: bool) -> None:
    ok = isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1
    if ok and antithetic:
        ok = num_samples >= 2 and num_samples % 2 == 0
    if not ok:
        need = "an even integer >= 2 (antithetic pairs)" if antithetic else "an integer >= 1"
        raise ValueError(
            f"num_samples must be {need} for the {name!r} estimator, "
            f"got num_samples={num_samples!r}"
        )


def _gradient_estimator(
    log_joint: LogJoint, loc: Tensor, factor: Structure, num_samples: int,
    generator: torch.Generator | None, *, antithetic: bool, name: str, control: float = 0.0,
) -> Estimate:
    """Shared body of ``stein`` and ``reparam``:
    ``Π̂(sym(mean_s (Kᵀ∇f(z_s) − c ε_s) ε_sᵀ)) + c Π̂(I)`` with ``c = control``."""
    _check_num_samples(name, num_samples, antithetic)
    dt = _compute_dtype(loc, factor)
    K = factor.to(dt) if factor.dtype != dt else factor
    eps = draw_eps(K.dim, num_samples, antithetic=antithetic, generator=generator, dtype=dt,
                   device=loc.device)
    Z = sample_points(loc.to(dt), K, eps)
    values, G = value_and_grad_f(log_joint, Z)
    U = (K.rmatmul(G.T) - control * eps.T) / num_samples  # (d, n): (Kᵀ∇f(z_s) − c ε_s) / n
    curvature = K.project_outer(U, eps.T)
    if control:
        curvature = curvature.add(curvature.coord_identity(), alpha=control)

    def quad_form(u: Tensor) -> Tensor:
        u = u.to(dt)
        return ((u @ U) * (eps @ u)).sum() + control * u.square().sum()

    return Estimate(NGDStats(G.mean(0).to(loc.dtype), curvature), values, quad_form)


def stein(
    log_joint: LogJoint, loc: Tensor, factor: Structure, num_samples: int = 16,
    generator: torch.Generator | None = None, control: float = 1.0,
) -> Estimate:
    """Gradient-only Stein estimator over ``num_samples / 2`` antithetic pairs (module doc).

    Args:
        log_joint: ``(n, d) → (n,)``.
        loc: mean ``μ``, shape ``(d,)``.
        factor: covariance factor ``K``.
        num_samples: total number of points (even).
        generator: source of ``ε``.
        control: coefficient ``c`` of the control variate (the temperature ``τ`` is best;
            ``0`` gives the plain Stein estimate).

    Returns:
        The estimate.
    """
    return _gradient_estimator(log_joint, loc, factor, num_samples, generator, antithetic=True,
                               name="stein", control=control)


def reparam(
    log_joint: LogJoint, loc: Tensor, factor: Structure, num_samples: int = 16,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Plain reparameterization-gradient estimator with independent samples (module doc).

    Args:
        log_joint: ``(n, d) → (n,)``.
        loc: mean ``μ``, shape ``(d,)``.
        factor: covariance factor ``K``.
        num_samples: number of points.
        generator: source of ``ε``.

    Returns:
        The estimate.
    """
    return _gradient_estimator(log_joint, loc, factor, num_samples, generator, antithetic=False,
                               name="reparam")


def _grad_and_hvps(log_joint: LogJoint, Z: Tensor, directions: Tensor) -> tuple[Tensor, ...]:
    """Values, ``∇f`` and ``mean_s ∇²f(z_s) v_j`` through :mod:`torch.func`.

    ``log_joint`` treats rows independently, so ``G(Z) = ∇_Z Σ_s f(z_s)`` has row ``s`` equal to
    ``∇f(z_s)`` and a block-diagonal Jacobian: the VJP of ``G`` with a cotangent whose every row is
    ``v`` gives the rows ``∇²f(z_s) v``. ``G`` is computed once (reverse mode), then its VJP is
    vectorized over the ``m`` directions with ``vmap`` (reverse-over-reverse).

    Args:
        log_joint: ``(n, d) → (n,)``.
        Z: points, shape ``(n, d)``.
        directions: ``(m, d)``, one direction per row.

    Returns:
        ``(values (n,), ∇f (n, d), H̄V (m, d))``.
    """

    def neg_sum(A: Tensor) -> tuple[Tensor, Tensor]:
        values = log_joint(A)
        _check_output(values, A)
        return -values.sum(), values

    grad_fn = torch.func.grad(neg_sum, has_aux=True)
    try:
        G, vjp_fn, values = torch.func.vjp(grad_fn, Z, has_aux=True)
        cotangents = directions[:, None, :].expand(directions.shape[0], *Z.shape)
        (HV,) = torch.func.vmap(vjp_fn)(cotangents)
    except RuntimeError as err:
        raise RuntimeError(
            "the 'hessian' estimator failed to differentiate log_joint twice with torch.func "
            "(grad, vjp, vmap); it needs a pure function of its input (no in-place updates of "
            f"captured tensors, no .item()): {err}"
        ) from err
    return values.detach(), G.detach(), HV.mean(1).detach()


def hessian(
    log_joint: LogJoint, loc: Tensor, factor: Structure, num_samples: int = 2,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Hessian estimator: HVPs with the columns of ``K`` at antithetic sample points.

    Args:
        log_joint: ``(n, d) → (n,)``, differentiable twice by :mod:`torch.func`.
        loc: mean ``μ``, shape ``(d,)``.
        factor: covariance factor ``K``.
        num_samples: total number of points (even; ``num_samples · d`` HVPs).
        generator: source of ``ε``.

    Returns:
        The estimate.
    """
    _check_num_samples("hessian", num_samples, True)
    dt = _compute_dtype(loc, factor)
    K = factor.to(dt) if factor.dtype != dt else factor
    eps = draw_eps(K.dim, num_samples, antithetic=True, generator=generator, dtype=dt,
                   device=loc.device)
    Z = sample_points(loc.to(dt), K, eps)
    columns = K.to_dense().T  # row j = K e_j, the j-th direction
    values, G, HKt = _grad_and_hvps(log_joint, Z, columns)
    HK = HKt.T  # (d, d) = H̄ K
    KtHK = K.rmatmul(HK)
    curvature = K.project(0.5 * (KtHK + KtHK.T))

    def quad_form(u: Tensor) -> Tensor:
        u = u.to(dt)
        return u @ KtHK @ u

    return Estimate(NGDStats(G.mean(0).to(loc.dtype), curvature), values, quad_form)


ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "stein": stein,
    "hessian": hessian,
    "reparam": reparam,
}
"""Estimators by name: ``fn(log_joint, loc, factor, num_samples, generator) -> Estimate``."""

DEFAULT_NUM_SAMPLES = {"stein": 16, "hessian": 2, "reparam": 16}


def check_estimator(estimator: str) -> str:
    """Validate an estimator name."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(
            f"estimator must be one of {sorted(ESTIMATORS)}, got estimator={estimator!r}"
        )
    return estimator


def estimate(
    log_joint: LogJoint, loc: Tensor, factor: Structure, *, estimator: str = "stein",
    num_samples: int | None = None, generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> Estimate:
    """Run the named estimator (``num_samples=None``: its default, see ``DEFAULT_NUM_SAMPLES``).

    Args:
        log_joint: ``(n, d) → (n,)``.
        loc: mean ``μ``, shape ``(d,)``.
        factor: covariance factor ``K``.
        estimator: ``"stein"``, ``"hessian"`` or ``"reparam"``.
        num_samples: number of points per estimate.
        generator: source of ``ε``.
        temperature: ``τ``; the Stein estimator's control-variate coefficient.

    Returns:
        The estimate.
    """
    check_estimator(estimator)
    n = DEFAULT_NUM_SAMPLES[estimator] if num_samples is None else num_samples
    if estimator == "stein":
        return stein(log_joint, loc, factor, n, generator, control=temperature)
    return ESTIMATORS[estimator](log_joint, loc, factor, n, generator)


def elbo(
    log_joint: LogJoint,
    q: StructuredGaussian,
    num_samples: int = 1024,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Monte-Carlo ELBO ``mean_s log_joint(μ + K ε_s) + τ H[q]`` over antithetic pairs.

    Pass equally seeded generators to compare several ``q`` of the same dimension with common
    random numbers: the difference of two estimates then has far less noise than either.

    Args:
        log_joint: ``(n, d) → (n,)``.
        q: an unbatched :class:`~structvi.gaussian.StructuredGaussian`.
        num_samples: number of points (even).
        generator: source of ``ε``.
        temperature: ``τ``.

    Returns:
        The estimate, a 0-d tensor in ``q.loc``'s dtype.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got num_samples={num_samples!r}")
    K = q.factor
    eps = draw_eps(q.dim, num_samples - num_samples % 2, antithetic=True, generator=generator,
                   dtype=q.loc.dtype, device=q.loc.device)
    with torch.no_grad():
        Z = sample_points(q.loc, K.to(q.loc.dtype) if K.dtype != q.loc.dtype else K, eps)
        values = log_joint(Z)
    return values.mean() + temperature * q.entropy()
