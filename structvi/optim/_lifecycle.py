"""Lifecycle of :class:`~structvi.optim.StructuredNGD`: hooks, copies, pickling, collection.

Everything here is rebuilt rather than copied: ``copy.deepcopy`` and ``pickle`` keep the model,
the state, the param groups and the counters (:meth:`Lifecycle.__getstate__`), and the copy
installs its own hooks on the copied model (:meth:`Lifecycle.__setstate__`), after removing the
inert copies of the original's hooks that the copied model carries. Hooks hold the optimizer
weakly and are removed when it is garbage-collected (``weakref.finalize``) or closed.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from torch import Tensor, nn

from structvi.optim import _compile, attention, kfac, robust
from structvi.optim import functional as F
from structvi.optim.state import drop_inert_hooks, mark_callables, stash_loaded_state
from structvi.structures.base import Structure

__all__ = ["Lifecycle"]


def _after_load(optimizer: Any) -> None:
    optimizer._after_load()


class Lifecycle:
    """Mixin of :class:`~structvi.optim.StructuredNGD` (hooks, tables, copies)."""

    # whether the layers' parameters get a gradient hook that records ‖∇p‖² after backward
    # (:meth:`_grad_hook`); a subclass whose screening does not use it turns it off
    _records_backward_norms = True

    def _attach(self, model: nn.Module) -> None:
        """Everything that is not state: layer tables, caches and the hooks on ``model``."""
        before = set(vars(self))
        self._model = model
        self._owners = kfac.supported_owners(model)
        self._layers: dict[Tensor, kfac.Layer] = {}  # weight → layer
        self._biases: dict[Tensor, kfac.Layer] = {}  # bias → layer
        self._module_layer: dict[nn.Module, kfac.Layer] = {}
        self._group_index: dict[Tensor, int] = {}
        self._stats: dict[Tensor, kfac.KroneckerStatistics] = {}
        self._factor_cache: dict[Tensor, F.FactorState] = {}
        # weight → (cached factors, their (state key, tensor) pairs): the cache's validity check
        self._factor_keys: dict[Tensor, tuple[F.FactorState, tuple]] = {}
        self._matrix_shapes: dict[Tensor, tuple] = {}  # weight → ((d_C, d_K), buffer, view)
        # weight → (factors, K Kᵀ, C Cᵀ) as SparseGram (not state: rebuilt from the factors)
        self._gram_cache: dict[Tensor, tuple[F.FactorState, Any, Any]] = {}
        # one scratch buffer per (dtype, device), the size of the largest gradient matrix: the
        # gradient is copied into it and preconditioned in place (no large allocation per step)
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._collecting: dict[nn.Module, bool] = {}  # layer collects statistics this step
        self._tap_keys: dict[nn.Module, int] = {}  # layer → key of its torch.compile tap
        self._backward_norms: dict[Tensor, Tensor] = {}  # ‖∇p‖² after the last backward
        self._verdicts: dict[Tensor, F.Screen] = {}  # this step's screening, by weight/param
        self._screened: dict[Tensor, tuple[Structure, Structure]] = {}  # screened (H_K, H_C)
        self._handles = [model.register_forward_pre_hook(kfac.WeakHook(self, "_count_forward"))]
        self._forward_count = self._layer_calls = 0
        self._loading: dict[Tensor, dict[str, Any]] = {}
        self._scale_cache: dict[Tensor, tuple[F.FactorState, Tensor]] = {}
        self._checked_groups: dict[int, tuple | None] = {}  # robust.check_groups_for_step
        self._names = {p: name for name, p in model.named_parameters(remove_duplicate=False)}
        self._attention_hooked: set[nn.Module] = set()
        self._notes = {getattr(m, n): why for m in model.modules()  # for describe()
                       for n, why in attention.unsupported(m).items()
                       if getattr(m, n, None) is not None}
        # hooks are released when the optimizer is collected (they hold it only weakly)
        self._receiver_keys: list[int] = []
        self._finalizer = weakref.finalize(self, robust.release, self._handles,
                                           self._receiver_keys)
        # rebuilt by _attach after a copy, never copied (``_model`` is: copies are bound to it)
        self._runtime = frozenset(set(vars(self)) - before - {"_model"}) | {"_runtime"}

    def _register_state_hooks(self) -> None:
        self.register_state_dict_post_hook(mark_callables)
        self.register_load_state_dict_pre_hook(stash_loaded_state)
        self.register_load_state_dict_post_hook(_after_load)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: the model, state, groups, counters and any
        attribute a subclass adds; not the hooks, caches and layer tables (rebuilt on copy) nor
        the hooks registered on the optimizer itself (as ``torch.optim.Optimizer``)."""
        skip = self._runtime | {k for k in vars(self) if k.startswith("_optimizer_")}
        return {k: v for k, v in vars(self).items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the layer tables and the hooks on the (copied) model.

        ``Optimizer.load_state_dict`` also calls this with ``state`` and ``param_groups`` only:
        that is an update of this optimizer, not a copy.
        """
        state = dict(state)
        model = state.pop("_model", None)
        super().__setstate__(state)
        if model is None:
            return
        drop_inert_hooks(model)  # the copied model carries inert copies of the old hooks
        self._attach(model)
        for index in range(len(self.param_groups)):
            for p in self.param_groups[index]["params"]:
                self._group_index[p] = index
            self._register_layers(index, initialize=False)
        self._register_state_hooks()

    def _hook_layer(self, layer: kfac.Layer) -> None:
        """Tables and hooks of a layer (its state exists or is written by the caller)."""
        self._layers[layer.weight] = layer
        if layer.bias is not None:
            self._biases[layer.bias] = layer
        self._module_layer[layer.module] = layer
        if attention.parent(layer.module) is not None:  # one hook on the attention module
            attention.install(self, layer)
        else:
            hook = kfac.WeakHook(self, "_forward_hook")
            self._handles.append(layer.module.register_forward_hook(hook))
        for p in (layer.weight, layer.bias):
            if p is not None and self._records_backward_norms:
                self._handles.append(p.register_post_accumulate_grad_hook(
                    kfac.WeakHook(self, "_grad_hook")))
        key = _compile.register_receiver(functools.partial(kfac.WeakHook(self, "_tap_backward"),
                                                           layer))
        self._tap_keys[layer.module] = key
        self._receiver_keys.append(key)
        if layer.weight in self.state:
            self._sync_collecting(layer)

    def _sync_collecting(self, layer: kfac.Layer, step: int | None = None,
                         group: dict[str, Any] | None = None) -> None:
        """Whether the layer's hooks record statistics before its next step (``t mod T = 0``;
        ``step``, ``group``: the layer's step count and group when the caller knows them)."""
        if group is None:
            group = self.param_groups[self._group_index[layer.weight]]
        T = group["T"]
        if step is None:
            step = int(self.state[layer.weight]["step"])
        self._collecting[layer.module] = isinstance(T, int) and T >= 1 and step % T == 0

    def _tap_backward(self, layer: kfac.Layer, x: Tensor, grad: Tensor) -> None:
        """Statistics from a compiled model's tap (one forward id per backward pass)."""
        self._backward_hook(layer, x, ("compiled", self._forward_count), grad.shape, grad)

    def _grad_hook(self, param: Tensor) -> None:
        """After backward accumulated ``param.grad``: keep ``‖∇p‖²`` for the screening.

        Single process only: with a data-parallel reducer the gradient may be being all-reduced
        in place at this point, so no norm is kept and the statistics are not rescaled.
        """
        if not isinstance(self.reducer, F.LocalReducer):
            return
        layer = self._layers.get(param) or self._biases.get(param)
        if layer is not None and self._collecting.get(layer.module, False):
            self._backward_norms[param] = robust.squared_norm(param.grad)
