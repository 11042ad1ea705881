r"""The deferred step rule (``StepRule(accept="deferred")``): a step is judged at the next estimate.

The common-random-number test of :mod:`structvi._fit_rules` evaluates ``log_joint`` a second
time in every step (at the proposed samples) and needs both calls to see the same data. The
deferred rule evaluates nothing extra: the next step's estimate, taken anyway at the new ``q'``
with fresh draws (and, in minibatch training, a fresh minibatch), is compared with the estimate
at the ``q`` the step started from,

.. math:: \hat L(q) = \operatorname{trim}_s \log p(z_s) + \tau\,\mathbb H[q], \qquad
          d = \hat L(q') - \hat L(q),

(``trim``: the mean without the lowest and the highest :data:`TRIM` of the values, so that one
wild sample of a heavy-tailed ``log p`` does not undo a good step: on the latent-GP Poisson model
of ``tests/vi/models.py`` the plain mean undid good steps until the step scale sat at its floor
in 5 of 5 seeds; the monitored ELBO stays the plain mean)

and the step is undone — ``q`` restored, the step scale halved (not below
``2^{−max_backtracks}``), the step counted as failed — when

.. math:: d < -\big(\text{tolerance} + \min(\max(2\,\mathrm{se}_d,\ 3\hat\sigma),\
          10\,\text{tolerance} + \text{spread} + 3\hat\sigma)\big),

with ``se_d`` the Monte-Carlo standard error of ``d`` (both estimates' per-sample values),
``spread`` the standard deviation of the per-sample values at ``q`` and ``σ̂`` a robust scale of
the noise of two estimates: ``1.4826 ×`` the median magnitude of the last :data:`WINDOW` noise
samples, once :data:`MIN_HISTORY` are known (``0`` before). Noise samples are the losses
``d < 0`` of steps that stood and, after each undone step, the difference between the estimate
at the restored ``q`` and the reference estimate at the same ``q`` — pure noise (new draws and,
in minibatch training, a new minibatch), so a rule that undoes steps learns its noise quickly
even when every loss so far was rejected. With a new minibatch per step the two estimates differ
by the minibatch noise too, which only this history shows; the progress of a fit (``d > 0``) and
the losses the rule undid stay out of it. A step whose next estimate has no finite sample is undone as well. The rule therefore
catches what ruins a fit (a diverging step, a step into a region where the model overflows, an
outlier batch that throws the factor off) at the cost of one model run per step, but it is much
weaker than the common-random-number test, which compares the same draws before and after: it
is blind to losses within the noise of two independent estimates, and on a target whose
``log p`` is heavy-tailed under ``q`` it lets ``q`` reach regions the paired test keeps it out
of (measured on the latent-GP Poisson model of ``tests/vi/models.py``, where ``exp`` overflows
far out: 3 of 5 seeds converged, 2 stopped ``"diverged"``, against 5 of 5 converged with the
default rule). Use it where that test cannot run (a ``log_joint`` that draws a
new minibatch per call) or costs too much for what it guards (minibatch training of a network,
e.g. ``examples/pyro_bnn.py``: the same accuracy and ELBO as with the default rule at 1.75× →
1.3× AutoNormal's time per step). Its draws are independent of the ones the step was computed
from, which the common-random-number test reuses.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from structvi.engine import NGDState

__all__ = ["DeferredCheck", "MIN_HISTORY", "WINDOW"]

WINDOW = 40       # differences of steps that stood, kept for the robust noise scale
MIN_HISTORY = 3   # comparisons needed before the history's scale is used
REGROW = 4        # steps that stood before the step scale doubles again
TRIM = 0.125      # fraction of the per-sample values left out at each end for the judgement
_MAD = 1.4826     # median |d| → standard deviation for Gaussian noise


@dataclass
class Reference:
    """The state a pending step started from, and its estimate."""

    state: NGDState     # stored dtypes, as the fitter keeps it
    log_abs_det: float  # the fitter's tracked log|det K| of ``state``
    value: float        # L̂(q) (nats)
    se: float           # its Monte-Carlo standard error
    spread: float       # standard deviation of the per-sample values
    scale: float        # the step scale the pending step was proposed with


def summarize(values: Tensor | None, entropy: float, temperature: float
              ) -> tuple[float, float, float, float]:
    """``(L̂_trim, se, spread, L̂)`` of one estimate's per-sample values (one host transfer):
    the judged value uses the mean of the values with the lowest and the highest
    :data:`TRIM` of them left out (``se``, ``spread`` of those too), the monitored ``L̂`` the
    plain mean; ``(-inf, inf, inf, -inf)`` when there is no finite sample."""
    bad = (-math.inf, math.inf, math.inf, -math.inf)
    if values is None or values.numel() == 0:
        return bad
    v = values.double().sort().values
    n = v.shape[0]
    k = int(TRIM * n) if n - 2 * int(TRIM * n) >= 2 else 0
    kept = v[k:n - k]
    if kept.shape[0] > 1:
        trim, sd, mean = torch.stack([kept.mean(), kept.std(), v.mean()]).tolist()
    else:
        trim = mean = float(v[0])
        sd = math.inf
    if not (math.isfinite(trim) and math.isfinite(mean)):
        return bad
    h = temperature * entropy
    return trim + h, sd / math.sqrt(kept.shape[0]), sd, mean + h


class DeferredCheck:
    """Book-keeping of the deferred rule for one :class:`structvi.fit.Fitter` (module doc)."""

    def __init__(self) -> None:
        self.reference: Reference | None = None
        self.history: deque[float] = deque(maxlen=WINDOW)
        self.revisit: float | None = None  # L̂ of the state an undone step was restored to
        self.streak = 0  # steps that stood since the last undone one or the last regrowth

    def noise_scale(self) -> float:
        """``σ̂``: ``1.4826 ×`` the median ``|d|`` of the recent losses ``d < 0`` of steps that
        stood (0 before :data:`MIN_HISTORY` of them)."""
        h = sorted(-x for x in self.history if x < 0)
        if len(h) < MIN_HISTORY:
            return 0.0
        mid = len(h) // 2
        med = h[mid] if len(h) % 2 else 0.5 * (h[mid - 1] + h[mid])
        return _MAD * med

    def judge(self, value: float, se: float, tolerance: float) -> bool:
        """Whether the pending step (if any) stands, given ``L̂(q')`` and its ``se``."""
        ref = self.reference
        if ref is None:
            if self.revisit is not None and math.isfinite(value):  # same q again: pure noise
                self.history.append(-abs(value - self.revisit))
            self.revisit = None
            return True
        if not math.isfinite(value):
            return False
        d = value - ref.value
        sigma = self.noise_scale()
        se_d = math.sqrt(se * se + ref.se * ref.se) if math.isfinite(se) else math.inf
        cap = 10.0 * tolerance + (ref.spread if math.isfinite(ref.spread) else 0.0) + 3 * sigma
        allowance = tolerance + min(max(2.0 * se_d, 3.0 * sigma), cap)
        if d < -allowance:
            self.streak = 0
            return False
        self.history.append(d)
        self.streak += 1
        self.reference = None  # judged: it stands
        return True

    def regrow(self) -> bool:
        """Whether the step scale may double now: after :data:`REGROW` steps in a row stood
        (an undone step is only seen one step late, so doubling after every step would
        alternate between a scale that fails and its half)."""
        if self.streak >= REGROW:
            self.streak = 0
            return True
        return False

    def arm(self, reference: Reference) -> None:
        """Remember the state a just-taken step started from."""
        self.reference = reference

    def undo(self) -> Reference:
        """The pending step's reference, forgotten (its estimate kept as a noise reference)."""
        ref = self.reference
        self.reference, self.revisit = None, ref.value
        return ref

    def clear(self) -> None:
        """Forget the pending step (e.g. after the state was set from outside)."""
        self.reference = self.revisit = None

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any] | None:
        """Plain tensors and numbers (``torch.load(weights_only=True)``-safe); ``None`` if
        nothing is pending and no history is kept."""
        if self.reference is None and not self.history and self.revisit is None:
            return None
        ref = self.reference
        return {
            "history": list(self.history), "revisit": self.revisit,
            "reference": None if ref is None else {
                "engine": ref.state.state_dict(), "log_abs_det": ref.log_abs_det,
                "value": ref.value, "se": ref.se, "spread": ref.spread, "scale": ref.scale},
        }

    @staticmethod
    def check_state(sd: Any, dim: int) -> dict[str, Any] | None:
        """Validate :meth:`state_dict` output for a fitter of ``dim`` coordinates."""
        if sd is None:
            return None
        if not isinstance(sd, dict) or not isinstance(sd.get("history"), list) or \
                "reference" not in sd:
            raise ValueError(f"state_dict deferred must be None or a dict with 'history' and "
                             f"'reference', got {sd!r}")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                   for x in sd["history"]):
            raise ValueError(f"state_dict deferred history must be numbers, got "
                             f"{sd['history']!r}")
        revisit = sd.get("revisit")
        if revisit is not None and (isinstance(revisit, bool)
                                    or not isinstance(revisit, (int, float))):
            raise ValueError(f"state_dict deferred revisit must be None or a number, got "
                             f"{revisit!r}")
        ref = sd["reference"]
        if ref is None:
            return {"history": sd["history"], "reference": None, "revisit": revisit}
        try:
            state = NGDState.from_state_dict(ref["engine"])
            numbers = {k: float(ref[k]) for k in ("log_abs_det", "value", "se", "spread",
                                                  "scale")}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"state_dict deferred reference is malformed: {err}") from err
        if state.loc.shape != (dim,):
            raise ValueError(f"state_dict deferred reference has a mean of shape "
                             f"{tuple(state.loc.shape)}, expected ({dim},)")
        if not 0 < numbers["scale"] <= 1:
            raise ValueError(f"state_dict deferred reference scale must be in (0, 1], got "
                             f"{numbers['scale']!r}")
        return {"history": sd["history"], "reference": Reference(state, **numbers),
                "revisit": revisit}

    def load(self, parsed: dict[str, Any] | None) -> None:
        """Install the output of :meth:`check_state`."""
        self.history.clear()
        self.reference = self.revisit = None
        if parsed is not None:
            self.history.extend(parsed["history"])
            self.reference, self.revisit = parsed["reference"], parsed["revisit"]
