"""Validation of :class:`~structvi.optim.StructuredNGD` hyper-parameters and factor structures.

Every error names the argument, the value received and what was expected; a parameter group
other than the first is named by its index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from structvi.engine.retraction import RETRACTIONS
from structvi.optim.kfac import KFAC_APPROXIMATIONS, LOSS_AVERAGES
from structvi.structures.registry import STRUCTURES, get_structure_class

__all__ = ["LEGACY_OPTIONS", "SINGD_ALIASES", "check_group", "factor_spec",
           "normalize_structures"]

# Options added after the first release, with the values that reproduce the update of that
# release: a state dict saved without them resumes with the update it was trained with.
LEGACY_OPTIONS: dict[str, Any] = {
    "diagonal_lr_ratio": 1.0, "relative_damping": False, "normalize_preconditioner": False,
}

# singd's structure strings and the structvi structure (covariance-side K) each one names.
SINGD_ALIASES: dict[str, dict[str, Any]] = {
    "hierarchical15_15": {"name": "hierarchical", "k1": 15, "k2": 15},
    "triltoeplitz": {"name": "triangular_toeplitz"},
    "block30diagonal": {"name": "block_diagonal", "block_size": 30},
}
_VI_ONLY = {
    "kronecker": "it composes two factors and is for VI only",
    "block_sites": "it composes per-site structures and is for VI only",
}


def optimizer_structures() -> list[str]:
    """Registered structures usable as an optimizer factor."""
    return sorted(n for n in STRUCTURES if n not in _VI_ONLY)


def _structure_entry(entry: Any, where: str) -> dict[str, Any]:
    """One factor's structure as ``{"name": str, **int_options}``."""
    if isinstance(entry, str):
        entry = dict(SINGD_ALIASES.get(entry, {"name": entry}))
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise ValueError(
            f"structures{where}: each entry must be a structure name or a dict "
            f"{{'name': ..., **options}}, got {entry!r}"
        )
    name = entry["name"]
    if name in _VI_ONLY:
        raise ValueError(
            f"structures{where}: {name!r} cannot be an optimizer factor ({_VI_ONLY[name]}); "
            f"expected one of {optimizer_structures()}"
        )
    if name not in STRUCTURES:
        raise ValueError(
            f"structures{where}: unknown structure {name!r}; expected one of "
            f"{optimizer_structures()} or a singd name in {sorted(SINGD_ALIASES)}"
        )
    options = {k: v for k, v in entry.items() if k != "name"}
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"structures{where}: option {key}={value!r} of {name!r} must be an integer"
            )
    return {"name": name, **options}


def normalize_structures(structures: Any, where: str = "") -> tuple[dict, dict]:
    """``(K_spec, C_spec)`` from a name, a ``(K, C)`` pair of names or ``{"name", **options}``."""
    if isinstance(structures, (str, Mapping)):
        structures = (structures, structures)
    if not isinstance(structures, (tuple, list)) or len(structures) != 2:
        raise ValueError(
            f"structures{where} must be a structure or a pair (K, C) of structures, "
            f"got structures={structures!r}"
        )
    return (_structure_entry(structures[0], where), _structure_entry(structures[1], where))


def factor_spec(entry: Mapping[str, Any], dim: int, where: str) -> dict[str, Any]:
    """The structure spec ``{"name", "dim", "options"}`` of one factor, options validated."""
    cls = get_structure_class(entry["name"])
    options = {k: v for k, v in entry.items() if k != "name"}
    fit = getattr(cls, "fit_options", None)  # a structure may shrink its options to fit `dim`
    try:
        options = cls.check_options(dim, **(fit(dim, **options) if fit else options))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"structures: {entry['name']!r} for {where} (dim={dim}): {err}; use options that "
            "fit this layer or put it in a param group with other structures"
        ) from err
    return {"name": entry["name"], "dim": dim, "options": dict(options)}


def _number(name: str, value: Any, where: str, *, low: float = 0.0, strict: bool = False,
            upper: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (upper is None or value < upper)
    if not ok:
        rng = f"{'>' if strict else '>='} {low}" + (f" and < {upper}" if upper is not None else "")
        raise ValueError(f"{name}{where} must be a finite number {rng}, got {name}={value!r}")


def _choice(name: str, value: Any, choices: tuple, where: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}{where} must be one of {choices}, got {name}={value!r}")


def _dtype_pair(value: Any, where: str) -> None:
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        d is None or (isinstance(d, torch.dtype) and d.is_floating_point) for d in value
    )
    if not ok:
        raise ValueError(
            f"preconditioner_dtype{where} must be a pair (dtype_K, dtype_C) of floating "
            f"torch.dtypes or None, got preconditioner_dtype={value!r}"
        )


def check_group(group: dict[str, Any], index: int) -> None:
    """Validate a filled parameter group in place (``structures`` is normalized; options of
    :data:`LEGACY_OPTIONS` missing from a loaded state dict get their legacy values)."""
    where = "" if index == 0 else f" (param group {index})"
    for name, value in LEGACY_OPTIONS.items():
        group.setdefault(name, value)
    for name in ("lr", "damping", "weight_decay", "diagonal_lr_ratio"):
        _number(name, group[name], where)
    for name in ("momentum", "alpha1", "beta2"):
        _number(name, group[name], where, upper=1.0)
    _number("eps", group["eps"], where, strict=True)
    _number("init_grad_scale", group["init_grad_scale"], where, strict=True)
    if group["trust_region"] is not None:
        _number("trust_region", group["trust_region"], where, strict=True)
    if not callable(group["lr_cov"]):
        _number("lr_cov", group["lr_cov"], where)
    T = group["T"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T{where} must be an integer >= 1, got T={T!r}")
    _choice("kfac_approx", group["kfac_approx"], KFAC_APPROXIMATIONS, where)
    _choice("loss_average", group["loss_average"], LOSS_AVERAGES, where)
    _choice("retraction", group["retraction"], RETRACTIONS, where)
    _dtype_pair(group["preconditioner_dtype"], where)
    md = group["momentum_dtype"]
    if md is not None and not (isinstance(md, torch.dtype) and md.is_floating_point):
        raise ValueError(f"momentum_dtype{where} must be a floating torch.dtype or None, "
                         f"got momentum_dtype={md!r}")
    for name in ("kfac_like", "normalize_lr_cov", "relative_damping", "normalize_preconditioner"):
        if not isinstance(group[name], bool):
            raise ValueError(f"{name}{where} must be a bool, got {name}={group[name]!r}")
    group["structures"] = normalize_structures(group["structures"], where)
