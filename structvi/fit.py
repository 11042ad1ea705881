r"""``fit``: structured Gaussian VI as a thin loop over the engine (DESIGN.md "Data flow").

Each step gathers statistics with an estimator (:mod:`structvi.estimators`), calls the pure
:func:`structvi.engine.step` and writes the new state back. The objective (MATH (2.1)) is

.. math:: \mathcal L(q) = \mathbb E_q[\log p(z, \mathcal D)] + \tau\,\mathbb H[q],

the ELBO for ``τ = 1``, with ``log_joint(Z)`` returning ``log p(z_s, D)`` for each row of ``Z``
(shape ``(n, d) → (n,)``).

**Minibatches.** To fit on a minibatch ``B`` of ``N`` data points, make ``log_joint`` return the
unbiased full-data estimate ``(N/|B|) Σ_{i∈B} log p(y_i | z) + log p(z)``. The estimators stay
unbiased (they are linear in ``log_joint``); the recorded ELBO becomes noisier.

**Faults.** A step whose log-joint values, statistics or resulting state are not finite is
skipped: the state is unchanged (the generator has moved on, so the next try uses new samples),
the skip is counted in :attr:`Fitter.num_skipped` and the first one warns. After
``max_consecutive_skips`` consecutive skips (default 10) :func:`fit` stops with
``stopped_reason="non_finite"`` and returns the last finite ``q``. ``Ctrl-C`` stops with
``stopped_reason="interrupted"`` and returns the last completed step. Nothing is lost either way:
``FitResult.state`` resumes the run with :meth:`Fitter.load_state_dict`.

**Step sizes.** The engine caps the factor step by its trust region (MATH §2.6); the fitter caps
the mean step size by an exact line search on the local quadratic model
(:func:`_mean_line_search`), which keeps the mean from overshooting while the factor adapts and
for sparse structures, and leaves a Newton step unchanged.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from structvi import engine
from structvi.engine import NGDConfig, NGDState
from structvi.estimators import (
    DEFAULT_NUM_SAMPLES, Estimate, LogJoint, check_estimator, elbo, estimate,
)
from structvi.gaussian import StructuredGaussian
from structvi.schedules import Plateau, StructureDefault, TwoStage, check_int, default_config
from structvi.structures import structure_from_spec

__all__ = [
    "FitResult", "Fitter", "Plateau", "StepRecord", "TwoStage", "default_config", "elbo", "fit",
]
# ``Plateau``, ``TwoStage``, ``default_config`` live in :mod:`structvi.schedules` and ``elbo`` in
# :mod:`structvi.estimators`; they are re-exported here as part of the ``fit`` API.

ConfigArg = NGDConfig | Callable[[int], NGDConfig] | None
STOP_REASONS = ("steps", "plateau", "non_finite", "interrupted", "callback")


class StepRecord(NamedTuple):
    """What one :meth:`Fitter.step` did.

    Attributes:
        iteration: 1-based count of attempted steps (skips included).
        elbo: ELBO estimate of ``q`` *before* the update from the step's samples
            (``nan`` if skipped or not monitored).
        skipped: whether the step was skipped for non-finite values.
        seconds: wall time of the step.
    """

    iteration: int
    elbo: float
    skipped: bool
    seconds: float


class FitResult(NamedTuple):
    """Result of :func:`fit`.

    Attributes:
        q: the fitted (last finite) distribution.
        history: ``{"iteration", "elbo", "time"}`` lists (recorded steps; ``time`` is cumulative
            wall seconds).
        state: :meth:`Fitter.state_dict` of the final state (resume with ``load_state_dict``).
        stopped_reason: ``"steps"``, ``"plateau"``, ``"non_finite"``, ``"interrupted"`` or
            ``"callback"``.
    """

    q: StructuredGaussian
    history: dict[str, list[float]]
    state: dict[str, Any]
    stopped_reason: str


def _is_finite_state(state: NGDState) -> bool:
    tensors = [state.loc, *state.factor.tensors().values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _is_finite_estimate(values: Tensor, stats: engine.NGDStats) -> bool:
    tensors = [values, stats.grad, *stats.curvature.tensors().values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _mean_line_search(state: NGDState, est: Estimate, cfg: NGDConfig) -> NGDConfig:
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
    and the cap is not applied.
    """
    if cfg.mean_cg_iters > 0:
        return cfg
    acc = engine.accumulation_dtype(state.loc.dtype, state.factor.dtype)
    K = state.factor.to(acc) if state.factor.dtype != acc else state.factor
    g = est.stats.grad.to(acc)
    m_mu = cfg.alpha_mean * state.loc_momentum.to(acc) + g
    u = K.rmatmul(m_mu)
    slope = float(K.rmatmul(g) @ u)
    norm = float(u.norm())
    if not (slope > 0 and math.isfinite(slope) and math.isfinite(norm)):
        return cfg.replace(lr_mean=0.0)  # uphill, g = 0, or not finite: no mean step this time
    curv = float(est.quad_form(u / norm)) * norm * norm
    if not math.isfinite(curv):
        return cfg.replace(lr_mean=0.0)
    if not curv > 0 or slope >= cfg.beta_mean * curv:  # no curvature information, or no cap
        return cfg
    return cfg.replace(lr_mean=slope / curv)


def _check_config(config: Any) -> ConfigArg:
    if config is None or isinstance(config, NGDConfig) or callable(config):
        return config
    raise TypeError(
        f"config must be an NGDConfig, a callable step -> NGDConfig, or None, got "
        f"config={config!r}"
    )


def _make_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is None:
        gen = torch.Generator(device=device)
        gen.seed()  # non-deterministic; pass a seeded generator for reproducible runs
        return gen
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got generator={generator!r}")
    return generator


class Fitter:
    """Resumable structured-Gaussian VI: :meth:`step`, :meth:`run`, :meth:`state_dict`.

    Args:
        log_joint: ``log p(z, D)`` for a batch of points, ``(n, d) → (n,)`` (module doc: how to
            scale a minibatch estimate).
        q: starting :class:`StructuredGaussian` (unbatched); its structure is kept.
        config: an :class:`NGDConfig`, a schedule ``accepted_steps -> NGDConfig``, or ``None``
            for :func:`default_config` of the estimator.
        estimator: ``"stein"`` (default), ``"hessian"`` or ``"reparam"``
            (:mod:`structvi.estimators`).
        num_samples: points per estimate (``None``: 16 for stein/reparam, 2 for hessian).
        generator: source of all randomness (``None``: a fresh, non-deterministically seeded one).
        temperature: ``τ`` of MATH (2.1); overrides ``config.temperature``.
        max_consecutive_skips: consecutive non-finite steps after which :meth:`run` stops.

    Raises:
        TypeError: ``log_joint`` not callable, ``q`` not a StructuredGaussian, bad ``config`` or
            ``generator`` type.
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
    ) -> None:
        if not callable(log_joint):
            raise TypeError(
                f"log_joint must be a callable (n, d) -> (n,), got log_joint={log_joint!r}"
            )
        if not isinstance(q, StructuredGaussian):
            raise TypeError(f"q must be a StructuredGaussian, got q={type(q).__name__}")
        if q.batch_shape != torch.Size():
            raise ValueError(f"q must be unbatched (loc of shape (d,)), got batch_shape="
                             f"{tuple(q.batch_shape)}")
        self.estimator = check_estimator(estimator)
        self.num_samples = DEFAULT_NUM_SAMPLES[estimator] if num_samples is None else num_samples
        check_int("num_samples", self.num_samples, 2 if estimator != "reparam" else 1)
        if estimator != "reparam" and self.num_samples % 2:
            raise ValueError(f"num_samples must be even for the antithetic {estimator!r} "
                             f"estimator, got num_samples={self.num_samples}")
        ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
        if not (ok and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(
                f"temperature must be a finite number >= 0, got temperature={temperature!r}"
            )
        self.max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips, 1)
        self.log_joint = log_joint
        self.temperature = float(temperature)
        self._config = default_config(estimator) if config is None else _check_config(config)
        self.generator = _make_generator(generator, q.loc.device)
        # Structures are immutable (every op returns a new one), so sharing q's tensors is safe.
        factor = structure_from_spec({k: t.detach() for k, t in q.factor.tensors().items()},
                                     q.factor.spec())
        self.state: NGDState = engine.init(q.loc.detach().clone(), factor)
        self.history: dict[str, list[float]] = {"iteration": [], "elbo": [], "time": []}
        self.iteration = 0
        self.num_skipped = 0
        self.consecutive_skips = 0
        self.elapsed = 0.0
        self._warned = False

    @property
    def q(self) -> StructuredGaussian:
        """The current distribution."""
        return StructuredGaussian(self.state.loc, self.state.factor)

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
        """One update (or a skip): estimate, :func:`structvi.engine.step`, write back.

        Args:
            monitor: also record the ELBO estimate of the pre-update ``q`` (needs ``log|det K|``,
                which dense factors compute by ``slogdet``; the update itself is inverse-free).

        Returns:
            The step's :class:`StepRecord`.
        """
        t0 = time.perf_counter()
        self.iteration += 1
        old = self.state
        est = estimate(self.log_joint, old.loc, old.factor, estimator=self.estimator,
                       num_samples=self.num_samples, generator=self.generator,
                       temperature=self.temperature)
        new = None
        if _is_finite_estimate(est.log_joint, est.stats):
            cfg = _mean_line_search(old, est, self.config_at(old.step))
            stats = est.stats
            if cfg.mean_cg_iters > 0:  # Hessian-vector products at the mean (float32 or wider)
                point = old.loc.to(engine.accumulation_dtype(old.loc.dtype))[None]
                stats = stats._replace(hvp=engine.target_hvp(self.log_joint, point))
            new = engine.step(old, stats, cfg)
            new = new if _is_finite_state(new) else None
        if new is None:
            self._skip()
            seconds = time.perf_counter() - t0
            self.elapsed += seconds
            return StepRecord(self.iteration, math.nan, True, seconds)
        value = math.nan
        if monitor:
            value = float(est.log_joint.double().mean())
            if self.temperature:
                value += self.temperature * float(StructuredGaussian(old.loc, old.factor).entropy())
        self.state = new
        self.consecutive_skips = 0
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        if monitor:
            self.history["iteration"].append(float(self.iteration))
            self.history["elbo"].append(value)
            self.history["time"].append(self.elapsed)
        return StepRecord(self.iteration, value, False, seconds)

    def _skip(self) -> None:
        self.num_skipped += 1
        self.consecutive_skips += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"non-finite log_joint, gradient or update at iteration {self.iteration}: step "
                f"skipped, state unchanged (further skips are counted in Fitter.num_skipped "
                f"without warning; {self.max_consecutive_skips} in a row stop the fit)",
                RuntimeWarning,
                stacklevel=3,
            )

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
        """
        check_int("steps", steps, 1)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got callback={callback!r}")
        if early_stopping is not None and not isinstance(early_stopping, Plateau):
            raise TypeError(f"early_stopping must be a Plateau or None, got {early_stopping!r}")
        reason = "steps"
        bar = tqdm(total=steps, disable=not progress, desc=f"structvi {self.estimator}")
        try:
            reason = self._loop(steps, bar, callback, early_stopping)
        except KeyboardInterrupt:
            reason = "interrupted"
        finally:
            bar.close()
        return FitResult(self.q, {k: list(v) for k, v in self.history.items()},
                         self.state_dict(), reason)

    def _loop(self, steps: int, bar: Any, callback: Any, early_stopping: Plateau | None) -> str:
        for _ in range(steps):
            rec = self.step()
            if not rec.skipped:
                bar.set_postfix(elbo=f"{rec.elbo:.6g}", refresh=False)
            bar.update()
            if self.consecutive_skips >= self.max_consecutive_skips:
                return "non_finite"
            if callback is not None and callback(self, rec) is True:
                return "callback"
            if early_stopping is not None and not rec.skipped and early_stopping.should_stop(
                self.history["elbo"]
            ):
                return "plateau"
        return "steps"

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: engine state, generator state, history and
        counters (tensors, numbers and strings: loads with ``torch.load(weights_only=True)``)."""
        return {
            "engine": self.state.state_dict(),
            "generator": self.generator.get_state(),
            "history": {k: list(v) for k, v in self.history.items()},
            "iteration": self.iteration,
            "num_skipped": self.num_skipped,
            "consecutive_skips": self.consecutive_skips,
            "elapsed": self.elapsed,
            "estimator": self.estimator,
            "num_samples": self.num_samples,
            "temperature": self.temperature,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (``log_joint`` and ``config`` come from ``__init__``).

        Raises:
            ValueError: the estimator, sample count, temperature or factor structure differ
                from this fitter's.
        """
        for key in ("estimator", "num_samples", "temperature"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state_dict[key]!r} but this Fitter has "
                                 f"{key}={getattr(self, key)!r}")
        state = NGDState.from_state_dict(state_dict["engine"])
        if state.factor.spec() != self.state.factor.spec():
            raise ValueError(f"state_dict factor spec {state.factor.spec()} differs from this "
                             f"Fitter's {self.state.factor.spec()}")
        self.state = state
        self.generator.set_state(state_dict["generator"])
        self.history = {k: list(v) for k, v in state_dict["history"].items()}
        self.iteration = int(state_dict["iteration"])
        self.num_skipped = int(state_dict["num_skipped"])
        self.consecutive_skips = int(state_dict["consecutive_skips"])
        self.elapsed = float(state_dict["elapsed"])


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
            or ``None`` to always run ``steps`` steps.
        max_consecutive_skips: consecutive non-finite steps that stop the fit.

    Returns:
        ``FitResult(q, history, state, stopped_reason)``.

    Raises:
        TypeError: ``log_joint``/``callback`` not callable, ``q`` not a StructuredGaussian.
        ValueError: ``steps < 1`` and the other argument errors of :class:`Fitter`.
    """
    check_int("steps", steps, 1)
    fitter = Fitter(log_joint, q, config, estimator=estimator, num_samples=num_samples,
                    generator=generator, temperature=temperature,
                    max_consecutive_skips=max_consecutive_skips)
    return fitter.run(steps, callback=callback, progress=progress, early_stopping=early_stopping)
