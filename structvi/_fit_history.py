"""The fitter's record: per-step history, counters, the best state and the divergence check."""

from __future__ import annotations

import math
from typing import Any

from structvi.engine import NGDState

HISTORY_KEYS = ("iteration", "elbo", "time", "dropped", "step_scale")


class History:
    """Recorded steps and counters of a :class:`structvi.fit.Fitter`.

    Attributes:
        lists: ``{"iteration", "elbo", "time", "dropped", "step_scale"}`` — one entry per
            recorded (monitored, accepted) step: its iteration, the ELBO estimate of ``q``
            before the step, cumulative wall seconds, the samples dropped for non-finite values
            and the step scale the acceptance rule settled on.
        num_dropped: samples dropped over all steps (failed ones included).
        num_failed: steps that changed nothing (no finite sample, or every backtrack rejected).
        num_backtracked: accepted steps that needed at least one halving.
        consecutive_failures: failed steps since the last accepted one.
        best_elbo: the best window mean of the ELBO seen so far (``-inf`` before a full window).
        best_value: the best single recorded ELBO estimate.
        best_state: the engine state whose ELBO estimate was ``best_value`` (what a diverged
            fit returns).
    """

    def __init__(self) -> None:
        self.lists: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
        self.num_dropped = 0
        self.num_failed = 0
        self.num_backtracked = 0
        self.consecutive_failures = 0
        self.best_elbo = -math.inf
        self.best_value = -math.inf
        self.best_state: NGDState | None = None

    def record(self, iteration: int, elbo: float, elapsed: float, dropped: int, scale: float,
               state: NGDState, window: int) -> None:
        """Append one accepted, monitored step (``state``: the ``q`` whose ELBO was estimated)
        and update the best window and the best state."""
        for key, v in zip(HISTORY_KEYS, (iteration, elbo, elapsed, dropped, scale)):
            self.lists[key].append(float(v))
        if elbo > self.best_value:
            self.best_value, self.best_state = elbo, state
        e = self.lists["elbo"]
        if len(e) >= window:
            self.best_elbo = max(self.best_elbo, sum(e[-window:]) / window)

    def diverged(self, window: int, margin: float) -> bool:
        """Whether the last window's mean ELBO fell more than ``margin`` nats (or 10 %) below the
        best window mean: a fit that got worse is never reported as converged."""
        e = self.lists["elbo"]
        if len(e) < 2 * window or not math.isfinite(self.best_elbo):
            return False
        recent = sum(e[-window:]) / window
        return not recent >= self.best_elbo - max(margin, 0.1 * abs(self.best_elbo))

    def copy_lists(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.lists.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "lists": self.copy_lists(),
            "num_dropped": self.num_dropped,
            "num_failed": self.num_failed,
            "num_backtracked": self.num_backtracked,
            "consecutive_failures": self.consecutive_failures,
            "best_elbo": self.best_elbo,
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> History:
        """Validate and rebuild (raises ``ValueError`` naming the bad entry)."""
        h = cls()
        lists = sd.get("lists")
        if not isinstance(lists, dict):
            raise ValueError(f"state_dict['history']['lists'] must be a dict, got {lists!r}")
        lengths = set()
        for key in HISTORY_KEYS:
            values = lists.get(key, [] if key in ("dropped", "step_scale") else None)
            if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(f"state_dict history[{key!r}] must be a list of numbers")
            h.lists[key] = [float(v) for v in values]
            if values or key not in ("dropped", "step_scale"):
                lengths.add(len(values))
        if len(lengths) > 1:
            raise ValueError(f"state_dict history lists have different lengths {sorted(lengths)}")
        for key in ("num_dropped", "num_failed", "num_backtracked", "consecutive_failures"):
            v = sd.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"state_dict {key} must be an integer >= 0, got {v!r}")
            setattr(h, key, v)
        best = sd.get("best_elbo", -math.inf)
        if not isinstance(best, (int, float)) or math.isnan(best):
            raise ValueError(f"state_dict best_elbo must be a number, got {best!r}")
        h.best_elbo = float(best)
        return h
