r""":class:`~structvi.optim.StructuredNGD` on ``torch.distributed``: data-parallel training.

Everything distributed about the optimizer lives here. ``StructuredNGD(model)`` installs a
:class:`DataParallelReducer` as :attr:`~structvi.optim.StructuredNGD.reducer` when ``model`` is
wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (DDP), or when it is a bare module
and a process group with more than one rank is initialized; otherwise nothing changes.

**What is communicated.** Rank ``r`` sees ``n_r`` loss terms (its batch) and ``n_a^r`` input rows
per layer. The single-process optimizer on the concatenated batch uses, per layer,

.. math::
    H_K = \frac{\sum_r n_a^r H_K^r}{\sum_r n_a^r}, \qquad
    H_C = \frac{\sum_r n_r H_C^r}{\sum_r n_r}\ \ (\text{averaged loss}), \qquad
    H_C = \sum_r H_C^r\ \ (\text{summed loss}),

and the gradient :math:`\nabla = \sum_r n_r \nabla_r / \sum_r n_r` (averaged loss) or
:math:`\sum_r \nabla_r` (summed loss). So on every update step (``step % T == 0``) all layers'
weighted statistics and counts go into **one** flattened bucket and one ``all_reduce``. The
gradients:

* **DDP**: DDP all-reduces them during backward; a communication hook (installed once) weights
  each rank's bucket by ``n_r`` and divides by ``Σ n_r`` (one extra element per bucket), which is
  DDP's average for equal batches and the exact large-batch gradient for unequal ones or summed
  losses. Gradient accumulation under ``ddp.no_sync()`` works as in DDP: statistics accumulate
  locally and are reduced at ``step()``. If the DDP model already has a communication hook, DDP's
  average is kept (equal per-rank batches and averaged losses are then required; a warning says
  so).
* **bare module** under an initialized process group: the gradients join the statistics bucket
  (still one ``all_reduce`` per step), and the parameters and buffers are broadcast from rank 0
  once, at construction, as DDP does.

``n_r`` is counted from the model's output on forward passes with gradients enabled since the
last step (``"batch"``: its first dimension; ``"batch+sequence"``: all dimensions but the last;
summed loss: 1); :meth:`DataParallelReducer.set_loss_terms` overrides it for models whose output
does not carry the loss terms. All ranks then hold the same reduced statistics and gradients and
apply the same deterministic update, so their factors and parameters stay bit-identical
(:meth:`DataParallelReducer.check_consistency` verifies it).

**Work spreading** (``reducer.spread_work``, on by default): on update steps each layer's factor
update (MATH (3.2)) is computed by one rank and broadcast (one bucket per source rank) instead of
by every rank. Layers are assigned by the longest-processing-time rule: sorted by
:func:`layer_cost` (largest first, ties by layer order), each goes to the rank with the least total
cost so far. ``benchmarks/ddp_scaling.py`` measured it 1.2–1.8× faster than every rank updating
every layer where factor updates are expensive (dense, hierarchical; two CPU processes, gloo) and
even within noise for diagonal factors; ``opt.reducer.spread_work = False`` updates every layer
on every rank.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from structvi.optim import functional as F
from structvi.optim import kfac
from structvi.optim.ddp_hooks import (
    first_tensor, loss_terms, step_pre_hook, weighted_allreduce_hook,
)
from structvi.structures.base import Structure
from structvi.structures.registry import structure_from_spec

__all__ = ["DataParallelReducer", "assign_layers", "data_parallel_reducer", "layer_cost",
           "loss_terms"]


def data_parallel_reducer(optimizer: Any, model: nn.Module, ddp: nn.Module | None) -> Any:
    """The reducer ``StructuredNGD`` installs: :data:`~structvi.optim.functional.LOCAL` unless
    ``ddp`` is given or a process group of more than one rank is initialized."""
    if ddp is None and not (dist.is_available() and dist.is_initialized()
                            and dist.get_world_size() > 1):
        return F.LOCAL
    group = getattr(ddp, "process_group", None) if ddp is not None else None
    return DataParallelReducer(optimizer, model, ddp=ddp, group=group)


def layer_cost(factors: F.FactorState) -> float:
    """Relative cost of one layer's factor update: ``Σ (stored numbers)^{3/2}`` over ``K, C``.

    A dense ``d×d`` factor stores ``d²`` numbers and its update costs ``O(d³)`` products; sparse
    structures cost proportionally less.
    """
    return float(sum(sum(t.numel() for t in s.tensors().values()) ** 1.5
                     for s in (factors.K, factors.C)))


def assign_layers(costs: list[float], world_size: int) -> list[int]:
    """Owner rank of each layer: longest-processing-time first, least-loaded rank wins.

    Deterministic (every rank computes the same assignment from the same costs).
    """
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


class _Reduced:
    """Stands in for a layer's :class:`~structvi.optim.kfac.KroneckerStatistics` after the
    all-reduce: ``finalize()`` returns the global ``(H_K, H_C)``."""

    def __init__(self, H_K: Structure, H_C: Structure) -> None:
        self.H_K, self.H_C = H_K, H_C

    def finalize(self) -> tuple[Structure, Structure]:
        return self.H_K, self.H_C


def _bucket_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """float64 if any tensor is, else float32 (low-precision values are reduced in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class DataParallelReducer:
    """The data-parallel :class:`~structvi.optim.functional.Reducer` of ``StructuredNGD``.

    Built by ``StructuredNGD`` (see the module doc); users only set :attr:`spread_work` (work
    spreading, default ``True``) or call :meth:`set_loss_terms` / :meth:`check_consistency`.

    Args:
        optimizer: the ``StructuredNGD``.
        model: the (unwrapped) module.
        ddp: the DDP wrapper, or ``None`` for a bare module.
        group: process group (``None``: the default group).

    Raises:
        ValueError: the param groups use different ``loss_average`` values.
    """

    def __init__(self, optimizer: Any, model: nn.Module, *, ddp: nn.Module | None,
                 group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ddp = ddp is not None
        self.spread_work = True
        averages = {g["loss_average"] for g in optimizer.param_groups}
        if len(averages) > 1:
            raise ValueError(f"loss_average: data-parallel training needs one loss_average for "
                             f"every param group, got {sorted(map(str, averages))}")
        self.loss_average = averages.pop()
        self._loss_terms = 0
        self._override: int | None = None
        self._done: dict[Tensor, F.FactorState] = {}
        optimizer._handles.append(model.register_forward_hook(kfac.WeakHook(self, "_count")))
        optimizer._handles.append(optimizer.register_step_pre_hook(step_pre_hook))
        self._original = optimizer._update_factors
        optimizer._update_factors = self._update_or_apply
        self.weighted_gradients = True
        if ddp is not None:
            self._install_comm_hook(ddp)
        else:
            self._broadcast_module(model)

    # ------------------------------------------------------------------ Reducer protocol
    def statistics(self, H_K: Structure, H_C: Structure, loss_average: str | None
                   ) -> tuple[Structure, Structure]:
        """Identity: the statistics were all-reduced in one bucket at the start of ``step``."""
        del loss_average
        return H_K, H_C

    def gradient(self, grad: Tensor, loss_average: str | None) -> Tensor:
        """Identity: DDP (or the step's bucket) already reduced the gradients."""
        del loss_average
        return grad

    # ------------------------------------------------------------------ loss terms
    def _count(self, module: nn.Module, inputs: Any, output: Any) -> None:
        del module, inputs
        tensor = first_tensor(output)
        if tensor is not None and torch.is_grad_enabled():
            self._loss_terms += loss_terms(tensor, self.loss_average)

    def set_loss_terms(self, n: int) -> None:
        """Use ``n`` as this rank's number of loss terms until the next ``step()``.

        Call it before ``backward()``: DDP's communication hook reads it during the backward pass.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0 (this rank's loss terms), got n={n!r}")
        self._override = n

    def _weight(self) -> float:
        """``n_r`` for an averaged loss, 1 for a summed one (or when nothing was counted)."""
        n = self._override if self._override is not None else self._loss_terms
        return 1.0 if self.loss_average is None or n <= 0 else float(n)

    # ------------------------------------------------------------------ set-up
    def _broadcast_module(self, model: nn.Module) -> None:
        """Parameters and buffers from rank 0, in one bucket (as DDP does at construction)."""
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        if not tensors:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).to(tensors[0].device, torch.float64)
                              for t in tensors])
            dist.broadcast(flat, dist.get_global_rank(self.group, 0) if self.group else 0,
                           group=self.group)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()

    def _install_comm_hook(self, ddp: nn.Module) -> None:
        try:
            ddp.register_comm_hook(weakref.ref(self), weighted_allreduce_hook)
        except RuntimeError as err:  # a hook is already registered
            self.weighted_gradients = False
            warnings.warn(f"StructuredNGD: the DDP model already has a communication hook ({err});"
                          " its gradient reduction is kept, so per-rank batches must be equal and "
                          "the loss averaged for single-process equivalence", stacklevel=4)

    # ------------------------------------------------------------------ the step
    def prepare_step(self, optimizer: Any) -> None:
        """Before the layer loop of ``step()``: one all-reduce of statistics (and gradients)."""
        if not self.ddp and getattr(optimizer, "found_inf", None) is not None:
            raise RuntimeError("StructuredNGD: a GradScaler with a bare module under a process "
                               "group is not supported (each rank would check its own unreduced "
                               "gradients); wrap the model in DistributedDataParallel")
        scale, skip = optimizer._amp_scale()
        self._done.clear()
        try:
            if skip:
                return
            due = [(layer, g) for g in optimizer.param_groups for p in g["params"]
                   if (layer := optimizer._layers.get(p)) is not None
                   and int(optimizer.state[p]["step"]) % g["T"] == 0]
            params = [] if self.ddp else [p for g in optimizer.param_groups for p in g["params"]]
            if not due and not params:
                return
            reduced = self._reduce(optimizer, due, params)
            if self.spread_work and reduced:
                self._spread_updates(optimizer, reduced, scale)
        finally:
            self._loss_terms, self._override = 0, None

    def _reduce(self, optimizer: Any, due: list, params: list[Tensor]) -> list:
        """The step's bucket: weighted statistics, counts, gradients; write the results back."""
        w = self._weight()
        parts: list[Tensor] = []
        templates = []
        for layer, group in due:
            factors = optimizer._factors(layer)
            stats = optimizer._stats.pop(layer.weight, None)
            if stats is None:
                H_K, H_C, n_a, n_c = factors.K.zeros_like(), factors.C.zeros_like(), 0, 0
            else:  # weights: rows (input side); loss terms (averaged loss) or 1 (summed)
                (H_K, H_C), n_a = stats.finalize(), stats.input_side.count
                n_c = stats.grad_side.count if stats.mean_loss else 1
            templates.append((layer, group, H_K, H_C))
            parts += [t * n_a for t in H_K.tensors().values()]
            parts += [t * n_c for t in H_C.tensors().values()]
            parts.append(torch.tensor([n_a, n_c], dtype=torch.float32))  # exact below 2**24
        grads = [p.grad for p in params]
        for p, g in zip(params, grads):
            parts.append(torch.zeros_like(p) if g is None else g * w)
        if params:
            parts.append(torch.tensor([w] + [float(g is not None) for g in grads],
                                      dtype=torch.float32))
        flat = self._all_reduce(parts)
        reduced = []
        offset = 0
        for layer, group, H_K, H_C in templates:
            H_K, offset = _unpack_structure(flat, offset, H_K)
            H_C, offset = _unpack_structure(flat, offset, H_C)
            n_a, n_c = flat[offset: offset + 2].tolist()
            offset += 2
            if n_a > 0:  # a summed loss's H_C is the plain sum over ranks
                mean = group["loss_average"] is not None and n_c > 0
                stats = _Reduced(H_K.scale(1.0 / n_a), H_C.scale(1.0 / n_c) if mean else H_C)
                optimizer._stats[layer.weight] = stats
                reduced.append((layer, group, stats))
        if params:
            self._write_gradients(params, flat, offset)
        return reduced

    def _all_reduce(self, parts: list[Tensor]) -> Tensor:
        device = next((t.device for t in parts if t.device.type != "cpu"), torch.device("cpu"))
        dtype = _bucket_dtype(parts)
        flat = torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in parts])
        dist.all_reduce(flat, group=self.group)
        return flat

    def _write_gradients(self, params: list[Tensor], flat: Tensor, offset: int) -> None:
        sizes = [p.numel() for p in params]
        tail = flat[offset + sum(sizes):]
        total, present = float(tail[0]), tail[1:].tolist()
        divide = total if self.loss_average is not None else 1.0
        for p, n, seen in zip(params, sizes, present):
            if seen:
                value = (flat[offset: offset + n] / divide).view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = value.clone()
                else:
                    p.grad.copy_(value)
            offset += n

    # ------------------------------------------------------------------ work spreading
    def _spread_updates(self, optimizer: Any, reduced: list, scale: float) -> None:
        """Each layer's factor update on its owner rank, then one broadcast per source rank."""
        reduced = [r for r in reduced if r[0].weight.grad is not None]  # others: no update
        owners = assign_layers([layer_cost(optimizer._factors(layer))
                                for layer, _, _ in reduced], self.world_size)
        new: dict[Tensor, F.FactorState] = {}
        for (layer, group, stats), owner in zip(reduced, owners):
            optimizer._stats.pop(layer.weight, None)
            if owner == self.rank:
                new[layer.weight] = self._original(layer, group, optimizer._factors(layer), stats,
                                                   scale)
        for source in range(self.world_size):
            mine = [(layer, group) for (layer, group, _), o in zip(reduced, owners) if o == source]
            if not mine:
                continue
            templates = [new.get(layer.weight) or optimizer._factors(layer) for layer, _ in mine]
            tensors = [t for f in templates for s in f if s is not None
                       for t in s.tensors().values()]
            dtype = _bucket_dtype(tensors)
            flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
            src = dist.get_global_rank(self.group, source) if self.group else source
            dist.broadcast(flat, src, group=self.group)
            offset = 0
            for (layer, _), factors in zip(mine, templates):
                parts = []
                for s in factors:
                    if s is None:
                        parts.append(None)
                        continue
                    s, offset = _unpack_structure(flat, offset, s)
                    parts.append(s)
                if source != self.rank:
                    _write_factors(optimizer, layer, F.FactorState(*parts))
                self._done[layer.weight] = optimizer._factors(layer)

    def _update_or_apply(self, layer: kfac.Layer, group: dict, factors: Any, stats: Any,
                         scale: float) -> F.FactorState:
        """``StructuredNGD._update_factors``, or the factors a work-spread step already set."""
        done = self._done.pop(layer.weight, None)
        if done is not None:
            return done
        return self._original(layer, group, factors, stats, scale)

    # ------------------------------------------------------------------ checks
    def check_consistency(self, optimizer: Any) -> None:
        """Raise ``RuntimeError`` unless every rank holds bit-identical factors and parameters.

        Two ``all_reduce`` calls (MAX and MIN of a float64 view of every tensor); for tests and
        debugging, not for every step.
        """
        tensors = [p.detach() for g in optimizer.param_groups for p in g["params"]]
        for layer in optimizer._layers.values():
            tensors += [t for s in optimizer._factors(layer) if s is not None
                        for t in s.tensors().values()]
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        if not torch.equal(high, low):
            bad = int((high != low).sum())
            raise RuntimeError(f"StructuredNGD: {bad} of {flat.numel()} numbers differ across "
                               "ranks (factors/parameters are not identical)")


def _write_factors(optimizer: Any, layer: kfac.Layer, factors: F.FactorState) -> None:
    optimizer._store_factors(layer, factors)


def _unpack_structure(flat: Tensor, offset: int, like: Structure) -> tuple[Structure, int]:
    """A structure shaped like ``like`` from ``flat[offset:]`` (in ``like``'s dtype/device)."""
    tensors = {}
    for name, t in like.tensors().items():
        tensors[name] = flat[offset: offset + t.numel()].view(t.shape).to(
            device=t.device, dtype=t.dtype).clone()
        offset += t.numel()
    return structure_from_spec(tensors, like.spec()), offset
