"""Optimizer state as plain tensors: structures in ``state[weight]``, and the load hooks.

A factor ``K`` of a layer is stored as the tensors ``state[weight]["K.<name>"]`` of
:meth:`Structure.tensors`; its spec (name, dim, integer options) is rebuilt from the param
group's ``structures`` and the layer's shape, so a ``state_dict`` holds tensors and numbers only
(strings inside per-parameter state would not survive ``Optimizer.load_state_dict``).

``torch.optim.Optimizer.load_state_dict`` casts floating state tensors to the parameter's dtype;
the pre/post hooks here keep every saved tensor's own dtype instead (STYLE §3.2), so fp32 factors
of bf16 parameters stay fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from structvi.optim._load_check import check_state_dict
from structvi.optim.functional import dense_product
from structvi.optim.kfac import WeakHook
from structvi.structures.base import Structure
from structvi.structures.registry import get_structure_class, structure_from_spec

__all__ = ["drop_inert_hooks", "mark_callables", "read_structure", "restore_loaded_state",
           "set_counters", "stash_loaded_state", "store_product", "write_structure"]

CALLABLE = "<callable: kept from the optimizer that loads this state>"


def read_structure(state: dict[str, Any], key: str, spec: dict[str, Any]) -> Structure:
    """The structure stored under ``key`` (e.g. ``"K"``) with the given spec."""
    names = get_structure_class(spec["name"]).shapes(spec["dim"], **spec["options"])
    return structure_from_spec({t: state[f"{key}.{t}"] for t in names}, spec)


def write_structure(state: dict[str, Any], key: str, structure: Structure) -> None:
    """Store ``structure``'s tensors under ``key``."""
    for name, tensor in structure.tensors().items():
        state[f"{key}.{name}"] = tensor


def set_counters(state: dict[str, Any], step: int, grad_scale: float) -> None:
    """A layer's step count and the GradScaler scale of its last step, as CPU tensors (written
    in place when the state already holds them, as ``torch.optim`` does with its steps)."""
    for key, value, dtype in (("step", step, torch.int64),
                              ("grad_scale", float(grad_scale), torch.float64)):
        held = state.get(key)
        if (isinstance(held, torch.Tensor) and held.dtype is dtype and held.ndim == 0
                and held.is_cpu):
            if held.item() != value:
                held.fill_(value)
        else:
            state[key] = torch.tensor(value, dtype=dtype)


def store_product(state: dict[str, Any], key: str, factor: Structure) -> None:
    """Keep ``K Kᵀ`` under ``"KKt"`` (``"CCt"`` for C) when the factor stores ``d²`` numbers."""
    product = dense_product(factor)
    if product is not None:
        state[key + key + "t"] = product


def mark_callables(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` post-hook: a callable hyper-parameter (``lr_cov``) is saved as a marker."""
    del optimizer
    for group in state_dict["param_groups"]:
        for key, value in group.items():
            if callable(value):
                group[key] = CALLABLE
    return state_dict


def drop_inert_hooks(model: nn.Module) -> None:
    """Remove the inert copies of an optimizer's hooks that a copied model carries."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, WeakHook) and h.inert]:
                del hooks[key]


def stash_loaded_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``load_state_dict`` pre-hook: check, then remember the saved per-parameter state as it is.

    Nothing changes when the check fails (:func:`structvi.optim._load_check.check_state_dict`).
    Also puts back the loading optimizer's callables where the saved groups have the marker.
    """
    check_state_dict(optimizer, state_dict)
    saved_groups = state_dict["param_groups"]
    ids = [i for g in saved_groups for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer._loading = {p: state_dict["state"][i] for i, p in zip(ids, params)
                          if i in state_dict["state"]}
    groups = []
    for saved, current in zip(saved_groups, optimizer.param_groups):
        restored = {k: current[k] if isinstance(v, str) and v == CALLABLE else v
                    for k, v in saved.items()}
        groups.append(restored)
    return {**state_dict, "param_groups": groups}


def restore_loaded_state(optimizer: Optimizer) -> None:
    """``load_state_dict`` post-hook: saved tensors back with their own dtype (copies)."""
    for p, saved in optimizer._loading.items():
        optimizer.state[p] = {
            k: v.to(device=p.device, copy=True) if isinstance(v, Tensor) else v
            for k, v in saved.items()
        }
    optimizer._loading = {}
