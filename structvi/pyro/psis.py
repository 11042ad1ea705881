"""PSIS and vectorized replays for a fitted :class:`~structvi.pyro.AutoStructuredNormal`.

* :func:`guide_log_joint` — the model's log-joint in the guide's space, evaluated the fastest
  way that reproduces the per-sample values (:func:`~structvi.pyro.log_joint.
  choose_vectorization`), refusing subsampled plates (a minibatch is not the posterior's data).
* :func:`guide_psis` — :func:`structvi.psis.psis` for a guide and model.
* :func:`evaluate_draws` — the log-joint, per-observation log-likelihoods,
  posterior-predictive draws and deterministic sites at ``S`` draws, all from one vectorized
  model run (particle plate or ``vmap``; one run per draw only for models that support
  neither); :func:`replay` returns its per-observation part.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from structvi.psis import PSISResult, check_num_samples, psis
from structvi.pyro.log_joint import (VECTORIZE_MODES, _condition_and_trace, _per_particle,
                                     choose_vectorization, latent_log_joint, plate_nesting)

__all__ = ["Evaluation", "constrained_draws", "evaluate_draws", "guide_log_joint", "guide_psis",
           "replay"]


def _refuse_subsampling(trace: poutine.Trace, what: str) -> None:
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"{what} needs the full data set, but plate {frame.name!r} draws a subsample "
                    f"of {frame.size} of {frame.full_size}: the result would score a random "
                    f"minibatch; pass model arguments that use the whole plate (e.g. "
                    f"subsample_size=None)")


@torch.no_grad()
def guide_log_joint(guide: Any, model: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                    what: str, vectorize: str | None = None
                    ) -> tuple[Callable[[Tensor], Tensor], str, int, poutine.Trace]:
    """``(log_joint, mode, plate nesting, prototype trace at the mean)`` for a set-up guide.

    The mode is detected once per model and argument shapes (cached on the guide) unless
    ``vectorize`` (``"plate"``, ``"vmap"`` or ``"loop"``) names it.

    Raises:
        ValueError: a subsampled plate in the model run with ``args``/``kwargs``, or a bad
            ``vectorize``.
    """
    if vectorize is not None and vectorize not in VECTORIZE_MODES:
        raise ValueError(f"vectorize must be None (detect) or one of {VECTORIZE_MODES}, got "
                         f"vectorize={vectorize!r}")
    guide.setup(*args, **kwargs)
    values, _ = guide.constrain(guide.loc.detach())
    with poutine.block():
        trace = _condition_and_trace(model, values, None, args, kwargs)
    _refuse_subsampling(trace, what)
    nesting = plate_nesting(trace)
    key = (id(model), tuple(tuple(a.shape) if isinstance(a, Tensor) else repr(a) for a in args),
           tuple(sorted(kwargs)))
    cache = guide.__dict__.setdefault("_structvi_vectorization", {})
    if vectorize is not None:
        cache = {key: vectorize}
    elif key not in cache:  # detected once per model and argument shapes
        q = guide.get_posterior()
        probe = q.sample((3,), generator=torch.Generator(q.loc.device).manual_seed(0))
        with torch.enable_grad():
            cache[key], _ = choose_vectorization(model, guide, args, kwargs, probe,
                                                 max_plate_nesting=nesting)
    mode = cache[key]
    fn = latent_log_joint(model, guide, args, kwargs, vectorize=mode, max_plate_nesting=nesting)
    return fn, mode, nesting, trace


def guide_psis(guide: Any, model: Callable[..., Any], num_samples: int = 1000, *,
               model_args: tuple = (), model_kwargs: dict[str, Any] | None = None,
               generator: torch.Generator | None = None, warn: bool = True) -> PSISResult:
    """PSIS of the guide's ``q`` against the model's posterior (:func:`structvi.psis.psis`).

    The draws are in the guide's unconstrained space; :func:`constrained_draws` maps them to the
    sites (``result.mean(values["site"])`` is then the corrected posterior mean of a site).

    Raises:
        ValueError: ``num_samples`` not an integer ``>= 25``, or a subsampled plate.
    """
    check_num_samples(num_samples, 25)
    kwargs = {} if model_kwargs is None else model_kwargs
    log_joint, _, _, _ = guide_log_joint(guide, model, model_args, kwargs, "PSIS")
    with poutine.block():
        return psis(_detached(guide), log_joint, num_samples, generator=generator, warn=warn)


def _detached(guide: Any):
    from structvi.gaussian import StructuredGaussian
    from structvi.structures import structure_from_spec

    factor = guide.factor
    tensors = {k: t.detach() for k, t in factor.tensors().items()}
    return StructuredGaussian(guide.loc.detach(), structure_from_spec(tensors, factor.spec()))


@torch.no_grad()
def constrained_draws(guide: Any, U: Tensor) -> dict[str, Tensor]:
    """Site values at unconstrained draws ``U`` ``(S, d)``: ``{site: (S,) + site shape}``."""
    S = U.shape[0]
    nesting = 0
    for _, site in guide.prototype_trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
    values, _ = guide.constrain(U.reshape((S,) + (1,) * nesting + U.shape[1:]))
    shapes = {name: site["value"].shape
              for name, site in guide.prototype_trace.iter_stochastic_nodes()}
    return {name: v.reshape((S,) + shapes[name]) for name, v in values.items()}


def _latent_names(guide: Any) -> set[str]:
    return {name for name, _ in guide.prototype_trace.iter_stochastic_nodes()}


def _observed(trace: poutine.Trace, latent: set[str]):
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["infer"].get("_deterministic"):
            yield name, site, "deterministic"
        elif site["is_observed"] and name not in latent:
            yield name, site, "observed"


class Evaluation(NamedTuple):
    """Everything the export needs from one model run at ``S`` draws, each ``(S,) + shape``.

    Attributes:
        log_joint: ``log p(x, T(u_s)) + log|det J_T(u_s)|``, ``(S,)`` (as
            :func:`~structvi.pyro.log_joint.latent_log_joint` computes it).
        values: the latent sites at the draws, ``{site: (S,) + site shape}``.
        loglik: per-observation log-likelihoods of the observed sites.
        pred: posterior-predictive draws of the observed sites (empty unless asked).
        det: the ``pyro.deterministic`` sites.
        mode: how the model was run: ``"plate"``, ``"vmap"`` or ``"loop"``.
    """

    log_joint: Tensor
    values: dict[str, Tensor]
    loglik: dict[str, Tensor]
    pred: dict[str, Tensor]
    det: dict[str, Tensor]
    mode: str


def _harvest(trace: poutine.Trace, ladj: dict[str, Tensor], latent: set[str], predictive: bool,
             particles: tuple[int, int] | None) -> tuple[Tensor, dict, dict, dict]:
    """``(log joint, loglik, pred, det)`` of one traced run: each site's ``log_prob`` is
    computed once and serves both the log-joint (the sum ``latent_log_joint`` forms, in the
    same order) and the per-observation log-likelihood."""
    n, dim = particles if particles is not None else (None, None)
    terms, loglik, pred, det = [], {}, {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        if site["infer"].get("_deterministic"):
            det[name] = site["value"]
        elif site["is_observed"] and name not in latent:
            loglik[name] = lp
            if predictive:
                pred[name] = site["fn"].sample()
        lp = scale_and_mask(lp, site["scale"], site["mask"])
        terms.append(torch.as_tensor(lp).sum() if n is None else _per_particle(lp, n, dim))
    for name, value in ladj.items():
        scaled = value * trace.nodes[name]["scale"]
        terms.append(scaled.sum() if n is None else scaled.reshape(n, -1).sum(1))
    return sum(terms[1:], terms[0]), loglik, pred, det


def _per_draw(model, guide, args, kwargs, predictive):
    """``u ↦ (log joint, loglik, pred, det)`` for one draw (the ``vmap``/loop body)."""
    def one(u: Tensor):
        values, ladj = guide.constrain(u)
        trace = _condition_and_trace(model, values, None, args, kwargs)
        return _harvest(trace, ladj, set(values), predictive, None)

    return one


def _shapes(trace: poutine.Trace, latent: set[str]) -> dict[str, dict[str, torch.Size]]:
    """Per-draw shapes of the log-likelihoods, predictive draws and deterministic sites, read
    off a single-draw trace."""
    out = {"loglik": {}, "pred": {}, "det": {}}
    for name, site, kind in _observed(trace, latent):
        if kind == "deterministic":
            out["det"][name] = site["value"].shape
            continue
        fn = site["fn"]
        out["pred"][name] = fn.shape()
        value_batch = site["value"].shape[:site["value"].dim() - fn.event_dim]
        out["loglik"][name] = torch.broadcast_shapes(fn.batch_shape, value_batch)
    return out


def _shaped(group: dict[str, Tensor], shapes: dict[str, torch.Size], S: int) -> dict[str, Tensor]:
    """Batched outputs ``(S, padded...)`` reshaped to ``(S,) + per-draw shape``."""
    out = {}
    for name, value in group.items():
        shape = shapes[name]
        value = torch.as_tensor(value)
        if value.dim() == 0 or value.shape[0] != S:
            value = value.expand((S,) + value.shape)
        full = torch.broadcast_shapes(value.shape, (S,) + (1,) * (value.dim() - 1))
        value = value.expand(full)
        if value[0].numel() != shape.numel():  # broadcast padding of a per-draw value
            value = value.expand((S,) + torch.broadcast_shapes(value.shape[1:], shape))
        out[name] = value.reshape((S,) + shape)
    return out


def _run_plate(model, guide, U, args, kwargs, nesting, predictive, shapes):
    S = U.shape[0]
    values, ladj = guide.constrain(U.reshape((S,) + (1,) * nesting + U.shape[1:]))
    trace = _condition_and_trace(model, values, None, args, kwargs, (S, -(nesting + 1)))
    log_p, loglik, pred, det = _harvest(trace, ladj, set(values), predictive,
                                        (S, -(nesting + 1)))
    proto = guide.prototype_trace.nodes
    sites = {name: value.reshape((S,) + proto[name]["value"].shape)
             for name, value in values.items()}
    return Evaluation(log_p, sites, _shaped(loglik, shapes["loglik"], S),
                      _shaped(pred, shapes["pred"], S), _shaped(det, shapes["det"], S), "plate")


@torch.no_grad()
def evaluate_draws(model: Callable[..., Any], guide: Any, U: Tensor, args: tuple,
                   kwargs: dict[str, Any], *, mode: str, nesting: int, predictive: bool,
                   trace: poutine.Trace | None = None) -> Evaluation:
    """Log-joint, log-likelihoods, predictive draws and deterministic sites at the draws ``U``
    ``(S, d)`` from ONE model run: in a particle plate (``mode="plate"``), under
    :func:`torch.func.vmap` over the draws (``"vmap"``), or once per draw (``"loop"``). A plate
    run that fails falls back to ``vmap``, then to the loop, with one warning saying why.

    Args:
        model: the Pyro model.
        guide: the set-up guide whose unconstrained space ``U`` lives in.
        U: the draws, ``(S, d)``.
        args: model positional arguments.
        kwargs: model keyword arguments.
        mode: ``"plate"``, ``"vmap"`` or ``"loop"`` (e.g. from :func:`guide_log_joint`).
        nesting: number of plate dims the model uses.
        predictive: also draw the observed sites at each draw.
        trace: a single-draw trace of the model (conditioned on the latents) giving the
            per-draw shapes; default a run at ``U[0]``.

    Returns:
        The :class:`Evaluation`.
    """
    S = U.shape[0]
    with poutine.block():
        if trace is None:
            trace = _condition_and_trace(model, guide.constrain(U[0])[0], None, args, kwargs)
        shapes = _shapes(trace, _latent_names(guide))
        reasons = []
        if mode == "plate":
            try:
                return _run_plate(model, guide, U, args, kwargs, nesting, predictive, shapes)
            except Exception as exc:  # noqa: BLE001 -- any failure: try the next mode
                reasons.append(f"particle plate: {_first_line(exc)}")
                mode = "vmap"
        values = constrained_draws(guide, U)
        one = _per_draw(model, guide, args, kwargs, predictive)
        if mode == "vmap":
            try:
                got = torch.func.vmap(one, randomness="different")(U)
                if reasons:
                    _warn_fallback(reasons, "vmap")
                return Evaluation(got[0], values, *got[1:], "vmap")
            except Exception as exc:  # noqa: BLE001 -- the loop reports a real model error
                reasons.append(f"vmap: {_first_line(exc)}")
        if reasons:
            _warn_fallback(reasons, "loop")
        runs = [one(u) for u in U]
    stack = [{k: torch.stack([r[i][k] for r in runs]) for k in runs[0][i]} for i in (1, 2, 3)]
    return Evaluation(torch.stack([r[0] for r in runs]), values, *stack, "loop")


def _first_line(exc: Exception) -> str:
    text = str(exc).splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _warn_fallback(reasons: list[str], mode: str) -> None:
    how = "under torch.func.vmap" if mode == "vmap" else "once per draw"
    warnings.warn(f"replaying the draws in one vectorized run failed ({'; '.join(reasons)}); "
                  f"running the model {how}", UserWarning, stacklevel=4)


def replay(model: Callable[..., Any], guide: Any, U: Tensor, args: tuple, kwargs: dict[str, Any],
           *, mode: str, nesting: int, predictive: bool) -> tuple[dict, dict, dict, dict]:
    """Per-observation log-likelihoods, predictive draws, observed data and deterministic sites
    at the draws ``U`` ``(S, d)``, each ``(S,) + per-draw shape`` (:func:`evaluate_draws`)."""
    with torch.no_grad(), poutine.block():
        trace = _condition_and_trace(model, guide.constrain(U[0])[0], None, args, kwargs)
    observed = {n: s["value"] for n, s, kind in _observed(trace, _latent_names(guide))
                if kind == "observed"}
    got = evaluate_draws(model, guide, U, args, kwargs, mode=mode, nesting=nesting,
                         predictive=predictive, trace=trace)
    return got.loglik, got.pred, observed, got.det
