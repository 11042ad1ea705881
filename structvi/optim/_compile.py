"""Kronecker statistics under ``torch.compile``: an opaque tap op instead of a tensor hook.

Inside a compiled region Dynamo traces a tensor hook's body into the backward graph, where the
optimizer's bookkeeping (Python dictionaries, accumulation into structures) is a side effect it
refuses. The forward hook therefore returns ``kfac_tap(output, x, key)`` there: the identity in
value (a copy), registered as a custom operator whose backward ``kfac_tap_grad`` is opaque to the
compiler and, when it runs, hands the layer input ``x`` (saved by autograd like any activation)
and the output gradient to the receiver registered under ``key``. No graph break, and the graph
depends on the integer ``key`` only (one per layer).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["register_receiver", "release_receivers", "tap"]

_RECEIVERS: dict[int, Callable[[Tensor, Tensor], None]] = {}
_KEYS = itertools.count()


def register_receiver(receiver: Callable[[Tensor, Tensor], None]) -> int:
    """A new key whose tap gradients go to ``receiver(x, grad)``."""
    key = next(_KEYS)
    _RECEIVERS[key] = receiver
    return key


def release_receivers(keys: list[int]) -> None:
    """Forget the receivers of ``keys`` (the optimizer was closed or collected)."""
    for key in keys:
        _RECEIVERS.pop(key, None)


@torch.library.custom_op("structvi::kfac_tap", mutates_args=())
def _kfac_tap(output: Tensor, x: Tensor, key: int) -> Tensor:
    del x, key
    return output.clone()


@_kfac_tap.register_fake
def _(output: Tensor, x: Tensor, key: int) -> Tensor:
    del x, key
    return torch.empty_like(output)


@torch.library.custom_op("structvi::kfac_tap_grad", mutates_args=())
def _kfac_tap_grad(grad: Tensor, x: Tensor, key: int) -> Tensor:
    receiver = _RECEIVERS.get(key)
    if receiver is not None:
        receiver(x, grad)
    return grad.clone()


@_kfac_tap_grad.register_fake
def _(grad: Tensor, x: Tensor, key: int) -> Tensor:
    del x, key
    return torch.empty_like(grad)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    del output
    ctx.save_for_backward(inputs[1])
    ctx.key = inputs[2]


def _backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
    (x,) = ctx.saved_tensors
    return _kfac_tap_grad(grad, x, ctx.key), None, None


_kfac_tap.register_autograd(_backward, setup_context=_setup_context)


def tap(output: Tensor, x: Tensor, key: int) -> Tensor:
    """``output`` (a copy) whose gradient is shown to the receiver of ``key`` with ``x``."""
    return _kfac_tap(output, x.detach(), key)
