r"""The log-joint of a Pyro model in a guide's unconstrained space, per sample or vectorized.

``latent_log_joint`` turns a model and a set-up :class:`~structvi.pyro.AutoStructuredNormal`
into ``U ↦ log p(x, T(u_s)) + log|det J_T(u_s)|`` for the rows ``u_s`` of ``U``. Three ways to
evaluate the rows:

* ``"loop"`` — one model run per row (always works);
* ``"plate"`` — one model run inside a particle ``pyro.plate`` left of the model's plates (the
  model must broadcast over a leading batch dim of its latents, like
  ``Trace_ELBO(vectorize_particles=True)``);
* ``"vmap"`` — one model run per row under :func:`torch.func.vmap` (``PyroModule`` networks,
  whose ``nn.Linear`` layers cannot take a batch of weight matrices, work this way).

:func:`choose_vectorization` tries ``"plate"`` then ``"vmap"`` at set-up, keeps the first that
reproduces the per-row values and gradients, and otherwise falls back to ``"loop"`` with one
warning naming the reasons.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as pyro_dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch import Tensor

__all__ = ["VECTORIZE_MODES", "choose_vectorization", "latent_log_joint", "plate_nesting"]

VECTORIZE_MODES = ("loop", "plate", "vmap")
_PARTICLES = "_structvi_particles"


def _check_mode(vectorize: bool | str) -> str:
    if vectorize is True:
        return "plate"
    if vectorize is False:
        return "loop"
    if vectorize not in VECTORIZE_MODES:
        raise ValueError(f"vectorize must be True, False or one of {VECTORIZE_MODES}, got "
                         f"vectorize={vectorize!r}")
    return vectorize


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
            f"broadcast over leading batch dims of its latents (or use vectorize='vmap'/'loop')"
        )
    return lp.reshape(lp.shape[0], -1).sum(1).expand(n)


def _unvalidated_log_prob(site: dict[str, Any]) -> Tensor:
    """``site["fn"].log_prob(value)`` with the distribution's own argument validation off for
    the call (distributions built while validation was on, e.g. a ``PyroSample`` prior made at
    module construction, keep ``_validate_args=True`` whatever Pyro's switch says later)."""
    chain, d = [], site["fn"]
    while d is not None and len(chain) < 8:
        if d.__dict__.get("_validate_args"):
            chain.append(d)
        d = d.__dict__.get("base_dist")
    for d in chain:
        d._validate_args = False
    try:
        return site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    finally:
        for d in chain:
            d._validate_args = True


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _holds_wrapped(obj: Any, depth: int = 0) -> bool:
    """Whether ``obj`` (a distribution, its transforms, containers) holds a tensor of the
    ``vmap`` in progress; ``True`` when too deep to tell (then it is not hoisted)."""
    if isinstance(obj, Tensor):
        return _is_wrapped(obj)
    if depth > 6:
        return True
    if isinstance(obj, (list, tuple)):
        return any(_holds_wrapped(v, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return any(_holds_wrapped(v, depth + 1) for v in obj.values())
    inner = getattr(obj, "__dict__", None)
    if inner is None or isinstance(obj, type):
        return False
    return any(_holds_wrapped(v, depth + 1) for v in inner.values())


def _hoistable(site: dict[str, Any]) -> bool:
    """A site whose distribution, scale and mask do not depend on the ``vmap``-ed row: its
    log-density can be evaluated once for all rows outside ``vmap`` (:func:`latent_log_joint`)."""
    if site["args"] or site["kwargs"] or site["mask"] is not None:
        return False
    fn = site["fn"]
    if site["value"].dim() < len(fn.batch_shape) + len(fn.event_shape):  # n would broadcast
        return False
    scale = site["scale"]
    if isinstance(scale, Tensor) and (scale.dim() or _is_wrapped(scale)):
        return False
    if _ROW_FREE.get(id(fn)) is fn:  # the same prior object as before (a PyroSample's)
        return True
    if _holds_wrapped(fn):
        return False
    if len(_ROW_FREE) > 256:
        _ROW_FREE.clear()
    _ROW_FREE[id(fn)] = fn
    return True


# distributions found free of vmap-ed tensors, by id (kept alive here, so ids stay theirs):
# a fixed prior is scanned once, not at every evaluation
_ROW_FREE: dict[int, Any] = {}


def _trace_log_joint(trace, ladj, n: int | None, dim: int | None,
                     hoist: tuple[set, list] | None = None) -> Tensor:
    """``Σ_sites log p`` (scaled, masked) plus the scaled log-Jacobians, per particle.

    With Pyro's validation switched off (``NaturalGradientSVI.step`` does, after validating at
    set-up: an overflowing sample is a skipped step, not a constraint error) the sites'
    ``log_prob`` skip their argument checks too, also for distributions built while it was on.

    ``hoist = (names, out)`` (under ``vmap``): the sites named in ``names`` whose distribution
    does not depend on the row (:func:`_hoistable`) are left out and appended to ``out`` as
    ``(name, fn, scale)``, for the caller to evaluate on all rows at once.
    """
    quiet = not pyro_dist.is_validation_enabled()
    terms = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if hoist is not None and name in hoist[0] and _hoistable(site):
            hoist[1].append((name, site["fn"], site["scale"]))
            continue
        if quiet:
            lp = _unvalidated_log_prob(site)
        else:
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        lp = scale_and_mask(lp, site["scale"], site["mask"])
        terms.append(torch.as_tensor(lp).sum() if n is None else _per_particle(lp, n, dim))
    for name, value in ladj.items():
        scaled = value * trace.nodes[name]["scale"]
        terms.append(scaled.sum() if n is None else scaled.reshape(n, -1).sum(1))
    if not terms:  # every site hoisted: a zero of the row
        return next(iter(trace.nodes[k]["value"] for k in hoist[0] if k in trace.nodes)).sum() * 0
    return sum(terms[1:], terms[0])


def _hoisted_log_prob(hoisted: list, values: dict[str, Tensor], n: int) -> Tensor:
    """``Σ scale · fn.log_prob(value)`` of the hoisted sites for all ``n`` rows at once:
    ``values[name]`` has shape ``(n,) + site shape`` and broadcasts against ``fn``'s batch
    shape; the result is summed over every dim but the first, shape ``(n,)``."""
    quiet = not pyro_dist.is_validation_enabled()
    total = None
    for name, fn, scale in hoisted:
        site = {"fn": fn, "value": values[name], "args": (), "kwargs": {}}
        lp = _unvalidated_log_prob(site) if quiet else fn.log_prob(values[name])
        lp = lp.reshape(n, -1).sum(1) if lp.dim() else lp.expand(n)
        lp = lp if isinstance(scale, (int, float)) and scale == 1.0 else lp * scale
        total = lp if total is None else total + lp
    return total


def _constrained_rows(guide: Any, U: Tensor, names: set[str]) -> dict[str, Tensor]:
    """The constrained values of the latent sites ``names`` for all rows of ``U`` (``(n, d)``),
    each of shape ``(n,) + site shape`` (the guide's packing and transforms)."""
    sites, _, _ = guide._constrain_layout()
    n = U.shape[0]
    return {name: transform(U[:, pos:pos + size].reshape((n,) + unc))
            for name, pos, size, unc, _, transform in sites if name in names}


def _subsample_sites(trace: poutine.Trace) -> poutine.Trace:
    """The plate-subsample sites of ``trace`` (the minibatch indices), as a trace to replay."""
    out = poutine.Trace()
    for name, site in trace.nodes.items():
        if site_is_subsample(site):
            out.add_node(name, **site)
    return out


def _unknown_latents(trace: poutine.Trace) -> list[str]:
    """Sample sites the guide does not cover: drawn from the prior, not conditioned."""
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site)]


def _plain(trace: poutine.Trace) -> bool:
    """All recorded subsample indices are ordinary tensors (reusable outside ``vmap``)."""
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(not (isinstance(site["value"], Tensor) and is_wrapped(site["value"]))
               for site in trace.nodes.values())


def plate_nesting(trace: poutine.Trace) -> int:
    """Number of vectorized plate dims used by the sites of ``trace``."""
    nesting = 0
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
    return nesting


def latent_log_joint(
    model: Callable[..., Any],
    guide: Any,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    subsample: poutine.Trace | None = None,
    vectorize: bool | str = False,
    max_plate_nesting: int = 0,
    fixed: dict[str, Tensor] | None = None,
    on_unknown_sites: Callable[[list[str]], None] | None = None,
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
        vectorize: ``False``/``"loop"`` (one model run per row), ``True``/``"plate"`` (one run
            inside a particle plate; the model must broadcast over a leading batch dim) or
            ``"vmap"`` (:func:`torch.func.vmap` over the rows; module docstring).
        max_plate_nesting: number of plate dims the model uses (``"plate"`` mode).
        fixed: values of further sites to condition on (e.g. an ``AutoDelta`` part of an
            ``AutoGuideList``), shared by all rows.
        on_unknown_sites: called with the names of latent sites the guide does not cover (drawn
            from the prior) after the first model run; ``None`` ignores them.

    Returns:
        The function, differentiable in ``U`` and in the model's ``pyro.param``\\ s.

    Raises:
        ValueError: a bad ``vectorize``.
    """
    kwargs = {} if kwargs is None else kwargs
    mode = _check_mode(vectorize)
    guide._require_setup("latent_log_joint")
    fixed = {} if fixed is None else dict(fixed)
    dim = -(max_plate_nesting + 1)
    cell = {"subsample": subsample, "checked": on_unknown_sites is None}

    def trace_at(values: dict[str, Tensor], particles: tuple[int, int] | None = None):
        trace = _condition_and_trace(model, {**fixed, **values}, cell["subsample"], args,
                                     kwargs, particles)
        if cell["subsample"] is None:
            cell["subsample"] = _subsample_sites(trace)
        if not cell["checked"]:
            cell["checked"] = True
            unknown = _unknown_latents(trace)
            if unknown:
                on_unknown_sites(unknown)
        return trace

    def single(u: Tensor) -> Tensor:
        values, ladj = guide.constrain(u, skip_zero_jacobians=True)
        return _trace_log_joint(trace_at(values), ladj, None, None)

    def vmapped(U: Tensor) -> Tensor:
        """``vmap`` of ``single``, with the log-densities of row-independent latent sites (a
        ``PyroSample`` prior with fixed parameters) evaluated outside, once for all rows."""
        hoisted: list = []

        def body(u: Tensor) -> Tensor:
            values, ladj = guide.constrain(u, skip_zero_jacobians=True)
            return _trace_log_joint(trace_at(values), ladj, None, None, (set(values), hoisted))

        out = torch.func.vmap(body, randomness="same")(U)
        if hoisted:
            values = _constrained_rows(guide, U, {name for name, _, _ in hoisted})
            out = out + _hoisted_log_prob(hoisted, values, U.shape[0]).to(out.dtype)
        return out

    def log_joint(U: Tensor) -> Tensor:
        if U.dim() != 2 or U.shape[1] != guide.latent_dim:
            raise ValueError(f"expected points of shape (n, {guide.latent_dim}), got "
                             f"{tuple(U.shape)}")
        if mode == "loop":
            return torch.stack([single(u) for u in U])
        if mode == "vmap":
            fresh = cell["subsample"] is None
            out = vmapped(U)  # one minibatch for all rows
            if fresh and not _plain(cell["subsample"]):  # indices drawn under a transform
                cell["subsample"] = None
                head = single(U[0]).reshape(1)  # draw them outside, then replay
                out = torch.cat([head, vmapped(U[1:])])
            return out
        n = U.shape[0]
        values, ladj = guide.constrain(U.reshape((n,) + (1,) * max_plate_nesting + U.shape[1:]),
                                       skip_zero_jacobians=True)
        return _trace_log_joint(trace_at(values, (n, dim)), ladj, n, dim)

    log_joint.mode = mode
    log_joint.subsample = lambda: cell["subsample"]
    return log_joint


def _agree(a: Tensor, b: Tensor) -> bool:
    """Same shape, same non-finite entries, finite entries equal to ``1e-9`` (float64) or
    ``1e-4`` (lower precisions) relative."""
    if a.shape != b.shape:
        return False
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite) or not torch.equal(
            torch.isnan(a), torch.isnan(b)) or not torch.equal(a[~finite & ~b.isnan()],
                                                               b[~finite & ~b.isnan()]):
        return False
    if not finite.any():
        return True
    tol = 1e-9 if a.dtype == torch.float64 else 1e-4
    scale = 1.0 + float(b[finite].abs().max())
    return float((a[finite] - b[finite]).abs().max()) <= tol * scale


def _values_and_grads(make: Callable[[], Callable[[Tensor], Tensor]], U: Tensor):
    U = U.detach().clone().requires_grad_(True)
    out = make()(U)
    (grad,) = torch.autograd.grad(out.sum(), U)
    return out.detach(), grad


def choose_vectorization(
    model: Callable[..., Any],
    guide: Any,
    args: tuple,
    kwargs: dict[str, Any],
    U: Tensor,
    *,
    max_plate_nesting: int,
    fixed: dict[str, Tensor] | None = None,
    warn: bool = True,
) -> tuple[str, dict[str, str]]:
    """The fastest evaluation mode that reproduces the per-row log-joint and its gradient.

    Evaluates ``U`` (a few points, ``(n, d)``) per row and then with ``"plate"`` and ``"vmap"``
    on one shared minibatch, and keeps the first mode whose values and gradients agree with the
    per-row ones (to ``1e-9`` relative in float64, ``1e-4`` otherwise). If neither does, warns
    once (``warn``) with the reasons and returns ``"loop"``.

    Returns:
        ``(mode, reasons)``: the chosen mode and, per rejected mode, why it was rejected.
    """
    trace = _condition_and_trace(model, {**(fixed or {}), **guide.constrain(U[0].detach())[0]},
                                 None, args, kwargs)
    subsample = _subsample_sites(trace)

    def maker(mode):
        return lambda: latent_log_joint(model, guide, args, kwargs, subsample=subsample,
                                        vectorize=mode, max_plate_nesting=max_plate_nesting,
                                        fixed=fixed)

    with poutine.block():
        ref = _values_and_grads(maker("loop"), U)
        reasons = {}
        for mode in ("plate", "vmap"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = _values_and_grads(maker(mode), U)
            except Exception as exc:  # noqa: BLE001 -- any failure means "not this mode"
                reasons[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            if _agree(got[0], ref[0]) and _agree(got[1], ref[1]):
                return mode, reasons
            reasons[mode] = "its values or gradients differ from the per-sample evaluation"
    if warn:
        why = "; ".join(f"{m}: {r}" for m, r in reasons.items())
        warnings.warn(f"the model is evaluated once per sample (slower): it does not broadcast "
                      f"over a particle plate nor run under torch.func.vmap ({why})",
                      UserWarning, stacklevel=3)
    return "loop", reasons
