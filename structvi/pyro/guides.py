r"""``AutoStructuredNormal``: a Pyro autoguide whose posterior is a :class:`StructuredGaussian`.

Like Pyro's :class:`~pyro.infer.autoguide.AutoMultivariateNormal`, the guide packs every latent
site into one unconstrained vector ``u`` (constrained sites through
:func:`torch.distributions.biject_to`) and places ``q(u) = N(μ, K Kᵀ)`` on it, ``K`` a structured
covariance factor (DESIGN.md decision 1). ``median``, ``quantiles``, ``sample_latent``, ``forward``
and :class:`pyro.infer.Predictive` are inherited from :class:`~pyro.infer.autoguide.AutoContinuous`.

``structure`` is either one structure name for the whole vector, with its ``**options``::

    AutoStructuredNormal(model, structure="low_rank_diagonal", rank=4)

or a mapping from site name to a structure spec (a name, ``(name, {options})`` or
``{"name": ..., **options}``), composed block-diagonally across sites
(:class:`~structvi.structures.block_sites.BlockSites`); sites left out get ``"diagonal"``::

    AutoStructuredNormal(model, structure={"fc1.weight": "kronecker", "fc1.bias": "diagonal"})

A ``"kronecker"`` spec without ``dims`` takes them from the site's shape (``(prod(shape[:-1]),
shape[-1])``, the row-major flattening Pyro uses). The guide is trained by
:class:`~structvi.pyro.NaturalGradientSVI`; its ``loc`` and factor tensors are ordinary
``nn.Parameter``\ s, so ``pyro.infer.SVI`` with a Pyro optimizer also works.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor, nn
from torch.distributions import biject_to
from torch.distributions.transforms import IndependentTransform, Transform, identity_transform

from structvi.gaussian import StructuredGaussian
from structvi.structures import structure_from_spec
from structvi.structures.block_sites import BlockSites, block_spec
from structvi.structures import Structure, make_structure
from structvi.pyro._specs import fit_to_size, parse_site_spec

__all__ = ["DEFAULT_SITE_STRUCTURE", "AutoStructuredNormal", "PyroStructuredGaussian"]

DEFAULT_SITE_STRUCTURE = "diagonal"
"""Structure of a site that a per-site ``structure`` mapping leaves out."""

StructureArg = str | Mapping[str, Any]


class PyroStructuredGaussian(StructuredGaussian, TorchDistributionMixin):
    """:class:`~structvi.gaussian.StructuredGaussian` usable as a Pyro distribution
    (``pyro.sample``, plates, ``Predictive(parallel=True)``)."""


class AutoStructuredNormal(AutoContinuous):
    """Structured Gaussian autoguide over the unconstrained latent vector (module docstring).

    Args:
        model: a Pyro model.
        structure: one structure name for the whole latent vector, or a mapping from site name
            to a structure spec (block-diagonal across sites; omitted sites are ``"diagonal"``).
        init_loc_fn: per-site initialization of the mean (Pyro's ``init_to_*`` functions).
        init_scale: initial standard deviation of every unconstrained coordinate
            (``K = init_scale · I``).
        **options: options of a single named structure, e.g. ``rank=4`` or ``block_size=8``.

    Raises:
        ValueError: non-positive ``init_scale``, a bad ``structure`` argument, options given
            together with a per-site mapping, or (at setup) a mapping naming unknown sites.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        structure: StructureArg = "dense",
        init_loc_fn: Callable[[dict], Tensor] = init_to_median,
        init_scale: float = 0.1,
        **options: Any,
    ) -> None:
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not (
            math.isfinite(init_scale) and init_scale > 0
        ):
            raise ValueError(f"Expected init_scale > 0. but got init_scale={init_scale!r}")
        if not isinstance(structure, (str, Mapping)):
            raise ValueError(
                f"structure must be a structure name or a mapping from site name to structure "
                f"spec, got structure={structure!r}"
            )
        if isinstance(structure, Mapping) and options:
            raise ValueError(
                f"structure options {sorted(options)} apply to a single named structure; with a "
                f"per-site mapping put them in each site's spec, e.g. ('low_rank_diagonal', "
                f"{{'rank': 2}})"
            )
        self._init_scale = float(init_scale)
        self._structure = structure
        self._options = dict(options)
        self._factor_spec: dict[str, Any] | None = None
        self._factor_attrs: dict[str, str] = {}
        super().__init__(model, init_loc_fn=init_loc_fn)

    # ------------------------------------------------------------------ setup
    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Run the model once (if not done yet) to find the latent sites and create the
        variational parameters; the same ``*args, **kwargs`` as the model.

        The parameters are registered in Pyro's param store (as calling the guide does), so
        ``pyro.get_param_store().save()`` writes the trained guide and a guide set up after
        ``pyro.get_param_store().load()`` starts from the stored values.

        Raises:
            ValueError: a latent site inside a subsampled plate (local latents).
        """
        if self.prototype_trace is None:
            with self._pyro_context:
                self._setup_prototype(*args, **kwargs)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        _refuse_local_latents(self.prototype_trace)
        loc = self._init_loc()
        factor = self._make_factor(loc.dtype, loc.device).scale(self._init_scale)
        self.loc = nn.Parameter(loc)
        _check_stored_shape(self, "loc", loc.shape)
        self._factor_spec = factor.spec()
        self._factor_attrs = {}
        for key, tensor in factor.tensors().items():
            attr = "factor_" + re.sub(r"\W", "_", key)
            if attr in self._factor_attrs.values():
                raise ValueError(
                    f"factor tensor keys collide after sanitizing: {key!r} -> {attr!r}")
            self._factor_attrs[key] = attr
            setattr(self, attr, nn.Parameter(tensor.detach().clone()))
            _check_stored_shape(self, attr, tensor.shape)

    def site_sizes(self) -> dict[str, int]:
        """Number of unconstrained coordinates of each latent site, in packing order."""
        self._require_setup("site_sizes")
        return {name: math.prod(self._unconstrained_shapes[name])
                for name, _ in self.prototype_trace.iter_stochastic_nodes()}

    def _make_factor(self, dtype: torch.dtype, device: torch.device) -> Structure:
        shapes = {name: self._unconstrained_shapes[name]
                  for name, _ in self.prototype_trace.iter_stochastic_nodes()}
        if isinstance(self._structure, str):
            shape = next(iter(shapes.values())) if len(shapes) == 1 else (self.latent_dim,)
            name, opts = fit_to_size(self._structure, self._options, shape,
                                     "the latent vector")
            return make_structure(name, self.latent_dim, dtype=dtype, device=device, **opts)
        unknown = sorted(set(self._structure) - set(shapes))
        if unknown:
            raise ValueError(
                f"structure names site(s) {unknown} that are not latent sites of the model; the "
                f"latent sites are {sorted(shapes)}"
            )
        blocks = []
        for site, shape in shapes.items():
            name, opts = parse_site_spec(site, self._structure.get(site, DEFAULT_SITE_STRUCTURE))
            name, opts = fit_to_size(name, opts, shape, f"site {site!r}")
            blocks.append(block_spec(name, math.prod(shape), **opts))
        return BlockSites.identity(self.latent_dim, dtype=dtype, device=device, blocks=blocks)

    def _require_setup(self, what: str) -> None:
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__}.{what} needs the guide to be set up: call the guide, "
                f"guide.setup(*model_args), or a NaturalGradientSVI step first"
            )

    def _setup_for(self, what: str, args: tuple, kwargs: dict[str, Any]) -> None:
        """Set up with the model arguments a method was given, or explain why it cannot."""
        if self.prototype_trace is not None:
            return
        try:
            self.setup(*args, **kwargs)
        except Exception as exc:
            raise RuntimeError(
                f"{type(self).__name__}.{what} needs the guide to be set up, and setting it up "
                f"with the arguments given ({len(args)} positional, {sorted(kwargs)} keyword) "
                f"failed ({type(exc).__name__}: {exc}); pass the model's arguments, e.g. "
                f"guide.{what}(*model_args), or call guide.setup(*model_args) first"
            ) from exc

    # ------------------------------------------------------------------ state
    @property
    def factor(self) -> Structure:
        """The covariance factor ``K`` (``Σ = K Kᵀ``), built from the current parameters."""
        self._require_setup("factor")
        tensors = {key: getattr(self, attr) for key, attr in self._factor_attrs.items()}
        layout = self.__dict__.get("_factor_layout")  # (spec, class, dim, options, shapes)
        if layout is not None and layout[0] is self._factor_spec and all(
                t.shape == shape for t, shape in zip(tensors.values(), layout[4])):
            return layout[1]._trusted(layout[2], tensors, layout[3])  # validated before
        factor = structure_from_spec(tensors, self._factor_spec)
        self.__dict__["_factor_layout"] = (self._factor_spec, type(factor), factor.dim,
                                           factor.options, [t.shape for t in tensors.values()])
        return factor

    def factor_spec(self) -> dict[str, Any]:
        """JSON-able spec of the factor's structure (``Structure.spec()``)."""
        self._require_setup("factor_spec")
        return dict(self._factor_spec)

    @torch.no_grad()
    def set_state(self, loc: Tensor, factor: Structure) -> None:
        """Overwrite ``loc`` and the factor in place (the parameters keep their identity).

        Raises:
            ValueError: ``loc`` of another shape or ``factor`` of another structure.
        """
        self._require_setup("set_state")
        if not isinstance(loc, Tensor) or loc.shape != self.loc.shape:
            shape = tuple(loc.shape) if isinstance(loc, Tensor) else type(loc).__name__
            raise ValueError(f"loc must have shape {tuple(self.loc.shape)}, got {shape}")
        spec = self._factor_spec
        same = isinstance(factor, Structure) and factor.name == spec["name"] and (
            factor.dim == spec["dim"] and factor.options == spec["options"])  # no spec() copy
        if not same and (not isinstance(factor, Structure) or factor.spec() != spec):
            got = factor.spec() if isinstance(factor, Structure) else type(factor).__name__
            raise ValueError(f"factor must have spec {self._factor_spec}, got {got}")
        self.loc.copy_(loc)
        tensors = factor.tensors()
        for key, attr in self._factor_attrs.items():
            getattr(self, attr).copy_(tensors[key])

    # ------------------------------------------------------------------ AutoContinuous hooks
    def get_posterior(self, *args: Any, **kwargs: Any) -> PyroStructuredGaussian:
        """The posterior over the unconstrained latent vector, ``N(loc, K Kᵀ)`` (sets the guide
        up with ``*args, **kwargs`` first if needed, like ``median``/``quantiles``)."""
        self._setup_for("get_posterior", args, kwargs)
        return PyroStructuredGaussian(self.loc, self.factor)

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        self._setup_for("median", args, kwargs)
        return self.loc, self.factor.gram_diagonal().sqrt()

    def psis(self, model: Callable[..., Any], *args: Any, num_samples: int = 1000,
             generator: torch.Generator | None = None, **kwargs: Any):
        """Pareto-smoothed importance weights of ``num_samples`` draws of ``q`` against the
        model's posterior (:func:`structvi.pyro.psis.guide_psis`): ``k̂``, corrected moments and
        resampled draws; warns when ``k̂`` exceeds the reliability threshold."""
        from structvi.pyro.psis import guide_psis

        return guide_psis(self, model, num_samples, model_args=args, model_kwargs=kwargs,
                          generator=generator)

    def constrain(self, latent: Tensor, *, skip_zero_jacobians: bool = False
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Unpack an unconstrained latent of shape ``batch + (d,)`` into site values.

        Args:
            latent: the unconstrained latent, shape ``batch + (d,)``.
            skip_zero_jacobians: leave out the sites whose transform is the identity (their
                log-Jacobian is zero) from the second dict.

        Returns:
            ``(values, log_abs_det_jacobians)``: per site, the constrained value and
            ``log|det ∂T/∂u|`` elementwise (shape ``batch`` + the site's remaining dims).
        """
        sites, total, shapes = self._constrain_layout()
        if latent.shape[-1:] != (total,):
            raise ValueError(f"expected an unconstrained latent of shape batch + ({total},), got "
                             f"{tuple(latent.shape)}")
        batch = tuple(latent.shape[:-1])
        targets = shapes.get(batch)
        if targets is None:  # the sites' shapes for this batch shape (as Pyro's _unpack_latent)
            targets = shapes[batch] = [_broadcast(unc, batch + (1,) * event_dim)
                                       for _, _, _, unc, event_dim, _ in sites]
        values, ladj = {}, {}
        for (name, pos, size, _, _, transform), shape in zip(sites, targets):
            u = latent[..., pos:pos + size].view(shape)
            value = transform(u)
            values[name] = value
            if not (skip_zero_jacobians and _is_identity(transform)):
                ladj[name] = transform.log_abs_det_jacobian(u, value)
        return values, ladj

    def _constrain_layout(self) -> tuple[list[tuple], int, dict[tuple, list]]:
        """Per latent site ``(name, offset, size, unconstrained shape, event dims, transform)``,
        the total size and a cache of site shapes per batch shape; built once per set-up (the
        same packing as Pyro's ``_unpack_latent``, without rebuilding transforms per call)."""
        self._require_setup("constrain")
        layout = self.__dict__.get("_layout_cache")
        if layout is None or layout[0] is not self.prototype_trace:
            sites, pos = [], 0
            for name, site in self.prototype_trace.iter_stochastic_nodes():
                unc = tuple(self._unconstrained_shapes[name])
                event_dim = site["fn"].event_dim + len(unc) - len(site["value"].shape)
                size = math.prod(unc)
                sites.append((name, pos, size, unc, event_dim, biject_to(site["fn"].support)))
                pos += size
            layout = (self.prototype_trace, sites, pos, {})
            self.__dict__["_layout_cache"] = layout
        return layout[1], layout[2], layout[3]


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """``torch.broadcast_shapes(a, b)`` for two shapes (without its first-call import of the
    symbolic-shapes machinery)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise RuntimeError(f"shapes {a} and {b} are not broadcastable")
        out.append(y if x == 1 else x)
    return tuple(out)


def _is_identity(transform: Transform) -> bool:
    """Whether ``transform`` is the identity (of reals, or of reals with event dims)."""
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return transform == identity_transform


def _check_stored_shape(guide: AutoStructuredNormal, attr: str, shape: torch.Size) -> None:
    """Raise if Pyro's param store gave ``attr`` a value of another shape.

    Guides of one name share the param store (as Pyro's autoguides do), so a guide set up for a
    model while the store holds a same-named guide of another model would silently start from
    (and fail on) the other model's values.
    """
    got = getattr(guide, attr).shape
    if got != shape:
        raise ValueError(
            f"Pyro's param store holds '{guide._pyro_name}.{attr}' of shape {tuple(got)} (from "
            f"another guide named {guide._pyro_name!r}), but this model needs shape "
            f"{tuple(shape)}; call pyro.clear_param_store() before setting up a guide for "
            f"another model"
        )


def _refuse_local_latents(trace: Any) -> None:
    """Raise if a latent site lives in a subsampled plate (its posterior would be wrong)."""
    for name, site in trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"latent site {name!r} is inside the subsampled plate {frame.name!r} "
                    f"(subsample {frame.size} of {frame.full_size}): AutoStructuredNormal has "
                    f"one mean and factor for all latents, so local latents that change with the "
                    f"minibatch cannot be fitted; use the full plate (subsample_size=None) for "
                    f"this site, or an amortized/other guide for it (e.g. in an AutoGuideList)"
                )
