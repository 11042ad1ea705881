"""Hooks of :mod:`structvi.optim.distributed`: DDP's communication hook, the optimizer's step
pre-hook, and how a model output counts loss terms.

Nothing here runs in single-process training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["first_tensor", "loss_terms", "step_pre_hook", "weighted_allreduce_hook"]


def first_tensor(output: Any) -> Tensor | None:
    """The first tensor in a model output (a tensor, or nested tuples/lists/dicts)."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, dict) else (
        output if isinstance(output, (tuple, list)) else ())
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def loss_terms(output: Tensor, loss_average: str | None) -> int:
    """Loss terms of one forward pass from the model output (:mod:`structvi.optim.distributed`)."""
    if loss_average is None or output.dim() < 2:
        return 1
    return output.shape[0] if loss_average == "batch" else output.shape[:-1].numel()


def step_pre_hook(optimizer: Any, args: tuple, kwargs: dict) -> tuple | None:
    """Step pre-hook: reduce now, or right after the closure's backward when one is given."""
    reducer = optimizer.reducer
    prepare = getattr(reducer, "prepare_step", None)
    if prepare is None:  # the reducer was replaced (e.g. by LOCAL)
        return None
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        prepare(optimizer)
        return None

    def wrapped() -> Any:
        loss = closure()
        prepare(optimizer)
        return loss

    return (args[0],), {"closure": wrapped}


def weighted_allreduce_hook(state, bucket):  # noqa: ANN001, ANN201 (DDP checks real annotations)
    """DDP communication hook: ``Σ_r n_r ∇_r / Σ_r n_r`` (averaged loss) or ``Σ_r ∇_r``.

    ``state`` is a weak reference to the :class:`DataParallelReducer`, ``bucket`` a
    ``dist.GradBucket``; returns a ``Future`` of the reduced bucket.
    """
    reducer = state()
    buffer = bucket.buffer()
    group = None if reducer is None else reducer.group
    if reducer is None or reducer.loss_average is None:
        fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
        if reducer is None:  # optimizer gone: behave like DDP's average
            return fut.then(lambda f: f.value()[0].div_(dist.get_world_size(group)))
        return fut.then(lambda f: f.value()[0])
    dtype = torch.promote_types(buffer.dtype, torch.float32)
    weight = reducer._weight()
    ext = torch.empty(buffer.numel() + 1, dtype=dtype, device=buffer.device)
    ext[:-1].copy_(buffer).mul_(weight)
    ext[-1] = weight

    def finish(fut: torch.futures.Future) -> Tensor:
        total = fut.value()[0]
        return buffer.copy_(total[:-1] / total[-1])

    return dist.all_reduce(ext, group=group, async_op=True).get_future().then(finish)
