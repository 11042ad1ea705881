"""Structure specs of :class:`~structvi.pyro.AutoStructuredNormal`: parsing and fitting to sizes.

Pyro's autoguides work on every latent size (``AutoLowRankMultivariateNormal`` picks
``rank ≈ √d``); :func:`fit_to_size` gives our structures the same property: a missing ``rank``
defaults to :func:`default_rank` (``round(√d)``, at least ``min(3, d − 1)``), options too large
for the block are clamped with a warning, a
one-coordinate ``low_rank_diagonal`` block is the (identical) diagonal family, and a
``kronecker`` block over a vector site is the ``(d, 1)`` Kronecker product.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["default_rank", "fit_to_size", "parse_site_spec"]

_MIN_RANK = 3


def default_rank(dim: int) -> int:
    """Default ``rank`` of a ``low_rank_diagonal`` block of ``dim >= 2`` coordinates.

    ``round(√dim)`` as Pyro's ``AutoLowRankMultivariateNormal``, but at least ``min(3, dim − 1)``.
    Our family puts the low rank on the *precision* (``diag + U Uᵀ``), Pyro's on the covariance;
    the two are different families of one size and neither contains the other, except at rank
    ``dim − 1``, where ours is the dense family (``S − λ_min(S) I`` has rank ``dim − 1``). On small
    models the rank-2 precision family was measurably worse than Pyro's rank-2 covariance family
    (GARCH(1,1), ``d = 4``: −176.91 vs −176.84 nats after 1000 steps; rank 3: −176.80), while below
    rank 3 a step costs the same as at rank 3 (``benchmarks/real_models.py``).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2, got dim={dim!r}")
    return max(round(math.sqrt(dim)), min(_MIN_RANK, dim - 1))


def parse_site_spec(site: str, spec: Any) -> tuple[str, dict[str, Any]]:
    """``name``, ``(name, {options})`` or ``{"name": ..., **options}`` → ``(name, options)``."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and "name" in spec:
        opts = dict(spec.get("options", {})) if set(spec) <= {"name", "options"} else {
            k: v for k, v in spec.items() if k != "name"}
        return spec["name"], opts
    if isinstance(spec, Sequence) and len(spec) == 2 and isinstance(spec[1], Mapping):
        return spec[0], dict(spec[1])
    raise ValueError(
        f"structure[{site!r}] must be a structure name, (name, {{options}}) or "
        f"{{'name': ..., **options}}, got {spec!r}"
    )


def _clamped(name: str, key: str, value: Any, limit: int, dim: int, where: str) -> Any:
    """``min(value, limit)``, warning when ``value`` (an int) had to be lowered."""
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        warnings.warn(f"structure {name!r}: {key}={value} does not fit {where} of {dim} "
                      f"coordinate(s); using {key}={limit}", UserWarning, stacklevel=5)
        return limit
    return value


def fit_to_size(name: str, options: dict[str, Any], shape: torch.Size | tuple[int, ...],
                where: str) -> tuple[str, dict[str, Any]]:
    """Adapt a structure spec to a block of ``prod(shape)`` coordinates (module docstring).

    Args:
        name: structure name.
        options: its options as given.
        shape: the block's unconstrained shape (a site's shape, or ``(d,)`` for the whole vector).
        where: how to name the block in warnings and errors (e.g. ``"site 'z'"``).

    Returns:
        ``(name, options)`` valid for the block.
    """
    dim = math.prod(shape)
    options = dict(options)
    if name == "low_rank_diagonal":
        if dim == 1:
            return "diagonal", {}
        if "rank" not in options:
            options["rank"] = default_rank(dim)
        options["rank"] = _clamped(name, "rank", options["rank"], dim - 1, dim, where)
    elif name == "block_diagonal" and "block_size" in options:
        options["block_size"] = _clamped(name, "block_size", options["block_size"], dim, dim,
                                         where)
    elif name == "hierarchical" and {"k1", "k2"} <= set(options):
        options["k1"] = _clamped(name, "k1", options["k1"], dim, dim, where)
        if isinstance(options["k1"], int):
            options["k2"] = _clamped(name, "k2", options["k2"], dim - options["k1"], dim, where)
    elif name == "kronecker" and "dims" not in options:
        rows = math.prod(shape[:-1]) if len(shape) >= 2 else dim
        options["dims"] = (rows, dim // rows)
    return name, options
