r"""``NaturalGradientSVI``: train an :class:`AutoStructuredNormal` with the structvi engine.

The objective is the ELBO in the guide's unconstrained space ``u`` (MATH (2.1) with ``τ = 1``):

.. math:: \mathcal L(q) = \mathbb E_{q(u)}\big[\log p(x, T(u)) + \log|\det J_T(u)|\big]
          + \mathbb H[q],

``T`` the ``biject_to`` map of each site. One :meth:`NaturalGradientSVI.step` draws samples
``u_s = μ + K ε_s``, evaluates ``log p(x, T(u_s))`` by tracing the model with the sample
substituted (:mod:`structvi.pyro.log_joint`: in one particle plate, under ``vmap``, or once per
sample — detected at set-up; ``poutine.condition``; ``trace.log_prob_sum()`` applies the ``pyro.plate`` scales,
so a subsampled plate gives the unbiased full-data estimate), estimates ``E_q[∇f]`` and
``Π̂(Kᵀ Ē K)`` with :mod:`structvi.estimators` and takes one :func:`structvi.engine.step`
(through :class:`structvi.fit.Fitter`, which also skips non-finite steps). All samples of a step
share one minibatch: the plates' subsample indices are drawn once per step and replayed. A step
is judged by the common-random-number test of :mod:`structvi._fit_rules`, or with
``step_rule=StepRule(accept="deferred")`` at the next step's estimate (no second model run;
:mod:`structvi._fit_deferred`). Ordinary ``pyro.param`` sites of the model, and the other parts of an ``AutoGuideList``, are
trained in the same step by ``optim`` (a Pyro optimizer) on the Monte-Carlo estimate of
``−E_q[log p] + log q_parts``. Pyro conventions (argument names, sample counts, guide lists):
:mod:`structvi.pyro._conventions`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import zero_grads
from pyro.optim import PyroOptim
from torch import Tensor
from tqdm.auto import tqdm

from structvi.engine import NGDConfig
from structvi.estimators import DEFAULT_NUM_SAMPLES, check_estimator
from structvi.fit import Fitter, StepRule, default_config
from structvi.pyro._conventions import check_config_options, split_guide, warn_sample_count
from structvi.pyro.guides import AutoStructuredNormal
from structvi.pyro.log_joint import (_condition_and_trace, choose_vectorization,
                                     latent_log_joint, plate_nesting)

__all__ = ["NaturalGradientSVI", "latent_log_joint"]  # latent_log_joint: re-export

def _inspect_model(model, guide, args, kwargs, fixed) -> tuple[int, set[str]]:
    """One model run at the guide's mean: (max plate nesting, names of ``pyro.param`` sites)."""
    with torch.no_grad():
        values, _ = guide.constrain(guide.loc.detach())
    with poutine.block():
        trace = _condition_and_trace(model, {**fixed, **values}, None, args, kwargs)
    params = {name for name, site in trace.nodes.items() if site["type"] == "param"}
    return plate_nesting(trace), params


def _run_parts(parts: list[Any], args: tuple, kwargs: dict[str, Any]):
    """Run the non-structured parts of a guide list: their values and ``Σ log q`` (with grad)."""
    if not parts:
        return {}, 0.0
    with poutine.block(hide_types=["sample"]), poutine.trace() as capture:
        for part in parts:
            part(*args, **kwargs)
    trace = capture.trace
    values = {name: site["value"] for name, site in trace.iter_stochastic_nodes()
              if not site["infer"].get("is_auxiliary")}
    return values, trace.log_prob_sum()


def _log_joint_set_per_step(U: Tensor) -> Tensor:
    """The Fitter's initial ``log_joint``: each step installs the real one first."""
    raise RuntimeError("NaturalGradientSVI sets the Fitter's log_joint at every step; call "
                       "NaturalGradientSVI.step rather than NaturalGradientSVI.fitter.step")


def _check_num_samples(estimator: str, num_samples: int | None) -> int:
    """The estimator's default, or ``num_samples`` validated (even for antithetic ones)."""
    if num_samples is None:
        return DEFAULT_NUM_SAMPLES[estimator]
    antithetic = estimator != "reparam"
    ok = isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1
    if not ok or (antithetic and num_samples % 2):
        need = "an even integer >= 2 (antithetic pairs)" if antithetic else "an integer >= 1"
        raise ValueError(f"num_samples must be {need} for the {estimator!r} estimator, got "
                         f"num_samples={num_samples!r}")
    return num_samples


def _make_config(estimator: str, lr: float | None, momentum: float,
                 options: dict[str, Any]) -> NGDConfig | Callable[[int], NGDConfig]:
    """``NGDConfig(lr, momentum, **options)``; with ``lr=None`` the estimator's default
    (:func:`structvi.fit.default_config`: a Newton step for ``"hessian"``, a two-stage
    schedule otherwise) with ``momentum`` and ``options`` applied."""
    if lr is not None:
        return NGDConfig(lr=lr, momentum=momentum, **options)
    default = default_config(estimator)
    if isinstance(default, NGDConfig):
        return default.replace(momentum=momentum, **options)
    return dataclasses.replace(default, base=default.base.replace(momentum=momentum, **options))


class NaturalGradientSVI:
    """Structured natural-gradient VI for Pyro, used like :class:`pyro.infer.SVI`.

    Usage::

        guide = AutoStructuredNormal(model, structure="dense")
        svi = NaturalGradientSVI(model, guide, lr=0.1, num_samples=16)
        for _ in range(500):
            loss = svi.step(x, y)          # the negative ELBO estimate, a float

    Args:
        model: the Pyro model.
        guide: the :class:`AutoStructuredNormal` to train, or an ``AutoGuideList`` holding one
            (its other parts, e.g. ``AutoDelta``, are trained by ``optim``).
        lr: engine step size ``β`` (``None``: the estimator's default from
            :func:`structvi.fit.default_config`, a Newton step ``1`` for ``"hessian"`` and a
            two-stage schedule for ``"stein"``/``"reparam"``).
        momentum: engine momentum ``α`` in ``[0, 1)``.
        num_samples: Monte-Carlo points per step (``None``: 16 for ``"stein"``/``"reparam"``,
            2 for ``"hessian"``; even for the antithetic estimators).
        estimator: ``"stein"`` (gradients only), ``"hessian"`` (Hessian-vector products) or
            ``"reparam"`` (:mod:`structvi.estimators`).
        optim: a Pyro optimizer for the model's ordinary ``pyro.param``\\ s and the other parts of
            a guide list (``None``: model params stay fixed, with a warning if there are any).
        config: an :class:`~structvi.engine.NGDConfig` or a schedule ``step -> NGDConfig``
            replacing ``lr``/``momentum``/``**config_options`` (e.g. to anneal ``lr``).
        vectorize_particles: how to evaluate the samples of a step (:mod:`structvi.pyro.log_joint`):
            ``None`` (default) detects it at set-up — one model run in a particle plate if the
            model broadcasts, else :func:`torch.func.vmap` over the samples (``PyroModule``
            networks), else one run per sample with a warning; ``True``/``"plate"``,
            ``"vmap"`` or ``False``/``"loop"`` force a mode.
        max_plate_nesting: plate dims of the model (``None``: found at set-up).
        generator: source of the estimators' randomness (``None``: seeded from torch's global
            RNG, so ``pyro.set_rng_seed`` makes runs reproducible).
        process_group: data-parallel VI (:mod:`structvi.distributed`): each rank's model sees its
            shard (e.g. ``pyro.plate(..., subsample=shard)``); ``None`` uses an initialized default
            group of more than one rank, ``False`` none (passed to the :class:`Fitter`).
        step_rule: the acceptance rule (:class:`~structvi.fit.StepRule`; ``None``: the
            common-random-number test, two model runs per step on the step's minibatch).
            ``StepRule(accept="deferred")`` judges each step at the next step's estimate (one
            model run per step; weaker, see :mod:`structvi._fit_deferred`): the setting for
            minibatch training of networks, as in ``examples/pyro_bnn.py``.
        **config_options: further :class:`~structvi.engine.NGDConfig` fields (``lr_mean``,
            ``trust_region``, ``retraction``, ``temperature``, ...).

    Set-up (the first step) registers the guide's parameters in Pyro's param store (so
    ``pyro.get_param_store().save()`` holds the trained guide), warns when ``num_samples`` is far
    below what a dense or low-rank block needs, and warns once about latent sites the guide
    does not cover (e.g. added to the model after set-up: drawn from the prior, not fitted).

    Raises:
        TypeError: ``guide`` is not an :class:`AutoStructuredNormal` (or a list with one),
            ``optim`` not a ``PyroOptim``, or an unknown argument (Pyro's names, such as
            ``num_particles``, are answered with ours).
        ValueError: bad ``estimator``, ``num_samples`` or engine options.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: AutoStructuredNormal,
        lr: float | None = None,
        momentum: float = 0.0,
        num_samples: int | None = None,
        estimator: str = "stein",
        optim: PyroOptim | None = None,
        *,
        config: NGDConfig | Callable[[int], NGDConfig] | None = None,
        vectorize_particles: bool | str | None = None,
        max_plate_nesting: int | None = None,
        generator: torch.Generator | None = None,
        process_group: Any = None,
        step_rule: StepRule | None = None,
        **config_options: Any,
    ) -> None:
        check_config_options(config_options)
        self._q_guide, self._parts = split_guide(guide)
        if optim is not None and not isinstance(optim, PyroOptim):
            raise TypeError(f"optim must be a pyro.optim.PyroOptim or None, got optim={optim!r}")
        if self._parts and optim is None:
            raise ValueError(f"the AutoGuideList parts {[type(p).__name__ for p in self._parts]} "
                             f"are trained by a Pyro optimizer: pass e.g. "
                             f"optim=pyro.optim.Adam({{'lr': 0.01}})")
        if vectorize_particles not in (None, True, False, "plate", "vmap", "loop"):
            raise ValueError(f"vectorize_particles must be None (detect), True/'plate', 'vmap' "
                             f"or False/'loop', got vectorize_particles={vectorize_particles!r}")
        self.estimator = check_estimator(estimator)
        if config is not None and (lr is not None or momentum or config_options):
            raise ValueError("pass either config=... or lr/momentum/**config_options, not both")
        self.config = config if config is not None else _make_config(
            estimator, lr, momentum, config_options)
        self.num_samples = _check_num_samples(estimator, num_samples)
        self.model, self.guide, self.optim = model, guide, optim
        self.vectorize_particles = vectorize_particles
        self._max_plate_nesting = max_plate_nesting
        self._mode = "loop"
        self._warned_sites: set[str] = set()
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, ())))
        self.generator = generator
        self._fitter: Fitter | None = None
        self.process_group = process_group
        if step_rule is not None and not isinstance(step_rule, StepRule):
            raise TypeError(f"step_rule must be a structvi.fit.StepRule or None, got "
                            f"step_rule={step_rule!r}")
        self._step_rule = step_rule
        self._pending: dict[str, Any] | None = None
        # the guide's parameters (and versions) right after the last step wrote the fitter's
        # state into them: unchanged at the next step, the fitter's state is reused as it is
        self._synced: tuple | None = None
        self._nesting, self._params = 0, set()

    # ------------------------------------------------------------------ set-up
    @property
    def fitter(self) -> Fitter:
        """The underlying :class:`structvi.fit.Fitter` (after the first step)."""
        if self._fitter is None:
            raise RuntimeError("NaturalGradientSVI.fitter exists after the first step")
        return self._fitter

    def _ensure_setup(self, args: tuple, kwargs: dict[str, Any]) -> Fitter:
        if self._fitter is not None:
            return self._fitter
        guide = self._q_guide
        if self._parts:  # set up (and register in the param store) every part of the list
            with poutine.block():
                self.guide(*args, **kwargs)
        else:
            guide.setup(*args, **kwargs)
        fixed = {k: v.detach() for k, v in _run_parts(self._parts, args, kwargs)[0].items()}
        self._nesting, self._params = _inspect_model(self.model, guide, args, kwargs, fixed)
        if self._max_plate_nesting is not None:
            self._nesting = max(self._nesting, int(self._max_plate_nesting))
        if self._params and self.optim is None:
            warnings.warn(f"the model has pyro.param sites {sorted(self._params)} but optim=None:"
                          " they are not trained", UserWarning, stacklevel=3)
        warn_sample_count(guide.factor_spec(), self.num_samples, self.estimator)
        with torch.no_grad():
            q = guide.get_posterior()
        self._mode = self._choose_mode(q, args, kwargs, fixed)
        self._fitter = Fitter(
            _log_joint_set_per_step, q, self.config, estimator=self.estimator,
            num_samples=self.num_samples, generator=self.generator,
            temperature=self._temperature(),
            process_group=self.process_group, step_rule=self._step_rule,
        )
        if self._fitter.data_parallel is not None:  # every rank starts from rank 0's guide
            self.guide.set_state(self._fitter.state.loc, self._fitter.state.factor)
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        return self._fitter

    def _choose_mode(self, q: Any, args: tuple, kwargs: dict[str, Any], fixed: dict) -> str:
        """The evaluation mode: the one asked for, or detected (``vectorize_particles=None``)."""
        asked = self.vectorize_particles
        if asked is not None:
            return {True: "plate", False: "loop"}.get(asked, asked)
        with torch.no_grad():
            U = q.sample((3,), generator=torch.Generator(q.loc.device).manual_seed(0))
        mode, _ = choose_vectorization(self.model, self._q_guide, args, kwargs, U,
                                       max_plate_nesting=self._nesting, fixed=fixed)
        return mode

    @property
    def vectorization(self) -> str:
        """How the samples of a step are evaluated: ``"plate"``, ``"vmap"`` or ``"loop"``."""
        self.fitter  # noqa: B018 -- raises before set-up
        return self._mode

    def _warn_unknown(self, names: list[str]) -> None:
        new = sorted(set(names) - self._warned_sites)
        if new:
            self._warned_sites.update(new)
            warnings.warn(f"Found latent site(s) {new} in the model but not in the guide (added "
                          f"after the guide was set up?): they are drawn from the prior at every "
                          f"step and not fitted; create and set up a new guide",
                          UserWarning, stacklevel=4)

    def _temperature(self) -> float:
        cfg = self.config if isinstance(self.config, NGDConfig) else self.config(0)
        return cfg.temperature

    def _log_joint(self, args: tuple, kwargs: dict[str, Any], fixed: dict | None = None,
                   subsample: Any = None) -> Callable[[Tensor], Tensor]:
        """A fresh log-joint: one new minibatch per step, shared by all of its evaluations."""
        if fixed is None:
            fixed = {k: v.detach() for k, v in _run_parts(self._parts, args, kwargs)[0].items()}
        return latent_log_joint(self.model, self._q_guide, args, kwargs, subsample=subsample,
                                vectorize=self._mode, max_plate_nesting=self._nesting,
                                fixed=fixed, on_unknown_sites=self._warn_unknown)

    # ------------------------------------------------------------------ steps
    def step(self, *args: Any, **kwargs: Any) -> float:
        """One natural-gradient step on the guide (and one ``optim`` step on model params).

        Args:
            *args: model arguments.
            **kwargs: model keyword arguments.

        Returns:
            The negative ELBO estimate ``−(mean_s log p(x, T(u_s)) + log|J| + τ H[q])`` of the
            guide before the step, from the step's samples (``nan`` if the step was skipped
            because a value was not finite).
        """
        fitter = self._ensure_setup(args, kwargs)
        guide = self._q_guide
        loc, params = guide.loc, guide.factor  # the guide's parameter tensors
        if self._synced is None or not _same_params(self._synced, loc, params):
            factor = params._new({k: t.detach().clone() for k, t in params._t.items()})
            fitter.state = fitter.state._replace(loc=loc.detach().clone(), factor=factor)
        log_joint = self._log_joint(args, kwargs)
        fitter.log_joint = log_joint
        with pyro.validation_enabled(False):  # an overflowing sample is a skipped step,
            record = fitter.step()             # not a constraint error (set-up validated)
        guide.set_state(fitter.state.loc, fitter.state.factor)
        self._synced = _param_versions(fitter.state, loc, params)  # set_state copies in place
        if (self._params or self._parts) and self.optim is not None:
            self._step_params(args, kwargs, log_joint.subsample())
        return -record.elbo

    def _step_params(self, args: tuple, kwargs: dict[str, Any], subsample: Any) -> None:
        """One ``optim`` step on the model's params and the other guide parts' params along
        ``∇ [−mean_s log p(x, a, T(u_s); θ) + log q_parts(a)]`` (same minibatch as the step)."""
        with torch.no_grad():
            U = self.fitter.q.sample((self.num_samples,), generator=self.generator)
        with poutine.trace(param_only=True) as capture:
            fixed, log_q_parts = _run_parts(self._parts, args, kwargs)
            log_joint = self._log_joint(args, kwargs, fixed, subsample)
            loss = -log_joint(U).mean() + log_q_parts
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        loss.backward()
        self.optim(params)
        zero_grads(params)
        self._q_guide.zero_grad(set_to_none=True)

    def run(self, num_steps: int, *args: Any, progress: bool = False,
            **kwargs: Any) -> list[float]:
        """``num_steps`` calls of :meth:`step` with the model's ``*args, **kwargs``.

        Args:
            num_steps: number of steps (an integer ``>= 1``).
            *args: model arguments.
            progress: show a ``tqdm`` progress bar with the current loss.
            **kwargs: model keyword arguments.

        Returns:
            The losses (negative ELBO estimates) of the steps.

        Raises:
            ValueError: a bad ``num_steps``.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got num_steps={num_steps!r}")
        losses = []
        with tqdm(total=num_steps, disable=not progress, desc="NaturalGradientSVI") as bar:
            for _ in range(num_steps):
                losses.append(self.step(*args, **kwargs))
                bar.set_postfix(loss=f"{losses[-1]:.6g}", refresh=False)
                bar.update()
        return losses

    @torch.no_grad()
    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """The negative ELBO estimate ``mean_s [τ log q(u_s) − log p(x, T(u_s)) − log|J_T(u_s)|]``
        from ``num_samples`` fresh samples, without a step (Pyro's ``Trace_ELBO`` form: zero
        variance when ``q`` is the exact posterior; ``log q`` from the drawn ``ε``, no solve)."""
        fitter = self._ensure_setup(args, kwargs)
        q = self._q_guide.get_posterior()
        eps = torch.randn(self.num_samples, q.dim, generator=self.generator, dtype=q.loc.dtype)
        U = q.loc + q.factor.matmul(eps.T.to(q.factor.dtype)).T.to(q.loc.dtype)
        log_q = (-0.5 * eps.double().square().sum(1) - q.factor.logabsdet().double()
                 - 0.5 * q.dim * math.log(2 * math.pi))
        log_p = self._log_joint(args, kwargs)(U).double()
        return -float((log_p - fitter.temperature * log_q).mean())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Engine, generator and ``optim`` state: tensors and JSON-able specs, loadable with
        ``torch.load(weights_only=True)``."""
        return {"fitter": self.fitter.state_dict(),
                "optim": None if self.optim is None else self.optim.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, including the guide's ``loc`` and factor; before
        the first step the state is kept and applied once the guide is set up."""
        if self._fitter is None:
            self._pending = state_dict
        else:
            self._load(state_dict)

    def _load(self, state_dict: dict[str, Any]) -> None:
        self.fitter.load_state_dict(state_dict["fitter"])
        state = self.fitter.state
        self._q_guide.set_state(state.loc, state.factor)
        if self.optim is not None and state_dict.get("optim") is not None:
            self.optim.set_state(state_dict["optim"])


def _param_versions(state: Any, loc: Tensor, factor: Any) -> tuple | None:
    """The guide's parameter tensors and their version counters after ``set_state`` copied
    ``state`` into them, or ``None`` when the copy rounded (other dtypes): then the guide's
    values are not the state's and must be read back."""
    if loc.dtype != state.loc.dtype or factor.dtype != state.factor.dtype:
        return None
    tensors = (loc, *factor._t.values())
    return tensors, tuple(t._version for t in tensors)


def _same_params(synced: tuple, loc: Tensor, factor: Any) -> bool:
    """Whether the guide's parameters are the very tensors of ``synced``, unmodified since."""
    tensors, versions = synced
    now = (loc, *factor._t.values())
    return len(now) == len(tensors) and all(
        a is b and a._version == v for a, b, v in zip(now, tensors, versions))

