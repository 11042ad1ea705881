"""Registry of structures by name, and constructors from names and specs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from structvi.structures.base import Structure

STRUCTURES: dict[str, type[Structure]] = {}


def register(cls: type[Structure]) -> type[Structure]:
    """Class decorator: make ``cls`` available as ``make_structure(cls.name, ...)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`")
    if cls.name in STRUCTURES and STRUCTURES[cls.name] is not cls:
        raise ValueError(f"a structure named {cls.name!r} is already registered")
    STRUCTURES[cls.name] = cls
    return cls


def get_structure_class(name: str) -> type[Structure]:
    """The class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in STRUCTURES:
        raise ValueError(
            f"unknown structure {name!r}; expected one of {sorted(STRUCTURES)}"
        )
    return STRUCTURES[name]


def make_structure(
    name: str,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    init: str = "identity",
    **options: Any,
) -> Structure:
    """Build a structured ``dim×dim`` matrix by name.

    Args:
        name: a registered structure (``sorted(STRUCTURES)`` lists them).
        dim: matrix size ``d``.
        dtype: storage dtype.
        device: storage device.
        init: ``"identity"`` (a group element, e.g. a starting factor) or ``"zeros"``
            (a coordinate element, e.g. a momentum buffer).
        **options: the structure's options, e.g. ``block_size=4`` or ``rank=8``.

    Returns:
        The structure instance.

    Raises:
        ValueError: unknown name, bad option value, or bad ``init``.
    """
    cls = get_structure_class(name)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got dtype={dtype!r}")
    if init == "identity":
        return cls.identity(dim, dtype=dtype, device=device, **options)
    if init == "zeros":
        return cls.zeros(dim, dtype=dtype, device=device, **options)
    raise ValueError(f"init must be 'identity' or 'zeros', got init={init!r}")


def structure_from_spec(tensors: Mapping[str, Tensor], spec: Mapping[str, Any]) -> Structure:
    """Rebuild a structure from its :meth:`Structure.tensors` and :meth:`Structure.spec`."""
    return get_structure_class(spec.get("name")).from_tensors(tensors, spec)
