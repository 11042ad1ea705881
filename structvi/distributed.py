r"""Data-parallel structured VI on ``torch.distributed``: one ``q``, the data sharded over ranks.

Shared by :func:`structvi.fit` / :class:`structvi.fit.Fitter` and
:class:`structvi.pyro.NaturalGradientSVI` (both pass their ``process_group`` argument to
:func:`resolve`), so the reduction lives in one place below the two front ends. (The optimizer's
data parallelism is :mod:`structvi.optim.distributed`.)

Rank ``r`` evaluates its own ``log_joint_r`` (its shard of the data); the full log-joint is

.. math:: \log p(z, \mathcal D) = \sum_r w_r \log p_r(z),

with ``w_r = weight`` of :class:`DataParallelVI`. The default ``w_r = 1/R`` fits the minibatch
convention of :func:`structvi.fit.fit` and of a subsampled ``pyro.plate``: each rank returns the
full-data estimate ``(N/n_r) Σ_{i∈shard} log p(y_i|z) + log p(z)``, and with equal shards the
average over ranks is the full log-joint exactly. Use ``weight=1.0`` for log-joints whose sum
over ranks is the full one (e.g. ``Σ_{i∈shard} log p(y_i|z) + log p(z)/R``), and
``weight=n_r/N`` for unequal shards in the minibatch convention.

Every estimator is affine in the log-joint — ``E[∇f]`` and the log-joint values linearly, the
curvature ``Π̂(Kᵀ Ē K)`` linearly plus the Stein control variate ``c·Π̂(I − εεᵀ)`` — so each rank
estimates with its own log-joint and the control ``c/W`` (``W = Σ_r w_r``), and one
``all_reduce`` of ``w_r·(E[∇f], Π̂(Kᵀ Ē K), log-joint values)`` (one flattened bucket) gives the
estimate of the full log-joint from the same samples. The mean line search's curvature ``uᵀ(KᵀĒK)u``
is reduced the same way (one scalar). All ranks draw ``ε`` from generators with the same state
(broadcast from rank 0 at start, with ``q``), so they hold the same ``q`` after every step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from structvi.engine import NGDState, NGDStats
from structvi.estimators import Estimate, LogJoint, estimate
from structvi.structures import Structure, structure_from_spec

__all__ = ["DataParallelVI", "init_from_env", "resolve"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve(process_group: Any) -> DataParallelVI | None:
    """The data parallelism a ``process_group`` argument asks for.

    Args:
        process_group: ``None`` (the default group if one with more than one rank is
            initialized, else none), ``False`` (none: each rank fits on its own), a
            ``ProcessGroup`` (``w_r = 1/R``) or a :class:`DataParallelVI`.

    Raises:
        TypeError: any other value.
        RuntimeError: a process group is passed but ``torch.distributed`` is not initialized.
    """
    if process_group is False or (process_group is None and not _active()):
        return None
    if isinstance(process_group, DataParallelVI):
        return process_group
    if process_group is None or isinstance(process_group, dist.ProcessGroup):
        return DataParallelVI(process_group)
    raise TypeError(f"process_group must be None, False, a torch.distributed ProcessGroup or a "
                    f"structvi.distributed.DataParallelVI, got process_group={process_group!r}")


def init_from_env(timeout: float = 60.0) -> torch.device:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ...) and return
    this rank's device.

    NCCL with one GPU per local rank (``LOCAL_RANK``) when that many GPUs are visible, else gloo
    on the CPU. ``timeout`` (seconds) bounds every collective, so a rank that dies or stalls ends
    the job with an error instead of a hang. Without ``torchrun`` (no ``RANK`` in the
    environment) nothing is initialized and the CPU (or the first GPU) is returned.
    """
    import datetime
    import os

    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    device = torch.device("cuda", local_rank) if use_nccl else torch.device("cpu")
    if use_nccl:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_nccl else "gloo",
                            timeout=datetime.timedelta(seconds=timeout))
    return device


def _comm_device(group: Any) -> torch.device:
    """Where collectives run: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _src(group: Any) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


class DataParallelVI:
    """How the ranks' log-joints combine (module doc) and the collectives of one VI step.

    Args:
        process_group: the group (``None``: the default group).
        weight: this rank's ``w_r`` (``None``: ``1/world_size``, the minibatch convention).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
        ValueError: ``weight`` not a finite number ``>= 0``, or all ranks' weights are 0.
    """

    def __init__(self, process_group: Any = None, *, weight: float | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DataParallelVI needs an initialized torch.distributed process "
                               "group (torch.distributed.init_process_group, e.g. under torchrun)")
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.device = _comm_device(process_group)
        weight = 1.0 / self.world_size if weight is None else weight
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not (ok and weight >= 0 and weight != float("inf")):
            raise ValueError(f"weight must be a finite number >= 0 (this rank's share of the "
                             f"log-joint), got weight={weight!r}")
        self.weight = float(weight)
        total = torch.tensor([self.weight], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=process_group)
        self.total_weight = float(total)
        if not self.total_weight > 0:
            raise ValueError("weight: the ranks' weights sum to 0; at least one must be > 0")

    # ------------------------------------------------------------------ start
    def broadcast_state(self, state: NGDState, generator: torch.Generator) -> NGDState:
        """``state`` and ``generator``'s state from rank 0 (in place for the generator)."""
        gen = generator.get_state()
        tensors = [state.loc, state.loc_momentum, *state.factor.tensors().values(),
                   *state.factor_momentum.tensors().values()]
        flat = self._broadcast(torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]))
        gen_bytes = self._broadcast(gen.to(torch.int64)).to(torch.uint8).cpu()
        generator.set_state(gen_bytes)
        loc, offset = _take(flat, 0, state.loc)
        loc_m, offset = _take(flat, offset, state.loc_momentum)
        factor, offset = _unpack(flat, offset, state.factor)
        factor_m, offset = _unpack(flat, offset, state.factor_momentum)
        return state._replace(loc=loc, loc_momentum=loc_m, factor=factor, factor_momentum=factor_m)

    def _broadcast(self, t: Tensor) -> Tensor:
        t = t.to(self.device)
        dist.broadcast(t, _src(self.group), group=self.group)
        return t

    # ------------------------------------------------------------------ each step
    def estimate(self, log_joint: LogJoint, loc: Tensor, factor: Structure, *,
                 estimator: str = "stein", num_samples: int | None = None,
                 generator: torch.Generator | None = None, temperature: float = 1.0,
                 point_dtype: torch.dtype | None = None) -> Estimate:
        """:func:`structvi.estimators.estimate` of the full log-joint ``Σ_r w_r log_joint_r``.

        Same arguments as :func:`~structvi.estimators.estimate`; ``log_joint`` is this rank's.
        The ranks must agree on which samples count: a sample dropped for a non-finite value on
        one rank is not known to the others, so a step in which any rank dropped a sample
        fails on every rank (the fitter's non-finite rule then shrinks or stops, identically
        everywhere).
        """
        local = estimate(log_joint, loc, factor, estimator=estimator, num_samples=num_samples,
                         generator=generator, temperature=temperature / self.total_weight,
                         point_dtype=point_dtype)
        dropped = torch.tensor([float(local.stats is None or local.num_dropped > 0)],
                               dtype=torch.float64, device=self.device)
        dist.all_reduce(dropped, group=self.group)
        if float(dropped) > 0:
            empty = local.log_joint[:0]
            return Estimate(None, empty, local.quad_form, None,
                            max(local.num_dropped, 1), local.bad_value)
        grad, curvature, values = local.stats.grad, local.stats.curvature, local.log_joint
        parts = [grad, *curvature.tensors().values(), values]
        flat = self._all_reduce(parts)
        grad, offset = _take(flat, 0, grad)
        curvature, offset = _unpack(flat, offset, curvature)
        values, offset = _take(flat, offset, values)

        def quad_form(u: Tensor) -> Tensor:
            value = local.quad_form(u)
            return self._all_reduce([value.reshape(1)]).to(value.dtype).reshape(())

        return Estimate(NGDStats(grad, curvature), values, quad_form, local.eps, 0, None)

    def reduce_values(self, values: Tensor) -> Tensor:
        """``Σ_r w_r values_r``: this rank's log-joint values at points every rank shares (the
        fitter's acceptance test), in ``values``' dtype and device."""
        return self._all_reduce([values]).to(dtype=values.dtype, device=values.device)

    def _all_reduce(self, parts: list[Tensor]) -> Tensor:
        """``Σ_r w_r · parts_r`` as one float64 bucket (on the CPU)."""
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in parts]) * self.weight
        flat = flat.to(self.device)
        dist.all_reduce(flat, group=self.group)
        return flat.cpu()


def _take(flat: Tensor, offset: int, like: Tensor) -> tuple[Tensor, int]:
    n = like.numel()
    out = flat[offset: offset + n].reshape(like.shape).to(dtype=like.dtype, device=like.device)
    return out.clone(), offset + n


def _unpack(flat: Tensor, offset: int, like: Structure) -> tuple[Structure, int]:
    tensors = {}
    for name, t in like.tensors().items():
        tensors[name], offset = _take(flat, offset, t)
    return structure_from_spec(tensors, like.spec()), offset
