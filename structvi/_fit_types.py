"""Result types of :mod:`structvi.fit`: ``StepRecord``, ``FitResult``, ``FitStopped``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from structvi.gaussian import StructuredGaussian

STOP_REASONS = ("steps", "plateau", "non_finite", "rejected", "diverged", "interrupted",
                "callback", "error")


class StepRecord(NamedTuple):
    """What one :meth:`Fitter.step` did.

    Attributes:
        iteration: 1-based count of attempted steps (failed ones included).
        elbo: ELBO estimate of ``q`` *before* the update from the step's kept samples
            (``nan`` if the step failed or was not monitored).
        skipped: whether the step failed (state unchanged).
        seconds: wall time of the step.
        dropped: samples dropped for non-finite values (with their antithetic partners).
        tries: proposals the step rule evaluated (1: accepted at once).
        step_scale: the step scale of the last proposal (1: the configured step).
    """

    iteration: int
    elbo: float
    skipped: bool
    seconds: float
    dropped: int = 0
    tries: int = 1
    step_scale: float = 1.0


class FitResult(NamedTuple):
    """Result of :func:`fit`.

    Attributes:
        q: the fitted distribution: the last accepted one, or for ``"diverged"`` the best one.
        history: ``{"iteration", "elbo", "time", "dropped", "step_scale"}`` lists, one entry per
            recorded step (``time`` is cumulative wall seconds).
        state: :meth:`Fitter.state_dict` of the final state (resume with ``load_state_dict``).
        stopped_reason: one of ``"steps"``, ``"plateau"``, ``"non_finite"``, ``"rejected"``,
            ``"diverged"``, ``"interrupted"``, ``"callback"``, ``"error"``.
        message: a sentence saying why the fit stopped (empty for ``"steps"``).
    """

    q: StructuredGaussian
    history: dict[str, list[float]]
    state: dict[str, Any]
    stopped_reason: str
    message: str = ""


class FitStopped(RuntimeError):
    """Raised by :meth:`Fitter.step` after ``max_consecutive_skips`` failed steps in a row.

    The fitter keeps the last accepted state. Attributes: ``reason`` (``"non_finite"`` or
    ``"rejected"``) and the message.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
