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

**Precision.** Samples, statistics and the products with ``K`` are computed in the *work dtype*,
the widest of the mean's and the factor's dtypes and float32 (a bf16 factor is read once and
consumed in float32; ``Kᵀ Ē K`` comes from Hessian-vector products with the columns of ``K``, never
from a rounded ``Ē K``). ``log_joint`` is called on points in ``point_dtype`` (default: the mean's
dtype), so a pure-bf16 target gets bf16 points; its values and gradients are widened at once.

**Non-finite samples.** A sample whose log-joint value, gradient (or, for ``"hessian"``, any
Hessian-vector product) is not finite is dropped together with its antithetic partner; the
statistics are the averages over the kept samples and :attr:`Estimate.num_dropped` counts the
dropped ones. If every sample is dropped, :attr:`Estimate.stats` is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import math

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
        eps: the kept standard-normal draws ``ε_s``, shape ``(n_kept, d)`` in the work dtype
            (the fitter's acceptance test reuses them: common random numbers).
        num_dropped: samples dropped because a value or derivative was not finite (with their
            antithetic partners).
        bad_value: the first non-finite value met (``None`` if none), for error messages.

    With ``stats=None`` every sample was dropped; ``log_joint`` and ``eps`` are then empty.
    ``log_joint`` holds the values at the kept samples, in the work dtype.
    """

    stats: NGDStats | None
    log_joint: Tensor
    quad_form: Callable[[Tensor], Tensor]
    eps: Tensor | None = None
    num_dropped: int = 0
    bad_value: float | None = None


def work_dtype(loc: Tensor, factor: Structure) -> torch.dtype:
    """The dtype estimates are computed in: the widest of the mean's, the factor's and float32."""
    return torch.promote_types(torch.promote_types(loc.dtype, factor.dtype), torch.float32)


_compute_dtype = work_dtype


def _keep_mask(bad: Tensor, antithetic: bool) -> Tensor:
    """Samples to keep: not ``bad`` and (antithetic) whose partner is not ``bad`` either."""
    if antithetic:
        half = bad.shape[0] // 2
        pair_bad = bad[:half] | bad[half:]
        bad = torch.cat([pair_bad, pair_bad])
    return ~bad


def _first_bad(*tensors: Tensor) -> float | None:
    for t in tensors:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            return float(t[bad].reshape(-1)[0])
    return None


def _rows_finite(t: Tensor) -> Tensor:
    return torch.isfinite(t).reshape(t.shape[0], -1).all(-1)


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


def value_and_grad_f(
    log_joint: LogJoint, Z: Tensor, point_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``log_joint(Z)`` and ``∇f(Z) = −∇ log_joint(Z)`` row by row (``Z``: ``(n, d)``).

    Args:
        log_joint: ``(n, d) → (n,)``.
        Z: points, shape ``(n, d)``.
        point_dtype: dtype of the points handed to ``log_joint`` (``None``: ``Z``'s); values and
            gradients are returned in ``Z``'s dtype.

    Raises:
        ValueError: ``log_joint`` does not return shape ``(n,)``, returns a non-floating tensor,
            or a value that does not depend on the points (detached or constant).
        TypeError: ``log_joint`` failed on a dtype mismatch (the message names both dtypes).
    """
    Zp = Z.detach().to(point_dtype or Z.dtype)
    with torch.enable_grad():
        Zg = Zp.requires_grad_(True)
        values = _call(log_joint, Zg)
        _check_output(values, Z)
        _check_differentiable(values)
        (grad,) = torch.autograd.grad(values.sum(), Zg, allow_unused=True)
    if grad is None:
        raise ValueError(_NO_GRAD_MESSAGE)
    return values.detach().to(Z.dtype), -grad.to(Z.dtype)


_NO_GRAD_MESSAGE = (
    "log_joint(Z) does not depend on Z (its output has no gradient with respect to the points: "
    "a constant, a detached tensor, .item()/.numpy() round trips or integer arithmetic); "
    "return log p(z, D) computed from Z with differentiable torch operations"
)


def _call(log_joint: LogJoint, Z: Tensor) -> Tensor:
    """``log_joint(Z)``; a dtype clash inside it becomes a message naming the dtypes and the fix."""
    try:
        return log_joint(Z)
    except RuntimeError as err:
        text = str(err)
        if "dtype" in text or "scalar type" in text or "Float" in text and "Double" in text:
            raise TypeError(
                f"log_joint failed on points of dtype {Z.dtype}: {text}. The points have the "
                f"dtype of q's mean; build q in the dtype of the tensors your log_joint uses "
                f"(e.g. StructuredGaussian.standard(d, dtype=torch.float64)) or cast inside "
                f"log_joint (data.to(Z.dtype))"
            ) from err
        raise


def _check_differentiable(values: Tensor) -> None:
    if not values.is_floating_point():
        raise ValueError(
            f"log_joint must return a floating-point tensor, got dtype {values.dtype} (integer "
            f"arithmetic has no gradient); return log p(z, D) as a float tensor computed from Z"
        )
    if not values.requires_grad:
        raise ValueError(_NO_GRAD_MESSAGE)


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
    point_dtype: torch.dtype | None = None,
) -> Estimate:
    """Shared body of ``stein`` and ``reparam``:
    ``Π̂(sym(mean_s (Kᵀ∇f(z_s) − c ε_s) ε_sᵀ)) + c Π̂(I)`` with ``c = control``, over the kept
    samples (module doc)."""
    _check_num_samples(name, num_samples, antithetic)
    dt = work_dtype(loc, factor)
    K = factor.to(dt) if factor.dtype != dt else factor
    eps = draw_eps(K.dim, num_samples, antithetic=antithetic, generator=generator, dtype=dt,
                   device=loc.device)
    Z = sample_points(loc.to(dt), K, eps)
    values, G = value_and_grad_f(log_joint, Z, point_dtype or loc.dtype)
    finite = torch.isfinite(values) & _rows_finite(G)
    if bool(finite.all()):  # the usual case: one check, nothing dropped
        n, bad = num_samples, None
    else:
        keep = _keep_mask(~finite, antithetic)
        bad = _first_bad(values, G)
        n = int(keep.sum())
    if n == 0:
        return _empty_estimate(values, eps, num_samples, bad)
    if n < num_samples:
        values, G, eps = values[keep], G[keep], eps[keep]
    U = (K.rmatmul(G.T) - control * eps.T) / n  # (d, n): (Kᵀ∇f(z_s) − c ε_s) / n
    curvature = K.project_outer(U, eps.T)
    if control:
        curvature = curvature.add_identity(control)

    def quad_form(u: Tensor) -> Tensor:
        u = u.to(dt)
        return ((u @ U) * (eps @ u)).sum() + control * u.square().sum()

    return Estimate(NGDStats(G.mean(0), curvature), values, quad_form, eps,
                    num_samples - n, bad)


def _empty_estimate(values: Tensor, eps: Tensor, num_samples: int, bad: float | None) -> Estimate:
    def quad_form(u: Tensor) -> Tensor:
        return torch.full((), math.nan, dtype=eps.dtype)

    return Estimate(None, values[:0], quad_form, eps[:0], num_samples, bad)


def stein(
    log_joint: LogJoint, loc: Tensor, factor: Structure, num_samples: int = 16,
    generator: torch.Generator | None = None, control: float = 1.0,
    point_dtype: torch.dtype | None = None,
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
        point_dtype: dtype of the points given to ``log_joint`` (``None``: ``loc``'s).

    Returns:
        The estimate.
    """
    return _gradient_estimator(log_joint, loc, factor, num_samples, generator, antithetic=True,
                               name="stein", control=control, point_dtype=point_dtype)


def reparam(
    log_joint: LogJoint, loc: Tensor, factor: Structure, num_samples: int = 16,
    generator: torch.Generator | None = None, point_dtype: torch.dtype | None = None,
) -> Estimate:
    """Plain reparameterization-gradient estimator with independent samples (module doc).

    Args:
        log_joint: ``(n, d) → (n,)``.
        loc: mean ``μ``, shape ``(d,)``.
        factor: covariance factor ``K``.
        num_samples: number of points.
        generator: source of ``ε``.
        point_dtype: dtype of the points given to ``log_joint`` (``None``: ``loc``'s).

    Returns:
        The estimate.
    """
    return _gradient_estimator(log_joint, loc, factor, num_samples, generator, antithetic=False,
                               name="reparam", point_dtype=point_dtype)


def _grad_and_hvps(
    log_joint: LogJoint, Z: Tensor, directions: Tensor, point_dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """Values, ``∇f`` and the per-sample products ``∇²f(z_s) v_j`` through :mod:`torch.func`.

    ``log_joint`` treats rows independently, so ``G(Z) = ∇_Z Σ_s f(z_s)`` has row ``s`` equal to
    ``∇f(z_s)`` and a block-diagonal Jacobian: the VJP of ``G`` with a cotangent whose every row is
    ``v`` gives the rows ``∇²f(z_s) v``. ``G`` is computed once (reverse mode), then its VJP is
    vectorized over the ``m`` directions with ``vmap`` (reverse-over-reverse). The points and
    directions are handed to ``log_joint`` in ``point_dtype``; the results come back in ``Z``'s.

    Args:
        log_joint: ``(n, d) → (n,)``.
        Z: points, shape ``(n, d)``.
        directions: ``(m, d)``, one direction per row.
        point_dtype: dtype of the points given to ``log_joint``.

    Returns:
        ``(values (n,), ∇f (n, d), HV (m, n, d))``.
    """

    def neg_sum(A: Tensor) -> tuple[Tensor, Tensor]:
        values = _call(log_joint, A)
        _check_output(values, A)
        if not values.is_floating_point():
            raise ValueError(f"log_joint must return a floating-point tensor, got dtype "
                             f"{values.dtype} (integer arithmetic has no gradient)")
        return -values.sum(), values

    grad_fn = torch.func.grad(neg_sum, has_aux=True)
    Zp, V = Z.to(point_dtype), directions.to(point_dtype)
    try:
        G, vjp_fn, values = torch.func.vjp(grad_fn, Zp, has_aux=True)
        cotangents = V[:, None, :].expand(V.shape[0], *Zp.shape)
        (HV,) = torch.func.vmap(vjp_fn)(cotangents)
    except RuntimeError as err:
        raise RuntimeError(
            "the 'hessian' estimator failed to differentiate log_joint twice with torch.func "
            "(grad, vjp, vmap); it needs a pure function of its input (no in-place updates of "
            f"captured tensors, no .item()): {err}"
        ) from err
    dt = Z.dtype
    return values.detach().to(dt), G.detach().to(dt), HV.detach().to(dt)


def hessian(
    log_joint: LogJoint, loc: Tensor, factor: Structure, num_samples: int = 2,
    generator: torch.Generator | None = None, point_dtype: torch.dtype | None = None,
) -> Estimate:
    """Hessian estimator: HVPs with the columns of ``K`` at antithetic sample points.

    The curvature ``Kᵀ Ē K`` is whitened by construction: each HVP ``∇²f(z_s) k_j`` is taken
    along a column ``k_j`` of ``K`` and the products are accumulated in the work dtype (at
    least float32), so a low-precision factor never forms and rounds the unwhitened ``Ē K``.

    Args:
        log_joint: ``(n, d) → (n,)``, differentiable twice by :mod:`torch.func`.
        loc: mean ``μ``, shape ``(d,)``.
        factor: covariance factor ``K``.
        num_samples: total number of points (even; ``num_samples · d`` HVPs).
        generator: source of ``ε``.
        point_dtype: dtype of the points given to ``log_joint`` (``None``: ``loc``'s).

    Returns:
        The estimate.
    """
    _check_num_samples("hessian", num_samples, True)
    dt = work_dtype(loc, factor)
    K = factor.to(dt) if factor.dtype != dt else factor
    eps = draw_eps(K.dim, num_samples, antithetic=True, generator=generator, dtype=dt,
                   device=loc.device)
    Z = sample_points(loc.to(dt), K, eps)
    columns = K.to_dense().T  # row j = K e_j, the j-th direction
    values, G, HV = _grad_and_hvps(log_joint, Z, columns, point_dtype or loc.dtype)
    if not bool(G.any()) and not bool(HV.any()):
        raise ValueError(_NO_GRAD_MESSAGE)
    HV_rows = HV.transpose(0, 1)  # (n, d directions, d)
    keep = _keep_mask(~(torch.isfinite(values) & _rows_finite(G) & _rows_finite(HV_rows)), True)
    bad = _first_bad(values, G, HV)
    n = int(keep.sum())
    if n == 0:
        return _empty_estimate(values, eps, num_samples, bad)
    HK = HV_rows[keep].mean(0).T  # (d, d) = H̄ K over the kept samples
    KtHK = K.rmatmul(HK)
    curvature = K.project(0.5 * (KtHK + KtHK.T))

    def quad_form(u: Tensor) -> Tensor:
        u = u.to(dt)
        return u @ KtHK @ u

    return Estimate(NGDStats(G[keep].mean(0), curvature), values[keep], quad_form, eps[keep],
                    num_samples - n, bad)


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
    temperature: float = 1.0, point_dtype: torch.dtype | None = None,
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
        point_dtype: dtype of the points given to ``log_joint`` (``None``: ``loc``'s).

    Returns:
        The estimate.
    """
    check_estimator(estimator)
    n = DEFAULT_NUM_SAMPLES[estimator] if num_samples is None else num_samples
    if estimator == "stein":
        return stein(log_joint, loc, factor, n, generator, control=temperature,
                     point_dtype=point_dtype)
    return ESTIMATORS[estimator](log_joint, loc, factor, n, generator, point_dtype=point_dtype)


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

    Raises:
        ValueError: ``num_samples`` < 2, or ``log_joint`` does not return shape ``(n,)``.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got num_samples={num_samples!r}")
    K = q.factor
    eps = draw_eps(q.dim, num_samples - num_samples % 2, antithetic=True, generator=generator,
                   dtype=q.loc.dtype, device=q.loc.device)
    with torch.no_grad():
        Z = sample_points(q.loc, K.to(q.loc.dtype) if K.dtype != q.loc.dtype else K, eps)
        values = _call(log_joint, Z)
    _check_output(values, Z)
    return values.mean() + temperature * q.entropy()
