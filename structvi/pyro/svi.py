r"""``NaturalGradientSVI``: train an :class:`AutoStructuredNormal` with the structvi engine.

The objective is the ELBO in the guide's unconstrained space ``u`` (MATH (2.1) with ``τ = 1``):

.. math:: \mathcal L(q) = \mathbb E_{q(u)}\big[\log p(x, T(u)) + \log|\det J_T(u)|\big]
          + \mathbb H[q],

``T`` the ``biject_to`` map of each site. One :meth:`NaturalGradientSVI.step` draws samples
``u_s = μ + K ε_s``, evaluates ``log p(x, T(u_s))`` by tracing the model with the sample
substituted (``poutine.condition``; ``trace.log_prob_sum()`` applies the ``pyro.plate`` scales,
so a subsampled plate gives the unbiased full-data estimate), estimates ``E_q[∇f]`` and
``Π̂(Kᵀ Ē K)`` with :mod:`structvi.estimators` and takes one :func:`structvi.engine.step`
(through :class:`structvi.fit.Fitter`, which also skips non-finite steps). All samples of a step
share one minibatch: the plates' subsample indices are drawn once per step and replayed.
Ordinary ``pyro.param`` sites of the model are trained in the same step by ``optim`` (a Pyro
optimizer) on the Monte-Carlo estimate of ``−E_q[log p]``.
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
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import zero_grads
from pyro.optim import PyroOptim
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from structvi.engine import NGDConfig
from structvi.estimators import DEFAULT_NUM_SAMPLES, check_estimator
from structvi.fit import Fitter, default_config
from structvi.pyro.guides import AutoStructuredNormal

__all__ = ["NaturalGradientSVI", "latent_log_joint"]

_PARTICLES = "_structvi_particles"


def _condition_and_trace(model, values, subsample, args, kwargs, particles=None):
    """Trace ``model`` with latent ``values`` substituted and plate subsamples replayed."""
    fn = poutine.condition(model, data=values)
    if subsample is not None:
        fn = poutine.replay(fn, trace=subsample)
    if particles is not None:
        size, dim = particles
        inner = fn

        def fn(*a, **k):
            with pyro.plate(_PARTICLES, size, dim=dim):
                return inner(*a, **k)

    return poutine.trace(fn).get_trace(*args, **kwargs)


def _per_particle(lp: Tensor | float, n: int, dim: int) -> Tensor:
    """Sum a log-density over every batch dim except the particle dim ``dim`` (negative)."""
    lp = torch.as_tensor(lp)
    if lp.dim() < -dim:
        return lp.sum().expand(n)
    if lp.dim() > -dim or lp.shape[0] not in (1, n):
        raise ValueError(
            f"vectorized particles: a log-density has batch shape {tuple(lp.shape)}, expected at "
            f"most {-dim} dims with the {n} particles leftmost (dim {dim}); the model must "
            f"broadcast over leading batch dims of its latents (or use vectorize_particles=False)"
        )
    return lp.reshape(lp.shape[0], -1).sum(1).expand(n)


def _trace_log_joint(trace, ladj, n: int | None, dim: int | None) -> Tensor:
    """``Σ_sites log p`` (scaled, masked) plus the scaled log-Jacobians, per particle."""
    terms = []
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        lp = scale_and_mask(lp, site["scale"], site["mask"])
        terms.append(torch.as_tensor(lp).sum() if n is None else _per_particle(lp, n, dim))
    for name, value in ladj.items():
        scaled = value * trace.nodes[name]["scale"]
        terms.append(scaled.sum() if n is None else scaled.reshape(n, -1).sum(1))
    return sum(terms[1:], terms[0])


def _subsample_sites(trace: poutine.Trace) -> poutine.Trace:
    """The plate-subsample sites of ``trace`` (the minibatch indices), as a trace to replay."""
    out = poutine.Trace()
    for name, site in trace.nodes.items():
        if site_is_subsample(site):
            out.add_node(name, **site)
    return out


def latent_log_joint(
    model: Callable[..., Any],
    guide: AutoStructuredNormal,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    subsample: poutine.Trace | None = None,
    vectorize: bool = False,
    max_plate_nesting: int = 0,
) -> Callable[[Tensor], Tensor]:
    """``U ↦ log p(x, T(u_s)) + log|det J_T(u_s)|`` for the rows ``u_s`` of ``U``, ``(n, d) → (n,)``.

    Every evaluation of the returned function uses one minibatch: the plate-subsample indices
    of ``subsample`` or, if ``None``, those drawn by its first model run (so make a new function
    for a new minibatch). ``trace.log_prob_sum``-style scaling makes each evaluation the
    unbiased full-data estimate.

    Args:
        model: the Pyro model.
        guide: a set-up :class:`AutoStructuredNormal` (it defines the packing and the ``T``'s).
        args: model positional arguments.
        kwargs: model keyword arguments.
        subsample: a trace whose plate-subsample sites are replayed.
        vectorize: evaluate all rows in one model run inside a particle ``pyro.plate`` (the model
            must broadcast over a leading batch dim, as for
            ``Trace_ELBO(vectorize_particles=True)``); otherwise one model run per row.
        max_plate_nesting: number of plate dims the model uses (vectorized mode).

    Returns:
        The function, differentiable in ``U`` and in the model's ``pyro.param``\\ s.
    """
    kwargs = {} if kwargs is None else kwargs
    guide._require_setup("latent_log_joint")
    dim = -(max_plate_nesting + 1)
    cell = {"subsample": subsample}

    def trace_at(values: dict[str, Tensor], particles: tuple[int, int] | None = None):
        trace = _condition_and_trace(model, values, cell["subsample"], args, kwargs, particles)
        if cell["subsample"] is None:
            cell["subsample"] = _subsample_sites(trace)
        return trace

    def single(u: Tensor) -> Tensor:
        values, ladj = guide.constrain(u)
        return _trace_log_joint(trace_at(values), ladj, None, None)

    def log_joint(U: Tensor) -> Tensor:
        if U.dim() != 2 or U.shape[1] != guide.latent_dim:
            raise ValueError(f"expected points of shape (n, {guide.latent_dim}), got "
                             f"{tuple(U.shape)}")
        if not vectorize:
            return torch.stack([single(u) for u in U])
        n = U.shape[0]
        values, ladj = guide.constrain(U.reshape((n,) + (1,) * max_plate_nesting + U.shape[1:]))
        return _trace_log_joint(trace_at(values, (n, dim)), ladj, n, dim)

    return log_joint


def _inspect_model(model, guide, args, kwargs) -> tuple[int, set[str]]:
    """One model run at the guide's mean: (max plate nesting, names of ``pyro.param`` sites)."""
    with torch.no_grad():
        values, _ = guide.constrain(guide.loc.detach())
    with poutine.block():
        trace = _condition_and_trace(model, values, None, args, kwargs)
    nesting, params = 0, set()
    for name, site in trace.nodes.items():
        if site["type"] == "param":
            params.add(name)
        for frame in site.get("cond_indep_stack", ()):
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
    return nesting, params


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
        guide: the :class:`AutoStructuredNormal` to train.
        lr: engine step size ``β`` (``None``: the estimator's default from
            :func:`structvi.fit.default_config`, a Newton step ``1`` for ``"hessian"`` and a
            two-stage schedule for ``"stein"``/``"reparam"``).
        momentum: engine momentum ``α`` in ``[0, 1)``.
        num_samples: Monte-Carlo points per step (``None``: 16 for ``"stein"``/``"reparam"``,
            2 for ``"hessian"``; even for the antithetic estimators).
        estimator: ``"stein"`` (gradients only), ``"hessian"`` (Hessian-vector products) or
            ``"reparam"`` (:mod:`structvi.estimators`).
        optim: a Pyro optimizer for the model's ordinary ``pyro.param``\\ s (``None``: they stay
            fixed, with a warning if the model has any).
        config: an :class:`~structvi.engine.NGDConfig` or a schedule ``step -> NGDConfig``
            replacing ``lr``/``momentum``/``**config_options`` (e.g. to anneal ``lr``).
        vectorize_particles: evaluate the samples of a step in one model run inside a particle
            plate (the model must broadcast like for ``Trace_ELBO(vectorize_particles=True)``).
        generator: source of the estimators' randomness (``None``: seeded from torch's global
            RNG, so ``pyro.set_rng_seed`` makes runs reproducible).
        **config_options: further :class:`~structvi.engine.NGDConfig` fields (``lr_mean``,
            ``trust_region``, ``retraction``, ``temperature``, ...).

    Raises:
        TypeError: ``guide`` is not an :class:`AutoStructuredNormal` or ``optim`` not a
            ``PyroOptim``.
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
        vectorize_particles: bool = False,
        generator: torch.Generator | None = None,
        **config_options: Any,
    ) -> None:
        if not isinstance(guide, AutoStructuredNormal):
            raise TypeError(
                f"guide must be an AutoStructuredNormal, got guide={type(guide).__name__}")
        if optim is not None and not isinstance(optim, PyroOptim):
            raise TypeError(f"optim must be a pyro.optim.PyroOptim or None, got optim={optim!r}")
        self.estimator = check_estimator(estimator)
        if config is not None and (lr is not None or momentum or config_options):
            raise ValueError("pass either config=... or lr/momentum/**config_options, not both")
        self.config = config if config is not None else _make_config(
            estimator, lr, momentum, config_options)
        self.num_samples = _check_num_samples(estimator, num_samples)
        self.model, self.guide, self.optim = model, guide, optim
        self.vectorize_particles = bool(vectorize_particles)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, ())))
        self.generator = generator
        self._fitter: Fitter | None = None
        self._pending: dict[str, Any] | None = None
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
        self.guide.setup(*args, **kwargs)
        self._nesting, self._params = _inspect_model(self.model, self.guide, args, kwargs)
        if self._params and self.optim is None:
            warnings.warn(f"the model has pyro.param sites {sorted(self._params)} but optim=None:"
                          " they are not trained", UserWarning, stacklevel=3)
        with torch.no_grad():
            q = self.guide.get_posterior()
        self._fitter = Fitter(
            _log_joint_set_per_step, q, self.config, estimator=self.estimator,
            num_samples=self.num_samples, generator=self.generator,
            temperature=self._temperature(),
        )
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        return self._fitter

    def _temperature(self) -> float:
        cfg = self.config if isinstance(self.config, NGDConfig) else self.config(0)
        return cfg.temperature

    def _log_joint(self, args: tuple, kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor]:
        """A fresh log-joint: one new minibatch per step, shared by all of its evaluations."""
        return latent_log_joint(self.model, self.guide, args, kwargs,
                                vectorize=self.vectorize_particles,
                                max_plate_nesting=self._nesting)

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
        factor = self.guide.factor
        factor = type(factor)(factor.dim, {k: t.detach().clone() for k, t in
                                           factor.tensors().items()}, **factor.options)
        fitter.state = fitter.state._replace(loc=self.guide.loc.detach().clone(), factor=factor)
        log_joint = self._log_joint(args, kwargs)
        fitter.log_joint = log_joint
        record = fitter.step()
        self.guide.set_state(fitter.state.loc, fitter.state.factor)
        if self._params and self.optim is not None:
            self._step_params(log_joint)
        return -record.elbo

    def _step_params(self, log_joint: Callable[[Tensor], Tensor]) -> None:
        """One ``optim`` step on the model's params along ``∇_θ −mean_s log p(x, T(u_s); θ)``."""
        with torch.no_grad():
            U = self.fitter.q.sample((self.num_samples,), generator=self.generator)
        with poutine.trace(param_only=True) as capture:
            loss = -log_joint(U).mean()
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        loss.backward()
        self.optim(params)
        zero_grads(params)

    @torch.no_grad()
    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """The negative ELBO estimate ``mean_s [τ log q(u_s) − log p(x, T(u_s)) − log|J_T(u_s)|]``
        from ``num_samples`` fresh samples, without a step (Pyro's ``Trace_ELBO`` form: zero
        variance when ``q`` is the exact posterior; ``log q`` from the drawn ``ε``, no solve)."""
        fitter = self._ensure_setup(args, kwargs)
        q = self.guide.get_posterior()
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
        self.guide.set_state(state.loc, state.factor)
        if self.optim is not None and state_dict.get("optim") is not None:
            self.optim.set_state(state_dict["optim"])
