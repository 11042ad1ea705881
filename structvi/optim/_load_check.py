"""``load_state_dict`` checks of :class:`~structvi.optim.StructuredNGD`: before anything changes.

Every saved per-parameter state is compared with what this optimizer's layer (or parameter) would
hold under the saved groups' structures: a preconditioned weight needs the tensors of ``K, C``
(and ``m_K, m_C`` unless IKFAC) of the right shapes, a step count and a grad scale; every other
parameter's momenta have its shape. A failure names the layer, the tensor, the saved and the
expected shape, and loads nothing; a load that switches a group's structures warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from structvi.optim import kfac
from structvi.optim.config import factor_spec, normalize_structures
from structvi.structures.registry import get_structure_class

if TYPE_CHECKING:
    from torch.optim import Optimizer

__all__ = ["check_state_dict"]

_FIX = ("load a state saved by an optimizer over the same model, with the same param groups "
        "in the same order (and compatible structures)")
_MOMENTA = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def check_state_dict(opt: Optimizer, state_dict: Any) -> None:
    """Raise ``ValueError`` naming every mismatch; warn when the structures change.

    Raises:
        ValueError: not a state dict, other group sizes, or a saved tensor that does not fit.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(f"load_state_dict: expected the dict of optimizer.state_dict() with keys "
                         f"'state' and 'param_groups', got {keys!r}")
    saved_groups, groups = state_dict["param_groups"], opt.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"load_state_dict: the saved state has {len(saved_groups)} param groups, "
                         f"this optimizer {len(groups)}; {_FIX}")
    problems, changes = [], []
    names = {id(p): n for n, p in opt._model.named_parameters()}
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"load_state_dict: param group {index} has {len(saved['params'])} "
                             f"parameters in the saved state and {len(group['params'])} here; "
                             f"{_FIX}")
        structures = _structures(saved, group, index)
        if structures != tuple(group["structures"]):
            changes.append((index, group["structures"], structures))
        kfac_like = bool(saved.get("kfac_like", group["kfac_like"]))
        for pid, p in zip(saved["params"], group["params"]):
            entry = state_dict["state"].get(pid)
            problems += _check_param(opt, p, entry, structures, kfac_like, names)
    if problems:
        shown = "\n  ".join(problems[:6]) + ("\n  ..." if len(problems) > 6 else "")
        raise ValueError(f"load_state_dict: the saved state does not fit this optimizer; "
                         f"nothing was loaded:\n  {shown}\nFix: {_FIX}")
    for index, old, new in changes:
        warnings.warn(f"load_state_dict: param group {index} switches structures from "
                      f"{_names(old)} to {_names(new)} (the saved state's); the loaded factors "
                      "keep the saved structures", UserWarning, stacklevel=4)


def _structures(saved: Mapping[str, Any], group: Mapping[str, Any], index: int) -> tuple:
    where = "" if index == 0 else f" (param group {index})"
    try:
        return normalize_structures(saved.get("structures", group["structures"]), where)
    except ValueError as err:
        raise ValueError(f"load_state_dict: the saved {err}") from err


def _names(structures: tuple) -> str:
    return "(" + ", ".join(
        s["name"] + "".join(f" {k}={v}" for k, v in s.items() if k != "name")
        for s in structures) + ")"


def _check_param(opt: Optimizer, p: Tensor, entry: Mapping[str, Any] | None, structures: tuple,
                 kfac_like: bool, names: dict[int, str]) -> list[str]:
    layer = opt._layers.get(p)
    if layer is None:
        where = f"parameter {names.get(id(p), '?')!r} (shape {tuple(p.shape)})"
        if entry is None:
            return []
        if any(str(k).startswith(("K.", "C.")) for k in entry):
            return [f"{where}: the saved state holds a layer's preconditioner (K, C) for it; "
                    "the parameters are in another order than when saved (or from another model)"]
        return _momenta(entry, p, where)
    where = f"layer {layer.name!r} (weight {tuple(p.shape)})"
    if entry is None:
        return [f"{where}: the saved state has no entry for this layer"]
    if not any(str(k).startswith(("K.", "C.", "m_K.", "m_C.")) for k in entry):
        held = {k: tuple(v.shape) for k, v in entry.items() if isinstance(v, Tensor)}
        kind = "the diagonal-rule (AdamW) state" if "exp_avg" in entry else "the state"
        return [f"{where}: the saved state holds {kind} of another parameter ({held}) instead "
                "of a preconditioner; the parameters are in another order than when saved (or "
                "from another model)"]
    try:
        expected = _expected(layer, structures, kfac_like)
    except ValueError as err:
        return [f"{where}: the saved structures do not fit this layer: {err}"]
    problems = []
    for key, (shape, what) in expected.items():
        value = entry.get(key)
        if not isinstance(value, Tensor):
            problems.append(f"{where}: the saved state has no tensor {key!r} ({what})")
        elif tuple(value.shape) != shape:
            problems.append(f"{where}: tensor {key!r} has shape {tuple(value.shape)} in the saved "
                            f"state, expected {shape} ({what})")
    return problems + _momenta(entry, p, where)


def _expected(layer: kfac.Layer, structures: tuple, kfac_like: bool
              ) -> dict[str, tuple[tuple[int, ...], str]]:
    dims = kfac.layer_dims(layer.module, layer.bias is not None)
    expected: dict[str, tuple[tuple[int, ...], str]] = {
        "step": ((), "step count"), "grad_scale": ((), "last gradient scale")}
    for key, entry, dim in zip(("K", "C"), structures, dims):
        spec = factor_spec(entry, dim, f"{key} of layer {layer.name!r}")
        shapes = get_structure_class(spec["name"]).shapes(dim, **spec["options"])
        what = f"{spec['name']!r} factor {key} of dim {dim}"
        for prefix in (key,) if kfac_like else (key, "m_" + key):
            for name, shape in shapes.items():
                expected[f"{prefix}.{name}"] = (tuple(shape), what)
    return expected


def _momenta(entry: Mapping[str, Any], p: Tensor, where: str) -> list[str]:
    problems = []
    for key in _MOMENTA:
        value = entry.get(key)
        if isinstance(value, Tensor) and tuple(value.shape) != tuple(p.shape):
            problems.append(f"{where}: tensor {key!r} has shape {tuple(value.shape)} in the saved "
                            f"state, expected the parameter's shape {tuple(p.shape)}")
    return problems
