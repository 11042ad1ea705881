"""ArviZ 0.x ``InferenceData`` built directly from arrays, with ``az.from_dict``'s layout.

``az.from_dict`` spends most of an export's time aligning one ``DataArray`` per variable and
re-creating the same ``chain``/``draw`` indexes for every group. Here each group's
``xarray.Dataset`` is assembled from its variables and shared, cached coordinate indexes: the
same dimension names (the user's ``dims``, then ``{var}_dim_{i}``), coordinates (the user's
``coords``, else integers from ``data.index_origin``), attributes (``created_at``,
``arviz_version`` and the caller's) and groups as ``from_dict`` produces (a test checks they are
``identical``). Used by :func:`structvi.arviz.to_inference_data` on ArviZ 0.x.
"""

from __future__ import annotations

import datetime
import functools
from typing import Any

import numpy as np

__all__ = ["inference_data"]


def _var_dims(name: str, shape: tuple[int, ...], dims: dict[str, list[str]],
              coords: dict[str, Any], skip_event_dims: bool) -> list[str]:
    """Dimension names of a variable's own axes: the user's ``dims[name]`` (without
    ``chain``/``draw``), then ArviZ's defaults ``{name}_dim_{i}``. ``skip_event_dims`` (the
    log-likelihood group) drops user names beyond the shape or whose coordinates do not fit,
    as ArviZ does (an observation's log-likelihood has no event axes)."""
    user = [d for d in (dims.get(name) or []) if d not in ("chain", "draw")]
    if skip_event_dims:
        user = user[:len(shape)]
        for i, (dim, size) in enumerate(zip(user, shape)):
            if dim in coords and len(coords[dim]) != size:
                user = user[:i]
                break
    elif len(user) > len(shape):
        raise ValueError(f"dims[{name!r}] = {dims[name]!r} names {len(user)} dimensions but "
                         f"{name!r} has shape {shape}; give at most {len(shape)} names")
    return [d if d is not None else f"{name}_dim_{i}" for i, d in enumerate(user)] + \
        [f"{name}_dim_{i}" for i in range(len(user), len(shape))]


def _index(dim: str, values: np.ndarray):
    """``(coordinate variable, index)`` of ``dim``, the variable backed by the index (as
    xarray makes them)."""
    import pandas as pd
    import xarray as xr

    index = xr.indexes.PandasIndex(pd.Index(values, name=dim), dim)
    return index.create_variables()[dim], index


@functools.lru_cache(maxsize=512)
def _default_index(dim: str, size: int, origin: int):
    """The integer coordinate ``origin, …, origin + size − 1`` of ``dim`` (immutable, so shared
    by every export)."""
    return _index(dim, np.arange(origin, size + origin))


class _Indexes(dict):
    """The coordinates of one export: the user's ``coords`` (each built once and shared by the
    groups) and the cached integer defaults."""

    def __init__(self, coords: dict[str, Any], origin: int) -> None:
        super().__init__()
        self.coords, self.origin = coords, origin

    def get(self, dim: str, size: int, default: bool):
        if default:
            return _default_index(dim, size, self.origin)
        if dim not in self:
            values = np.asarray(self.coords[dim])
            if values.ndim != 1 or len(values) != size:
                raise ValueError(f"coords[{dim!r}] has shape {values.shape} but dimension "
                                 f"{dim!r} has length {size}; give {size} coordinate values")
            self[dim] = _index(dim, values)
        return self[dim]


def _dataset(data: dict[str, np.ndarray], indexes: _Indexes, dims: dict[str, list[str]],
             attrs: dict[str, Any], *, sampled: bool, skip_event_dims: bool = False):
    """One group as an ``xarray.Dataset`` (``(chain, draw, ...)`` variables when ``sampled``)."""
    import xarray as xr

    lead = ["chain", "draw"] if sampled else []
    variables, sizes = {}, {}
    for name, array in data.items():
        names = lead + _var_dims(name, array.shape[len(lead):], dims, indexes.coords,
                                 skip_event_dims)
        for dim, size in zip(names, array.shape):
            if sizes.setdefault(dim, size) != size:
                raise ValueError(f"dimension {dim!r} has length {size} in {name!r} but "
                                 f"{sizes[dim]} in another variable; name them apart in dims")
        variables[name] = xr.Variable(names, array)
    made = {dim: indexes.get(dim, size, dim in lead or dim not in indexes.coords)
            for dim, size in sizes.items()}
    coord_vars = {dim: var for dim, (var, _) in made.items()}
    index_objs = {dim: index for dim, (_, index) in made.items()}
    made = _construct(variables, coord_vars, index_objs, sizes, attrs)
    if made is None:
        made = xr.Dataset(variables, coords=xr.Coordinates(coord_vars, index_objs), attrs=attrs)
    return made


def _construct(variables, coord_vars, indexes, sizes, attrs):
    """The ``Dataset`` through xarray's internal constructor (the sizes and coordinates are
    checked above, so its re-validation and alignment are skipped), or ``None`` where this
    xarray has no such constructor (then the public one is used)."""
    import xarray as xr

    direct = getattr(xr.Dataset, "_construct_direct", None)
    if direct is None:
        return None
    try:
        return direct({**coord_vars, **variables}, set(coord_vars), dict(sizes), attrs, indexes)
    except TypeError:  # another signature
        return None


def inference_data(groups: dict[str, dict[str, np.ndarray]], coords: dict[str, Any] | None,
                   dims: dict[str, list[str]] | None, attrs: dict[str, Any]):
    """``az.InferenceData`` of the groups (``observed_data`` without ``chain``/``draw``; the
    ``log_likelihood`` group drops event dims as ArviZ does), every group with ``attrs``.

    Raises:
        ValueError: ``dims``/``coords`` that do not fit the arrays.
    """
    import arviz as az

    coords, dims = coords or {}, dims or {}
    attrs = {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
             "arviz_version": az.__version__, **attrs}
    indexes = _Indexes(coords, int(az.rcParams["data.index_origin"]))
    return az.InferenceData(**{
        name: _dataset(data, indexes, dims, dict(attrs), sampled=name != "observed_data",
                       skip_event_dims=name == "log_likelihood")
        for name, data in groups.items()})
