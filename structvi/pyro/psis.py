"""PSIS and vectorized replays for a fitted :class:`~structvi.pyro.AutoStructuredNormal`.

* :func:`guide_log_joint` — the model's log-joint in the guide's space, evaluated the fastest
  way that reproduces the per-sample values (:func:`~structvi.pyro.log_joint.
  choose_vectorization`), refusing subsampled plates (a minibatch is not the posterior's data).
* :func:`guide_psis` — :func:`structvi.psis.psis` for a guide and model.
* :func:`replay` — per-observation log-likelihoods, posterior-predictive draws and
  deterministic sites at ``S`` draws, in one vectorized model run (particle plate or
  ``vmap``; one run per draw for models that support neither).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro.poutine as poutine
import torch
from torch import Tensor

from structvi.psis import PSISResult, check_num_samples, psis
from structvi.pyro.log_joint import (_condition_and_trace, choose_vectorization,
                                     latent_log_joint, plate_nesting)

__all__ = ["constrained_draws", "guide_log_joint", "guide_psis", "replay"]


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
                    what: str) -> tuple[Callable[[Tensor], Tensor], str, int, poutine.Trace]:
    """``(log_joint, mode, plate nesting, prototype trace at the mean)`` for a set-up guide.

    Raises:
        ValueError: a subsampled plate in the model run with ``args``/``kwargs``.
    """
    guide.setup(*args, **kwargs)
    values, _ = guide.constrain(guide.loc.detach())
    with poutine.block():
        trace = _condition_and_trace(model, values, None, args, kwargs)
    _refuse_subsampling(trace, what)
    nesting = plate_nesting(trace)
    key = (id(model), tuple(tuple(a.shape) if isinstance(a, Tensor) else repr(a) for a in args),
           tuple(sorted(kwargs)))
    cache = guide.__dict__.setdefault("_structvi_vectorization", {})
    if key not in cache:  # detected once per model and argument shapes
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


def _observed(trace: poutine.Trace, latent: set[str]):
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["infer"].get("_deterministic"):
            yield name, site, "deterministic"
        elif site["is_observed"] and name not in latent:
            yield name, site, "observed"


def _one_run(model, values, args, kwargs, predictive, particles=None):
    trace = _condition_and_trace(model, values, None, args, kwargs, particles)
    out = {"loglik": {}, "pred": {}, "det": {}}
    for name, site, kind in _observed(trace, set(values)):
        if kind == "deterministic":
            out["det"][name] = site["value"]
            continue
        out["loglik"][name] = site["fn"].log_prob(site["value"])
        if predictive:
            out["pred"][name] = site["fn"].sample()
    return out


def _shaped(group: dict[str, Tensor], proto: dict[str, Tensor], S: int) -> dict[str, Tensor]:
    """Batched outputs ``(S, padded...)`` reshaped to ``(S,) + per-draw shape``."""
    out = {}
    for name, value in group.items():
        shape = proto[name].shape
        value = torch.as_tensor(value)
        if value.dim() == 0 or value.shape[0] != S:
            value = value.expand((S,) + value.shape)
        full = torch.broadcast_shapes(value.shape, (S,) + (1,) * (value.dim() - 1))
        value = value.expand(full)
        if value[0].numel() != shape.numel():  # broadcast padding of a per-draw value
            value = value.expand((S,) + torch.broadcast_shapes(value.shape[1:], shape))
        out[name] = value.reshape((S,) + shape)
    return out


@torch.no_grad()
def replay(model: Callable[..., Any], guide: Any, U: Tensor, args: tuple, kwargs: dict[str, Any],
           *, mode: str, nesting: int, predictive: bool) -> tuple[dict, dict, dict, dict]:
    """Per-observation log-likelihoods, predictive draws, observed data and deterministic sites
    at the draws ``U`` ``(S, d)``, each ``(S,) + per-draw shape`` (module docstring)."""
    S = U.shape[0]
    draws = constrained_draws(guide, U)
    with poutine.block():
        proto_trace = _condition_and_trace(model, {k: v[0] for k, v in draws.items()}, None,
                                           args, kwargs)
        observed = {n: s["value"] for n, s, kind in _observed(proto_trace, set(draws))
                    if kind == "observed"}
        proto = _one_run(model, {k: v[0] for k, v in draws.items()}, args, kwargs, predictive)
        if mode == "plate":
            values, _ = guide.constrain(U.reshape((S,) + (1,) * nesting + U.shape[1:]))
            try:
                got = _one_run(model, values, args, kwargs, predictive, (S, -(nesting + 1)))
                return (*(_shaped(got[g], proto[g], S) for g in ("loglik", "pred")), observed,
                        _shaped(got["det"], proto["det"], S))
            except (RuntimeError, ValueError) as exc:
                warnings.warn(f"replaying the draws in a particle plate failed ({exc}); running "
                              f"the model once per draw", UserWarning, stacklevel=3)
        elif mode == "vmap":
            got = torch.func.vmap(
                lambda u: _one_run(model, guide.constrain(u)[0], args, kwargs, predictive),
                randomness="different")(U)
            return got["loglik"], got["pred"], observed, got["det"]
        runs = [_one_run(model, {k: v[s] for k, v in draws.items()}, args, kwargs, predictive)
                for s in range(S)]
    stack = {g: {k: torch.stack([r[g][k] for r in runs]) for k in runs[0][g]}
             for g in ("loglik", "pred", "det")}
    return stack["loglik"], stack["pred"], observed, stack["det"]
