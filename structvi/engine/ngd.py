r"""Momentum natural-gradient descent in generalized normal coordinates (MATH (2.6)).

Pure functions on tensors and :class:`~structvi.structures.Structure` objects. One step, with
covariance-side factor ``K`` (``Σ = K Kᵀ``), mean ``μ`` and the statistics
``g = E_q[∇f]`` and ``P = Π̂(Kᵀ Ē K)``, ``Ē = E_q[∇²f]``:

.. math::
    \nu &= \tfrac12\,(P - \tau\,\hat\Pi(I)) \\
    m_K &\leftarrow \alpha_K m_K + \nu \\
    \beta_{\text{eff}} &= \min(\beta_K,\ c / \|m_K\|_\infty) \qquad\text{(trust region)} \\
    K &\leftarrow K\, h(-\beta_{\text{eff}}\, m_K) \\
    m_\mu &\leftarrow \alpha_\mu m_\mu + g \\
    \mu &\leftarrow \mu - \beta_\mu\, K K^\top m_\mu \qquad\text{(with the updated } K)

The mean step uses the **updated** factor (the Bayesian-learning-rule order): it differs from the
pre-update order at O(β²) and makes a step with exact curvature a Newton step. No inverse,
solve or decomposition is used: ``h`` and the mean step are matrix products.

**Which steps are Newton steps.** With exact curvature (the ``hessian`` estimator on a quadratic
target) and ``β_K = 1`` the factor step is a Newton step — quadratic convergence, the linearized
map has spectral radius ``1 − β_K`` — for every structure whose ``Π̂`` is the metric projection
of its own pattern (dense, triangular, block-diagonal, diagonal, low-rank, hierarchical:
``Structure.newton_step``). It is not for ``triangular_toeplitz`` and ``kronecker`` (and a
``block_sites`` holding one), whose patterns are averages: there the factor step converges
linearly, and ``β_K = 1`` can even oscillate (Toeplitz: spectral radius 1.2–1.4 on a
condition-1e4 Gaussian). ``Structure.default_step_size()`` is the largest measured-stable step,
used by :func:`structvi.schedules.default_config`.

The plain mean step is a Newton step only when ``K Kᵀ = Ē⁻¹`` (a full structure at its optimum).
With a sparse structure ``K Kᵀ`` is not ``Ē⁻¹`` even at the optimum, and ``β_μ = 1`` can
diverge (a diagonal ``K`` makes the mean step a Jacobi iteration). Two remedies:

* ``mean_cg_iters = k > 0`` with Hessian-vector products in ``NGDStats.hvp``: the direction is
  ``k`` steps of conjugate gradients on ``Ē v = m_μ`` preconditioned by ``K Kᵀ``
  (:mod:`structvi.engine.mean_solver`), a Newton step for any structure once ``k`` is large
  enough; :func:`structvi.fit` supplies the products by double backward through ``log_joint``.
* otherwise :func:`structvi.fit` caps ``β_μ`` each step by an exact line search on the local
  quadratic model; callers of this bare step should pass a smaller ``lr_mean`` or do the same.

``mean_trust_region = Δ`` bounds every mean step by ``‖K⁻¹ Δμ‖ ≤ Δ`` (at most ``Δ`` standard
deviations of ``q``), computed without an inverse.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from structvi.engine.mean_solver import plain_direction, trust_region_cg
from structvi.engine.retraction import check_retraction
from structvi.structures.base import Structure
from structvi.structures.registry import structure_from_spec

__all__ = ["NGDConfig", "NGDState", "NGDStats", "factor_step", "init", "mean_step", "step"]


def _check_nonneg(name: str, value: Any, *, strict: bool = False, upper: float | None = None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if strict else value >= 0) and (upper is None or value < upper)
    if not ok:
        rng = ("> 0" if strict else ">= 0") + (f" and < {upper}" if upper is not None else "")
        raise ValueError(f"{name} must be a finite number {rng}, got {name}={value!r}")


@dataclass(frozen=True)
class NGDConfig:
    """Hyper-parameters of one engine step.

    Args:
        lr: factor step size ``β_K`` (> 0).
        momentum: factor momentum ``α_K`` in ``[0, 1)``.
        lr_mean: mean step size ``β_μ``; defaults to ``lr``.
        momentum_mean: mean momentum ``α_μ``; defaults to ``momentum``.
        retraction: ``"quadratic"`` (default), ``"first_order"`` or ``"expm"``.
        trust_region: ``c`` in ``β_eff = min(β_K, c/‖m_K‖_∞)``; ``None`` disables the cap.
            MATH §2.6: without it a stiff target diverges from ``K = I``.
        temperature: ``τ`` (1 is the ELBO; MATH (2.1)).
        mean_cg_iters: ``k``: conjugate-gradient iterations of the mean step when the statistics
            carry Hessian-vector products (``NGDStats.hvp``); ``0`` is the plain step
            ``K Kᵀ m_μ`` (module doc).
        mean_cg_tol: forcing term ``η`` of the CG mean step (inexact Newton): stop once the
            preconditioned residual ``rᵀ K Kᵀ r`` is below ``η²`` times its starting value.
        mean_trust_region: ``Δ``: every mean step moves at most ``Δ`` standard deviations of
            ``q`` (``‖K⁻¹ Δμ‖ ≤ Δ``); ``None`` disables the cap.
    """

    lr: float = 0.1
    momentum: float = 0.0
    lr_mean: float | None = None
    momentum_mean: float | None = None
    retraction: str = "quadratic"
    trust_region: float | None = 1.0
    temperature: float = 1.0
    mean_cg_iters: int = 0
    mean_cg_tol: float = 0.1
    mean_trust_region: float | None = None

    def __post_init__(self) -> None:
        _check_nonneg("lr", self.lr, strict=True)
        _check_nonneg("momentum", self.momentum, upper=1.0)
        if self.lr_mean is not None:
            _check_nonneg("lr_mean", self.lr_mean)
        if self.momentum_mean is not None:
            _check_nonneg("momentum_mean", self.momentum_mean, upper=1.0)
        check_retraction(self.retraction)
        if self.trust_region is not None:
            _check_nonneg("trust_region", self.trust_region, strict=True)
        _check_nonneg("temperature", self.temperature)
        k = self.mean_cg_iters
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"mean_cg_iters must be an integer >= 0, got mean_cg_iters={k!r}")
        _check_nonneg("mean_cg_tol", self.mean_cg_tol, upper=1.0)
        if self.mean_trust_region is not None:
            _check_nonneg("mean_trust_region", self.mean_trust_region, strict=True)

    @property
    def beta_mean(self) -> float:
        return self.lr if self.lr_mean is None else self.lr_mean

    @property
    def alpha_mean(self) -> float:
        return self.momentum if self.momentum_mean is None else self.momentum_mean

    def replace(self, **changes: Any) -> NGDConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


class NGDStats(NamedTuple):
    """Statistics of one step: ``grad = E_q[∇f]`` (shape ``(d,)``),
    ``curvature = Π̂(Kᵀ Ē K)`` (a coordinate element of the factor's structure) and, optionally,
    ``hvp: v ↦ Ē v`` (Hessian-vector products of the target) for the CG mean step."""

    grad: Tensor
    curvature: Structure
    hvp: Callable[[Tensor], Tensor] | None = None


class NGDState(NamedTuple):
    """Engine state: tensors and structures only (see :meth:`state_dict`)."""

    loc: Tensor
    factor: Structure
    factor_momentum: Structure
    loc_momentum: Tensor
    step: int

    def state_dict(self) -> dict[str, Any]:
        """Tensors plus JSON-able specs; loads with ``torch.load(weights_only=True)``."""
        return {
            "loc": self.loc,
            "loc_momentum": self.loc_momentum,
            "factor": self.factor.tensors(),
            "factor_spec": self.factor.spec(),
            "factor_momentum": self.factor_momentum.tensors(),
            "factor_momentum_spec": self.factor_momentum.spec(),
            "step": self.step,
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> NGDState:
        """Inverse of :meth:`state_dict` (dtypes as stored)."""
        return cls(
            loc=sd["loc"],
            factor=structure_from_spec(sd["factor"], sd["factor_spec"]),
            factor_momentum=structure_from_spec(sd["factor_momentum"], sd["factor_momentum_spec"]),
            loc_momentum=sd["loc_momentum"],
            step=int(sd["step"]),
        )


def init(
    loc: Tensor, factor: Structure, *, momentum_dtype: torch.dtype | None = None
) -> NGDState:
    """Start state: zero momenta (momentum dtype defaults to the factor's / the loc's)."""
    if not isinstance(factor, Structure):
        raise TypeError(f"factor must be a Structure, got {type(factor).__name__}")
    if not isinstance(loc, Tensor) or loc.shape != (factor.dim,):
        shape = tuple(loc.shape) if isinstance(loc, Tensor) else type(loc).__name__
        raise ValueError(f"loc must have shape ({factor.dim},), got {shape}")
    if loc.device != factor.device:
        raise ValueError(f"loc is on {loc.device} but factor is on {factor.device}")
    m_K = factor.zeros_like().to(momentum_dtype or factor.dtype)
    m_mu = torch.zeros_like(loc, dtype=momentum_dtype or loc.dtype)
    return NGDState(loc, factor, m_K, m_mu, 0)


def factor_step(
    factor: Structure,
    momentum: Structure,
    nu: Structure,
    *,
    lr: float | Tensor,
    alpha: float,
    retraction: str = "quadratic",
    trust_region: float | None = 1.0,
) -> tuple[Structure, Structure]:
    """``m ← α m + ν``; ``K ← K h(−β_eff m)`` with ``β_eff = min(lr, c/‖m‖_∞)``.

    ``nu`` is the natural gradient in local coordinates (minimization sign). Returns the new
    factor (factor dtype) and momentum (momentum dtype).
    """
    nu = nu.to(momentum.dtype)
    m = nu if alpha == 0 else momentum.scale(alpha).add(nu)  # 0·m + ν = ν (m is finite)
    beta: float | Tensor = lr
    if trust_region is not None:
        dt = torch.promote_types(m.dtype, torch.float32)  # float64 stays float64, bf16 → float32
        norm = m.inf_norm().to(dt)
        cap = (trust_region / (torch.as_tensor(lr, dtype=dt, device=norm.device) * norm)).clamp(max=1.0)
        beta = lr * cap.nan_to_num(nan=1.0)  # 0/0 when lr*norm = 0 → no cap needed
    step_dir = m.to(factor.dtype).scale(-beta if isinstance(beta, float) else -beta.to(factor.dtype))
    return factor.retract(step_dir, retraction), m


def mean_step(
    loc: Tensor, loc_momentum: Tensor, grad: Tensor, factor: Structure, *, lr: float, alpha: float,
    hvp: Callable[[Tensor], Tensor] | None = None, cg_iters: int = 0, cg_tol: float = 0.1,
    trust_region: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``m_μ ← α m_μ + g``; ``μ ← μ − lr v`` (no solve).

    ``v = K Kᵀ m_μ`` (the plain step), or, with ``hvp`` and ``cg_iters > 0``, up to ``cg_iters``
    steps of CG on ``Ē v = m_μ`` preconditioned by ``K Kᵀ`` (relative tolerance ``cg_tol``);
    ``‖K⁻¹ v‖ ≤ trust_region`` either way. The direction is computed in float32 or wider and rounded once into ``loc``'s dtype.
    """
    g = grad.to(loc_momentum.dtype)
    m_mu = g if alpha == 0 else alpha * loc_momentum + g
    if hvp is not None and cg_iters > 0:
        direction = trust_region_cg(hvp, m_mu, factor, iters=cg_iters, radius=trust_region,
                                    rtol=cg_tol)
    else:
        direction = plain_direction(m_mu, factor, trust_region)
    new = loc.to(direction.dtype) - lr * direction
    return new.to(loc.dtype), m_mu


_COORD_SPECS: dict[int, tuple[Any, type, int, Structure]] = {}  # id(K.options) -> Π̂(I)


def _is_coordinate_of(M: Any, K: Structure) -> bool:
    """Whether ``M`` has the spec of ``K``'s coordinate elements (``K.coord_identity()``'s),
    with ``Π̂(I)`` built once per ``K.options`` object (shared by the factors of a fit)."""
    hit = _COORD_SPECS.get(id(K.options))
    if hit is None or hit[0] is not K.options or hit[1] is not type(K) or hit[2] != K.dim:
        if len(_COORD_SPECS) > 64:
            _COORD_SPECS.clear()
        hit = _COORD_SPECS[id(K.options)] = (K.options, type(K), K.dim, K.coord_identity())
    eye = hit[3]
    return eye.same_spec(M) or (isinstance(M, Structure) and M.spec() == eye.spec())


def step(state: NGDState, stats: NGDStats, config: NGDConfig) -> NGDState:
    """One engine step, MATH (2.6). Pure: returns a new state."""
    K = state.factor
    if stats.grad.shape != state.loc.shape:
        raise ValueError(f"stats.grad must have shape {tuple(state.loc.shape)}, "
                         f"got {tuple(stats.grad.shape)}")
    if not _is_coordinate_of(stats.curvature, K):
        raise ValueError(f"stats.curvature must be a coordinate element with spec "
                         f"{K.coord_identity().spec()}")
    nu = stats.curvature.to(K.dtype).add_identity(-config.temperature).scale(0.5)
    K_new, m_K = factor_step(
        K, state.factor_momentum, nu, lr=config.lr, alpha=config.momentum,
        retraction=config.retraction, trust_region=config.trust_region,
    )
    loc, m_mu = mean_step(
        state.loc, state.loc_momentum, stats.grad, K_new,
        lr=config.beta_mean, alpha=config.alpha_mean, hvp=stats.hvp,
        cg_iters=config.mean_cg_iters, cg_tol=config.mean_cg_tol,
        trust_region=config.mean_trust_region,
    )
    return NGDState(loc, K_new, m_K, m_mu, state.step + 1)
