"""Step-size schedules, default configurations and the early-stopping rule of :func:`structvi.fit`.

A ``config`` for :class:`~structvi.fit.Fitter` is an :class:`~structvi.engine.NGDConfig` or any
callable ``accepted_steps -> NGDConfig``; :class:`TwoStage` is the one the defaults use, with a
factor step size per structure (:func:`default_config`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from structvi.engine import NGDConfig
from structvi.estimators import check_estimator
from structvi.structures import Structure, make_structure

__all__ = ["Plateau", "StructureDefault", "TwoStage", "check_int", "default_config"]


def check_int(name: str, value: Any, low: int) -> int:
    """Validate an integer argument; the message names the argument, value and bound."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")
    return value


@dataclass(frozen=True)
class TwoStage:
    """A step-size schedule: ``lr_start`` for ``switch`` accepted steps, then ``lr_end``, decayed.

    After the switch, step ``t`` uses ``lr_end · T / (T + t − switch)`` with
    ``T = decay_steps`` (constant ``lr_end`` when ``decay_steps`` is ``None``). The large first
    stage moves from the starting ``q`` to the target's scale in a few trust-region-capped
    steps; the second stage averages the estimator's noise: the stationary spread of a
    stochastic fit grows with ``lr / num_samples``, and a harmonic decay (Robbins–Monro) makes
    the factor a running average of all curvature estimates. Use it as ``config``.

    The mean has its own schedule when ``lr_mean`` is set: ``lr_mean`` until the switch, then
    ``lr_mean · T_μ / (T_μ + t − switch)`` with ``T_μ = mean_decay_steps`` (constant when
    ``None``). Decoupling matters for sparse structures: a mean step that shares the factor's
    ``10/t`` decay freezes long before a preconditioned iteration has converged.

    Args:
        lr_start: factor step size of the first stage (and the mean's, unless ``lr_mean``).
        switch: number of steps in the first stage (>= 0).
        lr_end: factor step size right after the switch.
        decay_steps: time constant ``T`` of the harmonic decay (>= 1), or ``None``.
        base: the other hyper-parameters (momentum, retraction, trust regions, CG mean step).
        lr_mean: the mean's step size, decoupled from the factor's; ``None``: ``base.lr_mean``
            (constant) if set, else the mean follows the factor's schedule.
        mean_decay_steps: time constant ``T_μ`` of the mean's decay after the switch (>= 1), or
            ``None`` for a constant ``lr_mean``.
    """

    lr_start: float = 1.0
    switch: int = 10
    lr_end: float = 0.05
    decay_steps: int | None = None
    base: NGDConfig = NGDConfig()
    lr_mean: float | None = None
    mean_decay_steps: int | None = None

    def __post_init__(self) -> None:
        check_int("switch", self.switch, 0)
        if self.decay_steps is not None:
            check_int("decay_steps", self.decay_steps, 1)
        if self.mean_decay_steps is not None:
            check_int("mean_decay_steps", self.mean_decay_steps, 1)
        self.base.replace(lr=self.lr_start)  # validates both step sizes
        self.base.replace(lr=self.lr_end, lr_mean=self.lr_mean)

    @staticmethod
    def _decayed(value: float, steps: int | None, t: int) -> float:
        return value if steps is None else value * steps / (steps + t)

    def __call__(self, step: int) -> NGDConfig:
        """The configuration after ``step`` accepted steps."""
        if step < self.switch:
            lr, lr_mean = self.lr_start, self.lr_mean
        else:
            t = step - self.switch
            lr = self._decayed(self.lr_end, self.decay_steps, t)
            lr_mean = None if self.lr_mean is None else self._decayed(
                self.lr_mean, self.mean_decay_steps, t)
        if lr_mean is None:  # the mean follows the factor (or base.lr_mean, if set)
            return self.base.replace(lr=lr)
        return self.base.replace(lr=lr, lr_mean=lr_mean)


#: Conjugate-gradient iterations of the default mean step (docs/vi_defaults.md: chosen by
#: ``benchmarks/sparse_convergence.py``).
DEFAULT_MEAN_CG_ITERS = 20
#: Forcing term of the default CG mean step: each step reduces its residual tenfold.
DEFAULT_MEAN_CG_TOL = 0.1
#: Default mean trust region: at most 5 standard deviations of q per step. Newton steps with the
#: Hessian at the mean overshoot catastrophically on non-Gaussian targets (AR(5) and log-log
#: regressions with a log-scale latent: |μ| → 1e27; the latent-GP Poisson model diverged in 3 of
#: 3 seeds at 30 sd, converged in 3 of 3 at 5 sd); the collinear regression still converges in
#: 1000 steps at 5 sd (docs/vi_defaults.md).
DEFAULT_MEAN_TRUST_REGION: float | None = 5.0
#: Decay time constant of the default mean step size after the switch.
DEFAULT_MEAN_DECAY_STEPS = 100


def default_config(
    estimator: str, structure: Structure | None = None
) -> NGDConfig | TwoStage | StructureDefault:
    """The default ``config`` of :func:`fit` for an estimator and a factor structure.

    Factor step size ``s = structure.default_step_size()``: 1 for the structures where a step
    of size 1 with exact curvature is a Newton step (dense, triangular, block-diagonal,
    diagonal, low-rank, hierarchical: ``structure.is_newton()``), 0.5 for
    ``triangular_toeplitz`` (1 oscillates), 0.9 for ``kronecker`` (linear convergence either
    way), the smallest block's for ``block_sites``.

    * ``"hessian"``: ``NGDConfig(lr=s)`` — for Newton structures a Newton step for exact
      curvature — with the factor trust region ``c = 1`` (MATH §2.6: needed from ``K = I`` on
      stiff targets) and no momentum.
    * ``"stein"``/``"reparam"``: ``TwoStage(s, 10, s, decay_steps=10)``, i.e. ``lr = s`` for
      ten steps and ``lr = 10 s/t`` afterwards (a harmonic decay that averages the Monte-Carlo
      noise), with the same trust region and no momentum (MATH §2.6 reports divergence with
      momentum 0.9 and large steps). The mean has its own schedule: ``lr_mean = 1`` with a
      slower decay ``100/(100 + t − 10)`` after the switch.

    Every default takes its mean step by up to :data:`DEFAULT_MEAN_CG_ITERS` conjugate-gradient
    iterations (stopping at a tenfold residual reduction, :data:`DEFAULT_MEAN_CG_TOL`)
    preconditioned by ``K Kᵀ`` with Hessian-vector products of the target at the
    mean (:mod:`structvi.engine.mean_solver`), inside a trust region of
    :data:`DEFAULT_MEAN_TRUST_REGION` standard deviations of ``q``. The measurements behind
    these choices are in ``docs/vi_defaults.md``.
    With a temperature ``τ ≠ 1`` the Newton step is ``lr = 1/τ``; ``lr = 1`` then converges
    linearly at rate ``|1 − τ|``.

    Args:
        estimator: estimator name.
        structure: the factor (or ``None``: a :class:`StructureDefault` that
            :class:`~structvi.fit.Fitter` resolves against its factor).

    Returns:
        An :class:`NGDConfig` or a :class:`TwoStage` schedule (a :class:`StructureDefault`
        without ``structure``).
    """
    check_estimator(estimator)
    if structure is None:
        return StructureDefault(estimator)
    if not isinstance(structure, Structure):
        raise TypeError(f"structure must be a Structure or None, got structure={structure!r}")
    s = structure.default_step_size()
    base = _default_base().replace(lr=s)
    if estimator == "hessian":
        return base.replace(lr_mean=1.0)
    return TwoStage(lr_start=s, switch=10, lr_end=s, decay_steps=10, base=base, lr_mean=1.0,
                    mean_decay_steps=DEFAULT_MEAN_DECAY_STEPS)


def _default_base() -> NGDConfig:
    """The hyper-parameters the defaults share (step sizes are set per structure)."""
    return NGDConfig(lr=1.0, momentum=0.0, trust_region=1.0,
                     mean_cg_iters=DEFAULT_MEAN_CG_ITERS, mean_cg_tol=DEFAULT_MEAN_CG_TOL,
                     mean_trust_region=DEFAULT_MEAN_TRUST_REGION)


@dataclass(frozen=True)
class StructureDefault:
    """The default configuration of an estimator, before the factor's structure is known.

    :class:`~structvi.fit.Fitter` resolves it with :meth:`resolve` against its factor (the
    per-structure step size of :func:`default_config`). Called directly with a step, it uses
    step size 1 (the Newton structures' default).

    Args:
        estimator: estimator name.
        base: the hyper-parameters other than the step sizes (momentum, trust regions, CG
            mean step, temperature; ``None``: the defaults'). A ``base.lr_mean`` that is set is
            kept as a constant mean step size.
    """

    estimator: str
    base: NGDConfig | None = None

    def __post_init__(self) -> None:
        check_estimator(self.estimator)
        if self.base is None:
            object.__setattr__(self, "base", _default_base())
        elif not isinstance(self.base, NGDConfig):
            raise TypeError(f"base must be an NGDConfig or None, got base={self.base!r}")

    def resolve(self, structure: Structure) -> NGDConfig | TwoStage:
        """``default_config(estimator, structure)`` with this ``base``."""
        cfg = default_config(self.estimator, structure)
        user_mean = self.base.lr_mean
        if isinstance(cfg, NGDConfig):
            return self.base.replace(lr=cfg.lr, lr_mean=cfg.lr_mean if user_mean is None
                                     else user_mean)
        return dataclasses.replace(cfg, base=self.base.replace(lr=cfg.lr_start),
                                   lr_mean=cfg.lr_mean if user_mean is None else None)

    def __call__(self, step: int) -> NGDConfig:
        """The configuration after ``step`` accepted steps for a Newton structure."""
        cfg = self.resolve(_NEWTON)
        return cfg if isinstance(cfg, NGDConfig) else cfg(step)


@dataclass(frozen=True)
class Plateau:
    """Early stopping rule: stop once the ELBO no longer improves.

    After each recorded step with at least ``2·window`` ELBO values, stop when
    ``mean(last window) − mean(window before) < min_delta`` (nats). Averaging over windows
    makes the rule robust to Monte-Carlo noise in the per-step ELBO estimates.

    Args:
        window: number of steps per window (>= 1).
        min_delta: smallest improvement, in nats, that counts as progress.
    """

    window: int = 50
    min_delta: float = 1e-3

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got window={self.window!r}")
        if not isinstance(self.min_delta, (int, float)) or not math.isfinite(self.min_delta):
            raise ValueError(f"min_delta must be a finite number, got min_delta={self.min_delta!r}")

    def should_stop(self, elbos: list[float]) -> bool:
        """Whether the rule fires for this ELBO history."""
        w = self.window
        if len(elbos) < 2 * w:
            return False
        recent = sum(elbos[-w:]) / w
        before = sum(elbos[-2 * w : -w]) / w
        return recent - before < self.min_delta


_NEWTON = make_structure("diagonal", 1)  # any Newton structure: its default step size is 1
