r"""``fit``: structured Gaussian VI as a thin loop over the engine (DESIGN.md "Data flow").

Each step gathers statistics with an estimator (:mod:`structvi.estimators`), proposes the pure
:func:`structvi.engine.step`, lets the step rule (:mod:`structvi._fit_rules`) accept it,
backtrack it or reject it, and writes the accepted state back. The objective (MATH (2.1)) is

.. math:: \mathcal L(q) = \mathbb E_q[\log p(z, \mathcal D)] + \tau\,\mathbb H[q],

the ELBO for ``τ = 1``, with ``log_joint(Z)`` returning ``log p(z_s, D)`` for each row of ``Z``
(shape ``(n, d) → (n,)``).

**Minibatches.** To fit on a minibatch ``B`` of ``N`` data points, make ``log_joint`` return the
unbiased full-data estimate ``(N/|B|) Σ_{i∈B} log p(y_i | z) + log p(z)``. The default step rule
compares two calls of ``log_joint`` within a step: draw the minibatch once per step, or pass
``step_rule=StepRule(accept="deferred")``, which judges each step at the next step's estimate
(one call per step, new minibatches allowed; :mod:`structvi._fit_deferred`).

**Step rule, faults, precision** (exactly: docs/vi_step_rules.md and :mod:`structvi._fit_rules`).
A step is accepted when a common-random-number estimate of its ELBO change is not clearly
negative, else backtracked (mean and factor steps halved); non-finite samples are dropped with
their antithetic partners (``history["dropped"]``); a step with no finite sample or no accepted
backtrack fails with the state unchanged, and ``max_consecutive_skips`` failures in a row stop the
fit (``"non_finite"`` naming the value, or ``"rejected"``) with the last accepted ``q``. A fit
that falls far below its best stops ``"diverged"`` with the best ``q``; ``"plateau"`` is never
reported for it. An exception from ``log_joint``, the callback or a schedule carries the result
so far as ``err.fit_result``. Mean, momenta, statistics, line search and acceptance test run in
float32 or wider; only the stored factor keeps a low-precision dtype. The whole step, ELBO monitor
included, is matrix products only (``log|det K|`` is tracked through the retractions).

**Step sizes** (docs/vi_defaults.md). The engine caps the factor step by its trust region; the
default configuration (:func:`structvi.schedules.default_config`) gives each structure a factor
step size that converges for it (1, a Newton step, for the dense, triangular and block families;
0.5 for Toeplitz; 0.9 for Kronecker) and takes the mean step by a few conjugate-gradient
iterations with Hessian-vector products of the target at the mean, preconditioned by ``K Kᵀ`` and
bounded by a trust region of 5 standard deviations of ``q``; for ``d ≤ 64`` that Hessian is formed
by one batched backward pass and reused while the mean stays within half a standard deviation in
its metric (:mod:`structvi._fit_curvature`). With ``mean_cg_iters = 0`` the
fitter instead caps the plain mean step by an exact line search on the local quadratic model
(:func:`structvi.engine.mean_solver.mean_line_search`), which leaves a Newton step unchanged.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from structvi import distributed, engine
from structvi._fit_curvature import MeanCurvature
from structvi._fit_deferred import DeferredCheck, Reference, summarize
from structvi._fit_history import History
from structvi._fit_rules import StepRule, propose
from structvi._fit_types import STOP_REASONS, FitResult, FitStopped, StepRecord
from structvi._fit_state import check_fitter_args as _check_fitter_args
from structvi._fit_state import check_config as _check_config
from structvi._fit_state import make_generator as _make_generator
from structvi._fit_state import apply_state_dict, check_state_dict, fitter_state_dict
from structvi._fit_state import failure_text as _failure_text
from structvi._fit_state import widest as _work_dtype
from structvi.engine import NGDConfig, NGDState
from structvi.engine.mean_solver import mean_line_search
from structvi.estimators import (
    DEFAULT_NUM_SAMPLES, Estimate, LogJoint, check_estimator, elbo, estimate,
)
from structvi.gaussian import StructuredGaussian
from structvi.schedules import Plateau, StructureDefault, TwoStage, check_int, default_config
from structvi.structures import structure_from_spec

__all__ = [
    "FitResult", "FitStopped", "Fitter", "Plateau", "StepRecord", "StepRule", "TwoStage",
    "default_config", "elbo", "fit",
]
# ``Plateau``, ``TwoStage``, ``default_config`` live in :mod:`structvi.schedules`, ``elbo`` in
# :mod:`structvi.estimators` and ``StepRule`` in :mod:`structvi._fit_rules`; they are
# re-exported here as part of the ``fit`` API.

ConfigArg = NGDConfig | Callable[[int], NGDConfig] | None
_LOG_2PI_E = 1.0 + math.log(2 * math.pi)


class Fitter:
    """Resumable structured-Gaussian VI: :meth:`step`, :meth:`run`, :meth:`state_dict`.

    Args:
        log_joint: ``log p(z, D)`` for a batch of points, ``(n, d) → (n,)`` (module doc: how to
            scale a minibatch estimate).
        q: starting :class:`StructuredGaussian` (unbatched); its structure and dtypes are kept.
        config: an :class:`NGDConfig`, a schedule ``accepted_steps -> NGDConfig``, or ``None``
            for :func:`default_config` of the estimator.
        estimator: ``"stein"`` (default), ``"hessian"`` or ``"reparam"``
            (:mod:`structvi.estimators`).
        num_samples: points per estimate (``None``: 16 for stein/reparam, 2 for hessian).
        generator: source of all randomness (``None``: a fresh, non-deterministically seeded one).
        temperature: ``τ`` of MATH (2.1); overrides ``config.temperature``.
        max_consecutive_skips: failed steps in a row after which :meth:`step` raises
            :class:`FitStopped` (and :meth:`run` stops).
        step_rule: the acceptance rule's settings (:class:`StepRule`; ``None``: the default).
        process_group: data-parallel VI (:mod:`structvi.distributed`): ``log_joint`` is this
            rank's shard and the ranks' estimates are all-reduced; ``None`` uses an initialized
            default group of more than one rank, ``False`` none, or a ``ProcessGroup`` /
            :class:`~structvi.distributed.DataParallelVI`.

    Raises:
        TypeError: ``log_joint`` not callable, ``q`` not a StructuredGaussian, bad ``config``,
            ``generator`` or ``step_rule`` type.
        ValueError: batched ``q``, bad ``estimator``, ``num_samples``, ``temperature`` or
            ``max_consecutive_skips``.
    """

    def __init__(
        self,
        log_joint: LogJoint,
        q: StructuredGaussian,
        config: ConfigArg = None,
        *,
        estimator: str = "stein",
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        max_consecutive_skips: int = 10,
        process_group: Any = None,
        step_rule: StepRule | None = None,
    ) -> None:
        _check_fitter_args(log_joint, q, temperature, step_rule)
        self.estimator = check_estimator(estimator)
        self.num_samples = DEFAULT_NUM_SAMPLES[estimator] if num_samples is None else num_samples
        check_int("num_samples", self.num_samples, 2 if estimator != "reparam" else 1)
        if estimator != "reparam" and self.num_samples % 2:
            raise ValueError(f"num_samples must be even for the antithetic {estimator!r} "
                             f"estimator, got num_samples={self.num_samples}")
        self.max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips, 1)
        self.log_joint = log_joint
        self.temperature = float(temperature)
        self.step_rule = StepRule() if step_rule is None else step_rule
        self._config = default_config(estimator) if config is None else _check_config(config)
        self.generator = _make_generator(generator, q.loc.device)
        self.point_dtype = q.loc.dtype
        self.factor_dtype = q.factor.dtype
        self.work_dtype = _work_dtype(q.loc.dtype, q.factor.dtype)
        # Structures are immutable (every op returns a new one), so sharing q's tensors is safe.
        factor = structure_from_spec({k: t.detach() for k, t in q.factor.tensors().items()},
                                     q.factor.spec())
        loc = q.loc.detach().to(self.work_dtype, copy=True)
        self.state: NGDState = engine.init(loc, factor, momentum_dtype=self.work_dtype)
        self.record = History()
        self.iteration = 0
        self.elapsed = 0.0
        self.step_scale = 1.0
        self._warned = False
        # data parallelism (structvi.distributed): same start on every rank, reduced estimates
        self.data_parallel = distributed.resolve(process_group)
        if self.data_parallel is not None:
            self.state = self.data_parallel.broadcast_state(self.state, self.generator)
        self._logdet_factor: Any = None
        self._logdet = 0.0
        self._sync_logdet()
        self.curvature = MeanCurvature()
        self.deferred = DeferredCheck()  # StepRule(accept="deferred"): the step being judged
        self._deferred_state: NGDState | None = None  # the state the last step wrote

    # ------------------------------------------------------------------ views
    @property
    def q(self) -> StructuredGaussian:
        """The current distribution (mean in the starting ``q``'s dtype)."""
        return StructuredGaussian(self.state.loc.to(self.point_dtype), self.state.factor)

    @property
    def history(self) -> dict[str, list[float]]:
        """The recorded steps (:class:`structvi._fit_history.History` ``lists``)."""
        return self.record.lists

    @property
    def num_skipped(self) -> int:
        """Failed steps so far (no finite sample, or every backtrack rejected)."""
        return self.record.num_failed

    @property
    def consecutive_skips(self) -> int:
        """Failed steps since the last accepted one."""
        return self.record.consecutive_failures

    @property
    def num_dropped(self) -> int:
        """Samples dropped for non-finite values so far."""
        return self.record.num_dropped

    @property
    def log_abs_det(self) -> float:
        """``log|det K|`` of the current factor, tracked through the retractions (float64)."""
        self._sync_logdet()
        return self._logdet

    def entropy(self) -> float:
        """``H[q] = (d/2) log(2πe) + log|det K|`` from the tracked log-determinant."""
        return 0.5 * self.state.factor.dim * _LOG_2PI_E + self.log_abs_det

    def config_at(self, step: int) -> NGDConfig:
        """The :class:`NGDConfig` used for the update after ``step`` accepted steps (the default
        resolves its per-structure step size against this fitter's factor)."""
        cfg = self._config
        if isinstance(cfg, StructureDefault):
            cfg = cfg.resolve(self.state.factor)
        if not isinstance(cfg, NGDConfig):
            cfg = cfg(step)
            if not isinstance(cfg, NGDConfig):
                raise TypeError(
                    f"config schedule must return an NGDConfig, got {cfg!r} at step {step}"
                )
        if cfg.temperature != self.temperature:
            if cfg.temperature != 1.0:
                raise ValueError(
                    f"config.temperature={cfg.temperature} conflicts with temperature="
                    f"{self.temperature}; set the temperature in one place"
                )
            cfg = cfg.replace(temperature=self.temperature)
        return cfg

    def step(self, *, monitor: bool = True) -> StepRecord:
        """One step: estimate, propose, accept/backtrack (:mod:`structvi._fit_rules`), write back.

        Args:
            monitor: record the ELBO estimate of the pre-update ``q`` (the entropy comes from
                the tracked ``log|det K|``: no decomposition).

        Returns:
            The step's :class:`StepRecord` (``skipped=True`` for a failed step).

        Raises:
            FitStopped: this was the ``max_consecutive_skips``-th failed step in a row.
        """
        t0 = time.perf_counter()
        self.iteration += 1
        before = self.state
        old = self._work_state()
        estimate_fn = estimate if self.data_parallel is None else self.data_parallel.estimate
        est = estimate_fn(self.log_joint, old.loc, old.factor, estimator=self.estimator,
                          num_samples=self.num_samples, generator=self.generator,
                          temperature=self.temperature, point_dtype=self.point_dtype)
        self.record.num_dropped += est.num_dropped
        deferred = self.step_rule.accept == "deferred"
        if deferred:  # judge the last step by this estimate (structvi._fit_deferred)
            if self.state is not self._deferred_state:  # set from outside: nothing to judge
                self.deferred.clear()
            judged = summarize(None if est.stats is None else est.log_joint, self.entropy(),
                               self.temperature)
            if not self.deferred.judge(judged[0], judged[1], self.step_rule.tolerance):
                return self._undo(t0, est)
        if est.stats is None:
            return self._fail(t0, est, "non_finite", 1)
        cfg = mean_line_search(old, est, self.config_at(old.step))
        stats = est.stats
        if cfg.mean_cg_iters > 0:  # Hessian-vector products at the mean (float32 or wider)
            stats = stats._replace(hvp=self._mean_hvp(old.loc))
        prop = propose(old, stats, cfg, scale=self.step_scale, rule=self.step_rule,
                       values=est.log_joint, eps=est.eps, evaluate=self._evaluate,
                       temperature=self.temperature)
        if not prop.accepted:
            self.step_scale = prop.scale
            return self._fail(t0, est, "non_finite" if prop.state is None else "rejected",
                              prop.tries, prop.scale)
        value = math.nan
        if deferred:
            value = judged[3]
            self.deferred.arm(Reference(before, self.log_abs_det, *judged[:3], prop.scale))
        elif monitor:
            value = float(est.log_joint.double().mean())
            if self.temperature:
                value += self.temperature * self.entropy()
        self._accept(prop)
        self._deferred_state = self.state
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        if monitor:
            self.record.record(self.iteration, value, self.elapsed, est.num_dropped, prop.scale,
                               before, self._window)
        return StepRecord(self.iteration, value, False, seconds, est.num_dropped, prop.tries,
                          prop.scale)

    _window = 50  # the divergence check's window when run() has no Plateau rule

    def _work_state(self) -> NGDState:
        """The state with the mean, momenta and factor in the work dtype (a view for the step)."""
        s = self.state
        w = self.work_dtype
        self._sync_logdet()
        factor = s.factor if s.factor.dtype == w else s.factor.to(w)
        return NGDState(s.loc.to(w), factor, s.factor_momentum.to(w), s.loc_momentum.to(w), s.step)

    def _accept(self, prop: Any) -> None:
        new = prop.state
        factor = new.factor if new.factor.dtype == self.factor_dtype else new.factor.to(
            self.factor_dtype)
        self.state = new._replace(factor=factor)
        self._logdet += prop.logdet_change
        self._logdet_factor = factor
        self.record.consecutive_failures = 0
        if prop.tries > 1:
            self.record.num_backtracked += 1
        if self.step_rule.accept == "deferred":  # regrown only by steps that stood
            self.step_scale = min(1.0, prop.scale * 2.0) if self.deferred.regrow() else prop.scale
        else:
            self.step_scale = min(1.0, prop.scale * 2.0) if prop.tries == 1 else prop.scale

    def _mean_hvp(self, loc: Tensor) -> Callable[[Tensor], Tensor]:
        """``v ↦ ∇²(−log_joint)(μ) v`` for the CG mean step (:class:`MeanCurvature`: formed
        explicitly for small ``d`` and reused while the mean stays close; points in the
        target's dtype, the products in float32 or wider; data parallel: ``Σ_r w_r`` of the
        ranks' products)."""
        reduce = None if self.data_parallel is None else self.data_parallel.reduce_values
        return self.curvature.operator(self.log_joint, loc, self.point_dtype, reduce)

    def _evaluate(self, Z: Tensor) -> Tensor:
        """``log_joint`` at proposed points, without gradients, widened to the work dtype."""
        with torch.no_grad():
            values = self.log_joint(Z.to(self.point_dtype))
        values = values.detach().to(self.work_dtype)
        if self.data_parallel is not None:  # Σ_r w_r log_joint_r at the same points on all ranks
            values = self.data_parallel.reduce_values(values)
        return values

    def _sync_logdet(self) -> None:
        """Recompute ``log|det K|`` when the factor was replaced from outside (start, load,
        ``NaturalGradientSVI``): one ``logabsdet`` (a decomposition for dense-type factors)."""
        K = self.state.factor
        last = self._logdet_factor
        if last is K:
            return
        if last is not None and last.spec() == K.spec() and all(
            torch.equal(a, b) for a, b in zip(last.tensors().values(), K.tensors().values())
        ):
            self._logdet_factor = K
            return
        self._logdet = float(K.to(torch.float64).logabsdet())
        self._logdet_factor = K

    def _undo(self, t0: float, est: Estimate) -> StepRecord:
        """Deferred rule: restore the state the judged step started from, halve its scale."""
        ref = self.deferred.undo()
        self.state = self._deferred_state = ref.state
        self._logdet, self._logdet_factor = ref.log_abs_det, ref.state.factor
        self.step_scale = max(0.5 * ref.scale, 0.5**self.step_rule.max_backtracks)
        self.record.num_backtracked += 1
        return self._fail(t0, est, "non_finite" if est.stats is None else "undone", 1,
                          self.step_scale, restored=True)

    def _fail(self, t0: float, est: Estimate, reason: str, tries: int,
              scale: float = 1.0, restored: bool = False) -> StepRecord:
        self.record.num_failed += 1
        self.record.consecutive_failures += 1
        detail = _failure_text(reason, est)
        # a single undone step is routine for the deferred rule (minibatch noise before its
        # noise scale is known): warn from the second in a row
        if not self._warned and (reason != "undone" or self.record.consecutive_failures > 1):
            self._warned = True
            warnings.warn(
                f"step failed at iteration {self.iteration}: {detail}; "
                f"{'state restored to before the last step' if restored else 'state unchanged'} "
                f"(further failures are counted in Fitter.num_skipped without warning; "
                f"{self.max_consecutive_skips} in a row stop the fit)",
                RuntimeWarning, stacklevel=4 if restored else 3,
            )
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        if self.record.consecutive_failures >= self.max_consecutive_skips:
            raise FitStopped("rejected" if reason == "undone" else reason, f"{self.record.consecutive_failures} failed steps in a row "
                                     f"(last: {detail}); q is the last accepted one")
        return StepRecord(self.iteration, math.nan, True, seconds, est.num_dropped, tries, scale)

    def run(
        self,
        steps: int,
        *,
        callback: Callable[[Fitter, StepRecord], bool | None] | None = None,
        progress: bool = True,
        early_stopping: Plateau | None = Plateau(),
    ) -> FitResult:
        """Take up to ``steps`` steps; see :func:`fit` for the arguments and stopping rules.

        Returns:
            The :class:`FitResult`.

        Raises:
            Exception: whatever ``log_joint``, ``callback`` or the config schedule raised, with
                ``err.fit_result`` holding the result so far (``stopped_reason="error"``).
        """
        from structvi._fit_loop import run_loop

        return run_loop(self, steps, callback, progress, early_stopping)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: engine state, generator state, history and
        counters (tensors, numbers and strings: loads with ``torch.load(weights_only=True)``)."""
        return fitter_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (``log_joint`` and ``config`` come from ``__init__``).

        Atomic: everything is validated before anything changes; a bad state leaves the fitter
        as it was. Dtypes are not switched silently: the stored mean, momenta and factor must
        have this fitter's dtypes.

        Raises:
            ValueError: a missing or malformed entry, or the estimator, sample count,
                temperature, factor structure or dtypes differ from this fitter's.
        """
        apply_state_dict(self, check_state_dict(self, state_dict))


def fit(
    log_joint: LogJoint,
    q: StructuredGaussian,
    steps: int,
    config: ConfigArg = None,
    *,
    estimator: str = "stein",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    callback: Callable[[Fitter, StepRecord], bool | None] | None = None,
    progress: bool = True,
    early_stopping: Plateau | None = Plateau(),
    max_consecutive_skips: int = 10,
    process_group: Any = None,
    step_rule: StepRule | None = None,
) -> FitResult:
    """Fit ``q`` to ``exp(log_joint)`` by structured natural-gradient VI (MATH (2.6)).

    Args:
        log_joint: ``log p(z, D)`` for a batch of points, ``(n, d) → (n,)``; for a minibatch
            return ``(N/|B|) Σ_{i∈B} log p(y_i | z) + log p(z)`` (module doc).
        q: starting :class:`StructuredGaussian` (unbatched); its structure is kept.
        steps: maximum number of steps (>= 1).
        config: :class:`NGDConfig`, a schedule ``accepted_steps -> NGDConfig``, or ``None`` for
            :func:`default_config`.
        estimator: ``"stein"``, ``"hessian"`` or ``"reparam"``.
        num_samples: points per estimate (``None``: 16 for stein/reparam, 2 for hessian).
        generator: source of all randomness; equal generators give equal results.
        temperature: ``τ`` (1 gives the ELBO).
        callback: called as ``callback(fitter, record)`` after each step; returning ``True``
            stops the fit (``stopped_reason="callback"``).
        progress: show a tqdm bar with the ELBO.
        early_stopping: a :class:`Plateau` rule (default: window 50, ``min_delta=1e-3`` nats),
            or ``None`` to run ``steps`` steps (the divergence check still runs, window 50).
        max_consecutive_skips: failed steps in a row that stop the fit (module doc).
        step_rule: the acceptance rule's settings (:class:`StepRule`).
        process_group: data-parallel VI over ranks (see :class:`Fitter`).

    Returns:
        ``FitResult(q, history, state, stopped_reason, message)``.

    Raises:
        TypeError: ``log_joint``/``callback`` not callable, ``q`` not a StructuredGaussian.
        ValueError: ``steps < 1`` and the other argument errors of :class:`Fitter`.
        Exception: raised by ``log_joint``, ``callback`` or a schedule, with ``err.fit_result``.
    """
    check_int("steps", steps, 1)
    fitter = Fitter(log_joint, q, config, estimator=estimator, num_samples=num_samples,
                    generator=generator, temperature=temperature,
                    max_consecutive_skips=max_consecutive_skips, step_rule=step_rule,
                    process_group=process_group)
    return fitter.run(steps, callback=callback, progress=progress, early_stopping=early_stopping)
