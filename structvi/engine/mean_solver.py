r"""The mean step with more curvature than ``K Kᵀ``: truncated, trust-region conjugate gradients.

The engine's plain mean step ``μ ← μ − β K Kᵀ m_μ`` is a Newton step only when ``K Kᵀ = Ē⁻¹``,
i.e. for a full structure at its optimum. For a sparse ``K`` (diagonal, low rank) on a correlated
posterior it is a preconditioned steepest descent whose rate is set by the condition number of
``Kᵀ Ē K`` (≈ 2.6e5 on a collinear regression: tens of thousands of steps). Here the direction is
instead an approximate solution of the Newton system

.. math:: \bar E\, v = m_\mu, \qquad \bar E \approx \mathbb E_q[\nabla^2 f],

by a few iterations of conjugate gradients **preconditioned by** ``P = K Kᵀ`` (matrix products
only) with Hessian-vector products of the target (:func:`target_hvp`, double backward through
``log_joint``). With exact curvature and enough iterations the step is a Newton step for every
structure; with ``k`` iterations it minimizes the local quadratic model over the ``k``-dimensional
Krylov space of ``P Ē``, so it is never worse than the plain step (``k = 1`` *is* the plain step
with an exact line search).

**Trust region in q's own metric (Steihaug–Toint).** The iterate is kept inside
``‖v‖_{P⁻¹} = ‖K⁻¹ v‖ ≤ Δ``, i.e. the mean moves at most ``Δ`` standard deviations of the
current ``q`` (Mahalanobis distance) per step. The norm is tracked by the CG recurrences
``‖p_{k+1}‖² = r_{k+1}ᵀz_{k+1} + β_k² ‖p_k‖²`` and ``⟨x_{k+1}, p_{k+1}⟩ = β_k(⟨x_k, p_k⟩ + α_k
‖p_k‖²)`` (all in the ``P⁻¹`` inner product), so no inverse or solve is needed. A direction of
non-positive curvature (a non-convex target, or a piecewise-linear ``log_joint`` whose Hessian
vanishes) ends the iteration with the last iterate — the plain step ``K Kᵀ m_μ`` (within the
trust region) if it is the first. Unlike Steihaug's method it is not followed to the boundary:
the default radius is generous and not adapted, so that step would be a blind long jump.

All arithmetic runs in float32 or wider (:func:`accumulation_dtype`), whatever the factor's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from structvi.structures.base import Structure

if TYPE_CHECKING:  # ngd imports this module
    from structvi.engine.ngd import NGDConfig, NGDState

__all__ = ["accumulation_dtype", "mean_line_search", "plain_direction", "target_hessian",
           "target_hvp", "trust_region_cg"]

HVP = Callable[[Tensor], Tensor]


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of ``dtypes`` and float32: the dtype mean-step statistics accumulate in."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _gradient_graph(log_joint: Callable[[Tensor], Tensor], points: Tensor) -> tuple[Tensor, Tensor]:
    """``(Z, G)``: the points as a leaf and ``G = ∇(−Σ log_joint)(Z)`` with its graph kept."""
    with torch.enable_grad():
        Z = points.detach().requires_grad_(True)
        values = log_joint(Z)
        if not isinstance(values, Tensor) or values.shape != Z.shape[:1]:
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"log_joint must map points of shape {tuple(Z.shape)} to shape "
                             f"({Z.shape[0]},), got output {got}")
        (G,) = torch.autograd.grad(-values.sum(), Z, create_graph=True)
    return Z, G


def _hvp_of_graph(Z: Tensor, G: Tensor) -> HVP:
    """``v ↦ mean_s ∇²f(z_s) v`` by one backward pass through the graph of ``G``."""

    def hvp(v: Tensor) -> Tensor:
        if not G.requires_grad:  # log_joint is affine in z: zero Hessian
            return torch.zeros_like(v)
        with torch.enable_grad():
            (HV,) = torch.autograd.grad(G, Z, grad_outputs=v.to(G.dtype).expand_as(G),
                                        retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if HV is None else HV.detach().mean(0).to(v.dtype)

    return hvp


def target_hvp(log_joint: Callable[[Tensor], Tensor], points: Tensor) -> HVP:
    """``v ↦ mean_s ∇²f(z_s) v`` for ``f = −log_joint`` at the rows of ``points``.

    Builds the gradient graph once (one forward and one backward pass, ``create_graph=True``);
    each call is one more backward pass. ``log_joint`` maps ``(n, d) → (n,)``.

    Args:
        log_joint: the target's log density (up to a constant), twice differentiable.
        points: ``(n, d)``; the Hessian is averaged over the rows.

    Returns:
        A function of ``v`` (shape ``(d,)``) returning ``Ē v`` (shape ``(d,)``, dtype of
        ``points``).

    Raises:
        ValueError: ``log_joint`` does not return shape ``(n,)``.
    """
    return _hvp_of_graph(*_gradient_graph(log_joint, points))


def target_hessian(log_joint: Callable[[Tensor], Tensor], points: Tensor) -> tuple[Tensor | None, HVP]:
    """The matrix ``Ē = mean_s ∇²f(z_s)`` by one *batched* backward pass, and the matrix-free
    products of the same graph.

    The ``d`` products ``Ē e_k`` are taken together (``torch.autograd.grad(...,
    is_grads_batched=True)``, a ``vmap`` over the double-backward graph): for a small model whose
    cost is per operation rather than per number (a sequential time loop) that costs about one
    Hessian-vector product instead of ``d``. Where the graph cannot be batched (an operation
    without a batching rule that raises) the matrix is ``None`` and the returned products are
    those of :func:`target_hvp`, from the same forward pass.

    Args:
        log_joint: the target's log density, ``(n, d) → (n,)``, twice differentiable.
        points: ``(n, d)``; the Hessian is averaged over the rows.

    Returns:
        ``(H, hvp)``: ``H`` of shape ``(d, d)`` (dtype of ``points``; ``H[k] = Ē e_k``) or
        ``None``, and ``v ↦ Ē v`` by one backward pass per call.

    Raises:
        ValueError: ``log_joint`` does not return shape ``(n,)``.
    """
    Z, G = _gradient_graph(log_joint, points)
    hvp = _hvp_of_graph(Z, G)
    d = Z.shape[1]
    if not G.requires_grad:
        return torch.zeros(d, d, dtype=Z.dtype, device=Z.device), hvp
    eye = torch.eye(d, dtype=G.dtype, device=G.device)[:, None, :].expand(d, *G.shape)
    try:
        with torch.enable_grad():
            (H,) = torch.autograd.grad(G, Z, grad_outputs=eye, retain_graph=True,
                                       allow_unused=True, is_grads_batched=True)
    except RuntimeError:  # no batching rule for an operation of log_joint: matrix-free only
        return None, hvp
    if H is None:
        return torch.zeros(d, d, dtype=Z.dtype, device=Z.device), hvp
    return H.detach().mean(1), hvp


def plain_direction(rhs: Tensor, factor: Structure, radius: float | None = None) -> Tensor:
    """``v = K Kᵀ rhs``, shortened to ``‖K⁻¹ v‖ = ‖Kᵀ rhs‖ ≤ radius`` (the plain mean step)."""
    dt = accumulation_dtype(rhs.dtype, factor.dtype)
    K = factor.to(dt) if factor.dtype != dt else factor
    u = K.rmatmul(rhs.to(dt))
    if radius is not None:
        norm = float(u.norm())
        if norm > radius:
            u = u * (radius / norm)
    return K.matmul(u)


def _to_boundary(xx: float, xp: float, pp: float, radius: float) -> float:
    """``τ ≥ 0`` with ``‖x + τ p‖² = xx + 2τ xp + τ² pp = radius²`` (``xx ≤ radius²``)."""
    disc = max(xp * xp + pp * (radius * radius - xx), 0.0)
    return (-xp + math.sqrt(disc)) / pp if pp > 0 else 0.0


def trust_region_cg(
    hvp: HVP, rhs: Tensor, factor: Structure, *, iters: int, radius: float | None = None,
    rtol: float = 0.1,
) -> Tensor:
    """Approximate ``Ē⁻¹ rhs`` by ``iters`` steps of CG preconditioned by ``K Kᵀ`` (module doc).

    Args:
        hvp: ``v ↦ Ē v``.
        rhs: right-hand side ``m_μ``, shape ``(d,)``.
        factor: ``K``; the preconditioner is ``K Kᵀ``.
        iters: maximum number of CG iterations (>= 1; each costs one ``hvp``).
        radius: trust region ``Δ`` in q's metric, ``‖K⁻¹ v‖ ≤ Δ``; ``None`` for none.
        rtol: stop when ``rᵀ P r`` falls below ``rtol²`` times its initial value (the forcing
            term of an inexact Newton method: each step reduces the residual ``rtol``-fold).

    Returns:
        The direction ``v`` (shape ``(d,)``, float32 or wider); the mean step is ``μ − β v``.
    """
    dt = accumulation_dtype(rhs.dtype, factor.dtype)
    K = factor.to(dt) if factor.dtype != dt else factor
    r = rhs.to(dt)
    z = K.matmul(K.rmatmul(r))
    rz = float(r @ z)
    x = torch.zeros_like(r)
    if not rz > 0:
        return x
    p, rz0 = z, rz
    xx, xp, pp = 0.0, 0.0, rz  # ‖x‖², ⟨x, p⟩, ‖p‖² in the P⁻¹ inner product
    for k in range(iters):
        Hp = hvp(p).to(dt)
        curv = float(p @ Hp)
        if not math.isfinite(curv):
            return x if k else plain_direction(rhs, factor, radius)
        if curv <= 0:  # non-positive curvature: stop (at the plain step if it is the first)
            return x if k else plain_direction(rhs, factor, radius)
        alpha = rz / curv
        if radius is not None and xx + 2 * alpha * xp + alpha * alpha * pp > radius * radius:
            return x + _to_boundary(xx, xp, pp, radius) * p
        x = x + alpha * p
        xx = xx + 2 * alpha * xp + alpha * alpha * pp
        r = r - alpha * Hp
        z = K.matmul(K.rmatmul(r))
        rz_new = float(r @ z)
        if not rz_new > rtol * rtol * rz0:
            break
        beta = rz_new / rz
        p = z + beta * p
        xp = beta * (xp + alpha * pp)
        pp = rz_new + beta * beta * pp
        rz = rz_new
    return x


def mean_line_search(state: NGDState, est: Any, cfg: NGDConfig) -> NGDConfig:
    r"""Cap the mean step size by an exact line search on the local quadratic model.

    The engine's plain mean step moves along ``−v``, ``v = K Kᵀ m_μ`` with ``m_μ = α_μ m_μ + g``.
    On the model ``f(μ − βv) ≈ f(μ) − β gᵀv + ½β² vᵀĒv`` the best step is
    ``β* = gᵀv / vᵀĒv = (Kᵀg)ᵀu / uᵀ(KᵀĒK)u`` with ``u = Kᵀ m_μ``, estimated from the same
    samples (``est.quad_form``). The step is ``min(β_μ, β*)``; if the momentum direction points
    uphill (``gᵀv ≤ 0``) or the model is not finite the mean does not move this step. The search
    uses the pre-update factor while the engine steps with the updated one; the two agree at
    convergence and the factor's trust region bounds their difference. Costs two structured
    products, computed in float32 or wider whatever the factor's dtype, with ``u`` normalized
    before the quadratic form (so a float16 factor cannot overflow it). With the CG mean step
    (``cfg.mean_cg_iters > 0``) the direction already minimizes the model over its Krylov space
    and the cap is not applied. ``est``: a :class:`structvi.estimators.Estimate` (its
    ``stats.grad`` and ``quad_form``).
    """
    if cfg.mean_cg_iters > 0:
        return cfg
    acc = accumulation_dtype(state.loc.dtype, state.factor.dtype)
    K = state.factor.to(acc) if state.factor.dtype != acc else state.factor
    g = est.stats.grad.to(acc)
    if cfg.alpha_mean == 0:  # m_μ = g: one product
        u = K.rmatmul(g)
        slope, norm = (float(x) for x in torch.stack([u @ u, u.norm()]).tolist())
    else:
        u = K.rmatmul(cfg.alpha_mean * state.loc_momentum.to(acc) + g)
        slope, norm = (float(x) for x in torch.stack([K.rmatmul(g) @ u, u.norm()]).tolist())
    if not (slope > 0 and math.isfinite(slope) and math.isfinite(norm)):
        return cfg.replace(lr_mean=0.0)  # uphill, g = 0, or not finite: no mean step this time
    curv = float(est.quad_form(u / norm)) * norm * norm
    if not math.isfinite(curv):
        return cfg.replace(lr_mean=0.0)
    if not curv > 0 or slope >= cfg.beta_mean * curv:  # no curvature information, or no cap
        return cfg
    return cfg.replace(lr_mean=slope / curv)
