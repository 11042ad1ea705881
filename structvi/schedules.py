"""Step-size schedules, default configurations and the early-stopping rule of :func:`structvi.fit`.

A ``config`` for :class:`~structvi.fit.Fitter` is an :class:`~structvi.engine.NGDConfig` or any
callable ``accepted_steps -> NGDConfig``; :class:`TwoStage` is the one the defaults use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from structvi.engine import NGDConfig
from structvi.estimators import check_estimator

__all__ = ["Plateau", "TwoStage", "check_int", "default_config"]


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

    Args:
        lr_start: factor and mean step size of the first stage.
        switch: number of steps in the first stage (>= 0).
        lr_end: step size right after the switch.
        decay_steps: time constant ``T`` of the harmonic decay (>= 1), or ``None``.
        base: the other hyper-parameters (momentum, retraction, trust region).
    """

    lr_start: float = 1.0
    switch: int = 10
    lr_end: float = 0.05
    decay_steps: int | None = None
    base: NGDConfig = NGDConfig()

    def __post_init__(self) -> None:
        check_int("switch", self.switch, 0)
        if self.decay_steps is not None:
            check_int("decay_steps", self.decay_steps, 1)
        self.base.replace(lr=self.lr_start)  # validates both step sizes
        self.base.replace(lr=self.lr_end)

    def __call__(self, step: int) -> NGDConfig:
        """The configuration after ``step`` accepted steps."""
        if step < self.switch:
            return self.base.replace(lr=self.lr_start)
        if self.decay_steps is None:
            return self.base.replace(lr=self.lr_end)
        T = self.decay_steps
        return self.base.replace(lr=self.lr_end * T / (T + step - self.switch))


def default_config(estimator: str) -> NGDConfig | TwoStage:
    """The default ``config`` of :func:`fit` for an estimator.

    ``"hessian"``: ``NGDConfig(lr=1)`` — a Newton step for exact curvature — with the trust
    region ``c = 1`` (MATH §2.6: needed from ``K = I`` on stiff targets) and no momentum.
    ``"stein"``/``"reparam"``: ``TwoStage(1.0, 10, 1.0, decay_steps=10)``, i.e. ``lr = 1`` for
    ten steps and ``lr = 10/t`` afterwards (a harmonic decay that averages the Monte-Carlo
    noise), with the same trust region and no momentum (MATH §2.6 reports divergence with
    momentum 0.9 and large steps).
    With a temperature ``τ ≠ 1`` the Newton step is ``lr = 1/τ``; ``lr = 1`` then converges
    linearly at rate ``|1 − τ|``.

    Args:
        estimator: estimator name.

    Returns:
        An :class:`NGDConfig` or a :class:`TwoStage` schedule.
    """
    check_estimator(estimator)
    if estimator == "hessian":
        return NGDConfig(lr=1.0, momentum=0.0, trust_region=1.0)
    return TwoStage(lr_start=1.0, switch=10, lr_end=1.0, decay_steps=10)


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
