"""The optimizer side of the acceptance rule: gathering magnitudes, applying verdicts, checks.

The rule itself is :func:`structvi.optim.functional.screen` (pure, on numbers). Here the shell
gathers what it needs in **one** host synchronization per step — gradient norms (in float32;
one that is not finite is recomputed in float64, so a 1e20 spike that overflows ``‖g‖²`` is
told from a non-finite gradient), the largest entry and the trace of each statistic —
decides whether the step runs at all, and keeps the verdicts for the update. Also: the checks of
group values when ``step()`` reads them, of ``params`` against ``model``, and the release of
hooks.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from structvi.optim import _compile
from structvi.optim import functional as F
from structvi.optim.config import check_group as _check_core_group

if TYPE_CHECKING:
    from structvi.optim.optimizer import StructuredNGD

__all__ = ["DEFAULT_THRESHOLD", "check_group", "check_groups_for_step", "check_params_in_model",
           "release", "screen_step", "screened_statistics", "squared_norm", "write_running"]

DEFAULT_THRESHOLD = 10.0
RUNNING_KEY = "outlier_mean"


def squared_norm(t: Tensor) -> Tensor:
    """``‖t‖²`` accumulated in float64 (a 0-d tensor on ``t``'s device; no synchronization)."""
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float64).square()


def check_group(group: dict[str, Any], index: int) -> None:
    """Validate the robustness options of a group (``outlier_threshold``)."""
    value = group.get("outlier_threshold", DEFAULT_THRESHOLD)
    ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                           and math.isfinite(value) and value > 1.0)
    if not ok:
        where = "" if index == 0 else f" (param group {index})"
        raise ValueError(f"outlier_threshold{where} must be a finite number > 1 or None (no "
                         f"clipping), got outlier_threshold={value!r}")


def _snapshot(group: dict[str, Any]) -> tuple | None:
    """The group's ``(key, value)`` pairs (``params`` left out) for an identity comparison, or
    ``None`` when a value is a mutable container (it could change without a new object)."""
    items = tuple((k, v) for k, v in group.items() if k != "params")
    if any(isinstance(v, (list, dict, set)) for _, v in items):
        return None
    return items


def _unchanged(group: dict[str, Any], snapshot: tuple | None) -> bool:
    """Whether every value of ``group`` is the very object it was when last validated."""
    if snapshot is None or len(snapshot) != len(group) - ("params" in group):
        return False
    return all(group.get(k, snapshot) is v for k, v in snapshot)


def check_groups_for_step(opt: StructuredNGD) -> None:
    """Re-validate every group when ``step()`` reads it (values may be set after construction).

    A group whose values are all the same objects as at its last validation (no assignment
    since; numbers and tuples cannot change in place) is not validated again.
    """
    checked = opt._checked_groups
    for index, group in enumerate(opt.param_groups):
        if _unchanged(group, checked.get(id(group))):
            continue
        try:
            _check_core_group(group, index)
            check_group(group, index)
        except ValueError as err:
            raise ValueError(f"{err}; step() read it from param_groups[{index}] (set after "
                             "construction?): set a valid value before calling step()") from err
        checked[id(group)] = _snapshot(group)


def check_params_in_model(opt: StructuredNGD) -> None:
    """``params`` must come from ``model``; foreign tensors get the diagonal rule (warning)."""
    owned = {id(p) for p in opt._model.parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    foreign = [p for p in params if id(p) not in owned]
    if not foreign:
        return
    shapes = [tuple(p.shape) for p in foreign[:4]] + (["..."] if len(foreign) > 4 else [])
    if len(foreign) == len(params):
        raise ValueError(
            f"params: none of the {len(params)} parameters (shapes {shapes}) is a parameter of "
            f"model ({type(opt._model).__name__}); pass the model these parameters belong to, "
            "or params=model.parameters()")
    warnings.warn(
        f"StructuredNGD: {len(foreign)} of the {len(params)} parameters (shapes {shapes}) are not "
        f"parameters of model ({type(opt._model).__name__}); they follow the diagonal rule "
        "without a Kronecker preconditioner. Pass the model they belong to if they should be "
        "preconditioned.", stacklevel=3)


def release(handles: list, keys: list[int]) -> None:
    """Remove hook handles and compile-tap receivers (``close()`` and garbage collection)."""
    for handle in handles:
        handle.remove()
    handles.clear()
    _compile.release_receivers(keys)
    keys.clear()


def _running(state: dict[str, Any], size: int) -> tuple[float, ...]:
    saved = state.get(RUNNING_KEY)
    if not isinstance(saved, Tensor) or saved.numel() != size:
        return (0.0,) * size
    return tuple(saved.tolist())


def write_running(state: dict[str, Any], verdict: F.Screen) -> None:
    """Store the verdict's running means (a float64 CPU tensor in the parameter's state,
    written in place when it is there, as the step counters are)."""
    running = verdict.running
    if not running:
        return
    held = state.get(RUNNING_KEY)
    if (isinstance(held, Tensor) and held.dtype == torch.float64 and held.device.type == "cpu"
            and held.shape == (len(running),) and not held.requires_grad):
        held.numpy()[:] = running
    else:
        state[RUNNING_KEY] = torch.tensor(running, dtype=torch.float64)


class _Entry:
    """One layer or diagonal-rule parameter being screened: where its values are."""

    def __init__(self, key: Tensor, name: str, group: dict[str, Any], start: int,
                 stats: tuple | None = None, layer: Any = None) -> None:
        self.key, self.name, self.group, self.start = key, name, group, start
        self.stats, self.layer = stats, layer
        self.grads: list[int] = []  # indices of its gradients in the gathered gradient list
        self.values: list[int] = []  # indices of its other values (backward norm, statistics)


def _gather(opt: StructuredNGD) -> tuple[list[_Entry], list[float]]:
    """Every entry to screen and its values on the host, laid out per entry as
    ``[‖∇‖², backward ‖∇‖² (-1: unknown), max|H_K|, tr H_K, max|H_C|, tr H_C]`` for a layer (the
    statistics on steps that update the preconditioner) and ``[‖∇‖²]`` for a parameter."""
    entries: list[_Entry] = []
    grads: list[Tensor] = []
    values: list[Tensor | None] = []  # None: an unknown backward norm (-1 on the host)
    layers, biases, state = opt._layers, opt._biases, opt.state
    for group in opt.param_groups:
        for p in group["params"]:
            layer = layers.get(p)
            if layer is not None:
                if p.grad is None:
                    continue
                parts = [q for q in (layer.weight, layer.bias) if q is not None and q.grad
                         is not None]
                entry = _Entry(p, "", group, 0, layer=layer)  # named only if needed
                entry.grads = list(range(len(grads), len(grads) + len(parts)))
                grads += [q.grad for q in parts]
                entry.values.append(len(values))
                norms = opt._backward_norms
                backward = [norms.get(q) for q in parts] if norms else [None]
                values.append(sum(backward) if all(b is not None for b in backward) else None)
                stats = opt._stats.get(p)
                if stats is not None and int(state[p]["step"]) % group["T"] == 0:
                    F.schedule(group["lr_cov"], int(state[p]["step"]))  # a bad schedule fails
                    H_K, H_C = stats.finalize()                          # before any change
                    entry.stats = (H_K, H_C)
                    entry.values += range(len(values), len(values) + 4)
                    values += [H_K.max_abs(), H_K.trace(), H_C.max_abs(), H_C.trace()]
                entries.append(entry)
            elif p not in biases and p.grad is not None:
                entry = _Entry(p, "", group, 0)  # named only if needed
                entry.grads = [len(grads)]
                grads.append(p.grad)
                entries.append(entry)
    known = [v for v in values if v is not None]
    gathered = _to_host(_grad_norms(grads) + known)  # the step's one host synchronization
    norms, known_host = gathered[:len(grads)], iter(gathered[len(grads):])
    others = [-1.0 if v is None else next(known_host) for v in values]
    bad = [i for i, n in enumerate(norms) if not math.isfinite(n)]
    if bad:  # overflow of the float32 norm, or a non-finite gradient: decide in float64
        exact = _to_host([squared_norm(grads[i]).sqrt() for i in bad])
        for i, n in zip(bad, exact):
            norms[i] = n
    host: list[float] = []
    for e in entries:
        e.start = len(host)
        now = 0.0  # ‖∇W‖² + ‖∇b‖² in float64, as the tensors' sum would be
        for i in e.grads:
            now = now + norms[i] * norms[i]
        host.append(now)
        host += [others[i] for i in e.values]
    return entries, host


def _grad_norms(grads: list[Tensor]) -> list[Tensor]:
    """``‖g‖`` of every gradient, one fused call per device and precision (no synchronization):
    in float32 for float32 and narrower gradients (a non-finite result, which may be an
    overflow of ``‖g‖²``, is recomputed in float64 by the caller), in float64 for float64."""
    if not grads:
        return []
    first = grads[0]
    wide = first.dtype == torch.float64
    if all(g.device == first.device and (g.dtype == torch.float64) == wide for g in grads):
        with torch.no_grad():  # the usual case: one device, one precision
            return list(torch._foreach_norm(grads, 2, dtype=torch.float64 if wide
                                            else torch.float32))
    out: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
    by_kind: dict[tuple[torch.device, bool], list[int]] = {}
    for i, g in enumerate(grads):
        by_kind.setdefault((g.device, g.dtype == torch.float64), []).append(i)
    for (_, wide), indices in by_kind.items():
        with torch.no_grad():
            norms = torch._foreach_norm([grads[i] for i in indices], 2,
                                        dtype=torch.float64 if wide else torch.float32)
        for i, n in zip(indices, norms):
            out[i] = n
    return out


def _to_host(values: list[Tensor]) -> list[float]:
    """All values as floats with one transfer per device."""
    if not values:
        return []
    device = values[0].device
    if all(v.device == device for v in values):
        return torch.stack(values).tolist()
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for indices in by_device.values():
        host = torch.stack([values[i] for i in indices]).tolist()
        for i, v in zip(indices, host):
            out[i] = v
    return out


def screen_step(opt: StructuredNGD, scale: float) -> bool:
    """Screen the whole step; ``False``: skipped (non-finite), with the state untouched.

    On ``True`` the verdicts are in ``opt._verdicts`` and the screened statistics in
    ``opt._screened`` for the update.
    """
    entries, host = _gather(opt)
    bad = next((e for e in entries if not _finite(e, host)), None)
    if bad is not None:
        _skip(opt, _name(opt, bad))
        return False
    clipped = None
    for e in entries:
        verdict = _verdict(opt, e, host, scale)
        opt._verdicts[e.key] = verdict
        if verdict.clipped and clipped is None:
            clipped = _name(opt, e)
        if e.stats is not None and verdict.update_factors:
            f_K, f_C = verdict.stat_factors
            H_K, H_C = e.stats
            opt._screened[e.key] = (H_K if f_K == 1.0 else H_K.scale(f_K),
                                    H_C if f_C == 1.0 else H_C.scale(f_C))
    if clipped is not None:
        opt.clipped_steps += 1
        _warn_once(opt, "clipped", f"StructuredNGD: an outlier gradient or statistic of "
                   f"{clipped} was clipped to outlier_threshold times its running mean; further "
                   "clips are counted in optimizer.clipped_steps without a warning")
    return True


def _name(opt: StructuredNGD, e: _Entry) -> str:
    if e.name:
        return e.name
    if e.layer is not None:
        return f"layer {e.layer.name!r}"
    name = next((n for n, p in opt._model.named_parameters() if p is e.key), tuple(e.key.shape))
    return f"parameter {name!r}"


def _finite(e: _Entry, host: list[float]) -> bool:
    count = 1 if e.layer is None else (2 + (4 if e.stats is not None else 0))
    values = host[e.start:e.start + count]
    if e.layer is not None:
        values = values[:1] + values[2:]  # the backward norm is informative only
    return all(math.isfinite(v) for v in values)


def _verdict(opt: StructuredNGD, e: _Entry, host: list[float], scale: float) -> F.Screen:
    kappa = e.group.get("outlier_threshold", DEFAULT_THRESHOLD)
    state = opt.state[e.key]
    now = math.sqrt(host[e.start])
    if e.layer is None:
        return F.screen(now / scale, _running(state, 1), threshold=kappa)
    before = host[e.start + 1]
    modified = math.sqrt(host[e.start] / before) if before > 0.0 and math.isfinite(before) \
        else 1.0
    stats = None
    if e.stats is not None:
        H_K, H_C = e.stats
        unscale = float(state["grad_scale"]) / scale**2
        stats = (host[e.start + 3] / H_K.dim, host[e.start + 5] * unscale / H_C.dim)
    return F.screen(now / scale, _running(state, 3), threshold=kappa, stats=stats,
                    modified=modified)


def _skip(opt: StructuredNGD, name: str) -> None:
    opt._stats.clear()
    opt._backward_norms.clear()
    opt.skipped_steps += 1
    _warn_once(opt, "skipped", f"StructuredNGD: step skipped, the gradient or the curvature "
               f"statistics of {name} are not finite (NaN/inf loss or input?); parameters and "
               "optimizer state are unchanged. Further skips are counted in "
               "optimizer.skipped_steps without a warning")


def _warn_once(opt: StructuredNGD, key: str, message: str) -> None:
    if key not in opt._warned:
        opt._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def screened_statistics(opt: StructuredNGD, layer: Any, stats: Any) -> tuple:
    """``(H_K, H_C)`` of this step as screened (or finalized now, if not screened)."""
    screened = opt._screened.pop(layer.weight, None)
    return screened if screened is not None else stats.finalize()


