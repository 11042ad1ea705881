"""Statistics collection of :class:`~structvi.optim.StructuredNGD`: the hook callbacks.

On a step that collects (``step % T == 0``, :meth:`Lifecycle._sync_collecting`), each supported
layer's forward hook puts a tensor hook on its output; the backward pass calls it with the output
gradient, and the layer's inputs and output gradients are accumulated as Kronecker statistics
(:class:`~structvi.optim.kfac.KroneckerStatistics`) in the factors' dtypes, corrected for a
``GradScaler`` scale. The hooks themselves are installed and removed by
:class:`~structvi.optim._lifecycle.Lifecycle`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from structvi.optim import _compile, attention, kfac
from structvi.structures.base import Structure

__all__ = ["Collection"]


class Collection:
    """Mixin of :class:`~structvi.optim.StructuredNGD`: the forward/backward hook callbacks
    that record each layer's Kronecker statistics."""

    def statistics(self, module: nn.Module) -> tuple[Structure, Structure] | None:
        """``(H_K, H_C)`` recorded for ``module`` since the last step (``None`` if nothing).

        With ``K = C = I`` (dense) these are the KFAC factors ``Ā`` and ``Ḡ`` of MATH §3.4.
        """
        layer = self._module_layer.get(module)
        stats = None if layer is None else self._stats.get(layer.weight)
        return None if stats is None else stats.finalize()

    def _count_forward(self, module: nn.Module, inputs: Any) -> None:
        del module, inputs
        self._forward_count += 1

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any
                      ) -> Tensor | None:
        layer = self._module_layer.get(module)
        if (layer is None or not inputs or not torch.is_grad_enabled()
                or not isinstance(output, Tensor) or not output.requires_grad
                or not self._collecting.get(module, False)):
            return None
        if torch.compiler.is_compiling():  # no tensor hook (Dynamo would trace its body)
            return _compile.tap(output, inputs[0], self._tap_keys[module])
        # Loss terms are counted once per forward pass of `model` (a layer called twice in one
        # forward shares them); if `model` itself is never called, once per layer call.
        self._layer_calls += 1
        forward_id = self._forward_count or -self._layer_calls
        hook = functools.partial(self._backward_hook, layer, inputs[0].detach(), forward_id,
                                 output.shape)
        kfac.hookable(output).register_hook(hook)
        return None

    def _backward_hook(self, layer: kfac.Layer, x: Tensor, forward_id: Any, shape: torch.Size,
                       grad: Tensor) -> None:
        grad = grad.reshape(shape)
        group = self.param_groups[self._group_index[layer.weight]]
        state = self.state[layer.weight]
        factors = self._factors(layer)
        autocast = (torch.autocast(x.device.type, enabled=False)
                    if torch.is_autocast_enabled(x.device.type) else contextlib.nullcontext())
        with autocast:  # the statistics in the factors' dtypes
            a = kfac.input_rows(x.to(factors.K.dtype), layer.module, group["kfac_approx"],
                                layer.bias is not None)
            g, n_loss = kfac.grad_rows(grad.detach().to(factors.C.dtype), layer.module,
                                       group["kfac_approx"], group["loss_average"])
            previous_scale = float(state["grad_scale"])
            if previous_scale != 1.0:
                g = g / math.sqrt(previous_scale)
            self._accumulate(layer, a, g, n_loss, forward_id)

    def _collects(self, layer: kfac.Layer) -> bool:
        """Whether ``layer`` records statistics in this step (``step % T == 0``)."""
        return self._collecting.get(layer.module, False)

    def _attention_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        attention.forward_hook(self, module, args, kwargs, output)

    def _accumulate(self, layer: kfac.Layer, a: Tensor, g: Tensor, n_loss: int,
                    forward_id: int) -> None:
        """Add one backward pass's rows ``a`` and (GradScaler-corrected) ``g`` of ``layer``."""
        group = self.param_groups[self._group_index[layer.weight]]
        factors = self._factors(layer)
        stats = self._stats.get(layer.weight)
        if stats is None:
            stats = kfac.KroneckerStatistics(mean_loss=group["loss_average"] is not None)
            self._stats[layer.weight] = stats
        first_in_forward = stats.last_forward != forward_id
        stats.last_forward = forward_id
        stats.add(factors.K, factors.C, a, g, n_loss if first_in_forward else 0)
