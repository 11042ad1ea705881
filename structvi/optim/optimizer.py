r"""``StructuredNGD``: the INGD/SINGD optimizer over :mod:`structvi.structures` (MATH §3)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from structvi.optim import kfac, robust
from structvi.optim._collect import Collection
from structvi.optim._lifecycle import Lifecycle
from structvi.optim import functional as F
from structvi.optim.describe import describe, diagnostics, log_summary
from structvi.optim.config import check_group, factor_spec
from structvi.optim.distributed import data_parallel_reducer
from structvi.optim.state import (
    read_structure,
    restore_loaded_state,
    set_counters,
    store_product,
    write_structure,
)
from structvi.structures.registry import make_structure

__all__ = ["StructuredNGD"]


_ACCEPT = F.Screen()  # the verdict of an unscreened step (immutable)


def _state_keys(factors: F.FactorState) -> tuple[tuple[str, Tensor], ...]:
    """``(state key, tensor)`` of every tensor of a layer's factors (the cache check)."""
    return tuple((f"{key}.{name}", t) for key, s in zip(F.FactorState._fields, factors)
                 if s is not None for name, t in s.tensors().items())


class StructuredNGD(Collection, Lifecycle, Optimizer):
    r"""Structured inverse-free natural-gradient descent (INGD/SINGD, Lin et al. 2023, 2024).

    A drop-in replacement for ``torch.optim.AdamW``: ``StructuredNGD(model)`` trains with
    defaults chosen on a small benchmark suite (benchmarks/optim_defaults.py). Tuning in words
    (docs/optimizer_tuning.md): ``lr`` is the Kronecker layers' step size — from a known AdamW
    learning rate ``a``, use ``lr = 3a`` (the other parameters then run at ``a``); ``lr_cov``
    and ``T`` set how fast and how often the preconditioner follows the curvature statistics
    (``lr_cov=0`` freezes it); ``damping`` is relative to each statistic's mean eigenvalue
    (larger: closer to per-layer-normalized SGD); ``structures`` trades the preconditioner's
    fidelity for cost. :meth:`describe` lists every parameter's rule (a summary is logged at
    ``INFO`` on the ``structvi.optim`` logger at construction) and :meth:`diagnostics` tells a
    preconditioner that moves from one that does not.

    Every ``nn.Linear`` (any leading dimensions) and ``nn.Conv2d`` (stride, padding, dilation,
    groups) layer whose weight is trained, and the input and output projections of
    ``nn.MultiheadAttention`` (:mod:`structvi.optim.attention`), get a Kronecker preconditioner
    :math:`(KK^\top) \otimes (CC^\top)` with covariance-side factors :math:`K \in \mathcal{L}_K`
    (input side, bias column included) and :math:`C \in \mathcal{L}_C` (output side) of any
    structure in :mod:`structvi.structures`; only matrix products are used (no inverse or
    decomposition). For each such layer, at step :math:`t` (MATH (3.2)–(3.3)):

    .. math::
        &\textbf{if } t \bmod T = 0: \\
        &\quad H_K = \hat\Pi_K(K^\top \bar A K),\ H_C = \hat\Pi_C(C^\top \bar G C)
            \quad\text{(Kronecker statistics of the backward passes since the last step)} \\
        &\quad \hat K = \hat\Pi_K(K^\top K),\ \hat C = \hat\Pi_C(C^\top C) \\
        &\quad \nu_K = \tfrac12\big[u\,\overline{\mathrm{tr}}(H_C) H_K
            + \lambda\,\overline{\mathrm{tr}}(\hat C)\hat K - I\big],\quad
          \nu_C = \tfrac12\big[u\,\overline{\mathrm{tr}}(H_K) H_C
            + \lambda\,\overline{\mathrm{tr}}(\hat K)\hat C - I\big] \\
        &\quad m_K \leftarrow \alpha_1 m_K + \nu_K,\quad K \leftarrow K\,h(-\beta_K m_K),
          \qquad m_C \leftarrow \alpha_1 m_C + \nu_C,\quad C \leftarrow C\,h(-\beta_C m_C) \\
        &\quad \beta_K = \min(\beta_1, c / \|m_K\|_\infty),\
          \beta_C = \min(\beta_1, c / \|m_C\|_\infty) \quad\text{(trust region)} \\
        &\hat G = C C^\top (\nabla_W \ell / s_t)\, K K^\top, \qquad
          m_W \leftarrow \alpha_2 m_W + \hat G + \gamma W, \qquad W \leftarrow W - \beta_2 m_W

    with :math:`\overline{\mathrm{tr}} = \mathrm{tr}/\dim`, :math:`h(M) = I + M + \tfrac12 M^2`
    (``retraction="quadratic"``, invertible for every step), :math:`I + M` (``"first_order"``,
    SINGD's :math:`K - \beta_1 K m_K`) or :math:`\exp(M)` (``"expm"``), :math:`\|\cdot\|_\infty`
    the largest absolute row sum (``trust_region=None``: :math:`\beta_K = \beta_C = \beta_1`);
    the factor update is
    :func:`structvi.engine.factor_step`. ``kfac_like`` (IKFAC) uses
    :math:`\nu_K = \tfrac12[H_K + \lambda\hat K - I]`, :math:`\nu_C = \tfrac12[u H_C + \lambda
    \hat C - I]` and no :math:`m_K, m_C`. ``normalize_lr_cov`` replaces ½ by ½(1−α₁) and
    :math:`\beta_1` by :math:`\beta_1/\max(1, \max_{ij}|m|)`. :math:`s_t` is the GradScaler
    scale and :math:`u = s_{t-1}/s_t^2` (MATH §3.7).

    With ``normalize_preconditioner`` (default) the step uses the preconditioner's shape only and
    a per-layer Adam-like scale: :math:`D = \hat G / (\overline{\mathrm{tr}}(KK^\top)
    \overline{\mathrm{tr}}(CC^\top))`, :math:`v \leftarrow \beta v + (1-\beta)\,
    \mathrm{mean}(D^2)` (``beta2``), and :math:`D / (\sqrt{v/(1-\beta^t)} + \epsilon)` replaces
    :math:`\hat G` in the momentum. With ``relative_damping`` (default) :math:`\lambda` multiplies
    the mean eigenvalue of each factor's term: :math:`\lambda\,\overline{\mathrm{tr}}(\hat C)
    \hat K` becomes :math:`\lambda\, c_K \mathrm{tr}(H_K)/\mathrm{tr}(\hat K)\,\hat K` with
    :math:`c_K` the coefficient of :math:`H_K` (likewise for ``C``). ``normalize_preconditioner=
    False, relative_damping=False, diagonal_lr_ratio=1`` is the published INGD/SINGD update.

    Every other trainable parameter (norm layers, embeddings, unsupported layers, a bias whose
    weight is not trained) follows a diagonal rule in the same optimizer — AdamW with
    ``betas=(momentum, beta2)``, ``eps``, decoupled ``weight_decay`` and step size
    ``lr · diagonal_lr_ratio`` of its group (:func:`structvi.optim.functional.diagonal_step`).

    Statistics are collected by a forward hook per layer that puts a tensor hook on the layer's
    output (so in-place activations work) on steps with :math:`t \bmod T = 0`; several
    backward passes before one ``step()`` accumulate (gradient accumulation: scale each
    micro-batch's averaged loss by micro/mini as usual; summed losses need no scaling).
    A layer's state holds the tensors of ``K, C, m_K, m_C`` (keys ``"K.<name>"`` ...), its step
    count and last gradient scale, and, for factors stored as ``d×d`` matrices (dense,
    triangular), the products ``K Kᵀ``/``C Cᵀ`` (keys ``"KKt"``, ``"CCt"``), which halve the
    cost of every step (``diagonal``, ``low_rank_diagonal`` and ``hierarchical`` factors keep
    ``K Kᵀ`` as a :class:`~structvi.optim.functional.SparseGram` outside ``state``, rebuilt after
    each factor update, of no more numbers than the factor); ``state_dict()`` is tensors only (``torch.load(weights_only=True)``)
    and ``load_state_dict`` keeps every tensor's saved dtype. Pending statistics (backward
    done, ``step()`` not yet called) are not part of the state. The data-parallel
    communication points are the methods of :attr:`reducer` (a
    :class:`~structvi.optim.functional.Reducer`; single process: no-ops). Call :meth:`close`
    to remove the hooks (they are also removed when the optimizer is garbage-collected).

    Every step is screened before anything changes (:func:`structvi.optim.functional.screen`):
    a non-finite gradient or statistic skips the whole step with the state intact (counted in
    :attr:`skipped_steps`, warned once); gradient changes between backward and ``step()``
    (``scaler.unscale_``, ``clip_grad_norm_``) are applied to the statistics too; a zero layer
    gradient leaves its preconditioner alone; gradients and statistics more than
    ``outlier_threshold`` times their running means are clipped to that bound (counted in
    :attr:`clipped_steps`). ``copy.deepcopy`` and ``pickle`` give working optimizers bound to
    the copied model; ``load_state_dict`` checks the saved state against this optimizer's layers
    before it changes anything.

    Args:
        model: the network, or it wrapped in ``DistributedDataParallel`` (data-parallel
            training: :mod:`structvi.optim.distributed`; not ``DataParallel``).
        params: parameters or param groups; ``None`` trains every parameter of ``model`` that
            requires a gradient. A layer's weight and bias must be in the same group.
        lr: ``β₂``, step size of the Kronecker rule (default ``3e-3``).
        momentum: ``α₂`` (parameter momentum; ``β₁`` of the diagonal rule's AdamW).
        damping: ``λ``.
        alpha1: ``α₁``, momentum of ``m_K, m_C``.
        weight_decay: ``γ``, added after preconditioning.
        T: preconditioner update period.
        lr_cov: ``β₁``, a float or a callable of the step.
        structures: ``(K, C)`` structures: names (``"dense"``, ``"diagonal"``, ...), dicts
            ``{"name": "block_diagonal", "block_size": 16}``, or singd's names
            (``"hierarchical15_15"``, ``"triltoeplitz"``, ``"block30diagonal"``); one entry
            applies to both factors. ``"kronecker"`` is VI-only.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers (MATH §3.4).
        loss_average: ``"batch"``, ``"batch+sequence"`` (losses averaged over those terms) or
            ``None`` (summed loss).
        retraction: ``"quadratic"`` (default), ``"first_order"`` (SINGD; invertible only while
            ``β₁‖m‖ < 1``) or ``"expm"``.
        trust_region: ``c`` in the factor step cap ``β₁ → min(β₁, c/‖m‖_∞)`` (MATH §2.6): the
            quadratic retraction grows a factor like ``(β₁m)²/2`` when ``β₁‖m‖ ≫ 1``; ``None``
            disables it (``retraction="first_order", trust_region=None`` is SINGD exactly).
        preconditioner_dtype: ``(dtype_K, dtype_C)`` for ``K, m_K`` and ``C, m_C``; ``None``
            means the weight's dtype.
        init_grad_scale: the GradScaler's initial scale (1 without a scaler).
        normalize_lr_cov: normalized factor steps (see above).
        kfac_like: IKFAC update (``alpha1`` is then ignored).
        momentum_dtype: dtype of the parameter momenta (default: the parameter's dtype).
        beta2: second-moment decay of the diagonal rule and of the normalized step.
        eps: denominator offset of the diagonal rule and of the normalized step.
        diagonal_lr_ratio: the diagonal rule's step size is ``lr · diagonal_lr_ratio`` (default
            ``1/3``: AdamW's ``1e-3`` at the default ``lr``); a ratio, so lr schedulers scale
            both rules; per param group like every hyper-parameter.
        relative_damping: ``λ`` relative to each statistic's mean eigenvalue (scale-free).
        normalize_preconditioner: trace-normalized preconditioner and per-layer RMS-normalized
            step (see above).
        outlier_threshold: ``κ > 1`` of the outlier rule, or ``None`` to turn clipping off.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or is wrapped in ``DataParallel``.
        ValueError: a hyper-parameter out of range, an unknown or VI-only structure, bad
            structure options for a layer, or a weight and its bias in different groups.
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale/found_inf (torch name)

    def __init__(
        self, model: nn.Module, params: Iterable[Any] | None = None, lr: float = 3e-3,
        momentum: float = 0.9, damping: float = 0.1, alpha1: float = 0.5,
        weight_decay: float = 0.0, T: int = 5, lr_cov: float | Callable[[int], float] = 0.1,
        structures: Any = ("dense", "dense"), kfac_approx: str = "expand",
        loss_average: str | None = "batch", retraction: str = "quadratic",
        trust_region: float | None = 1.0,
        preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
        init_grad_scale: float = 1.0, normalize_lr_cov: bool = False, kfac_like: bool = False,
        momentum_dtype: torch.dtype | None = None, beta2: float = 0.999, eps: float = 1e-8,
        outlier_threshold: float | None = robust.DEFAULT_THRESHOLD,
        diagonal_lr_ratio: float = 1 / 3, relative_damping: bool = True,
        normalize_preconditioner: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        ddp = None  # data parallel: structvi.optim.distributed (DDP unwrapped, reducer below)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            ddp, model = model, model.module
        if isinstance(model, nn.DataParallel):
            raise TypeError("model must not be wrapped in DataParallel; use "
                            "DistributedDataParallel or pass the underlying module")
        defaults = dict(
            lr=lr, momentum=momentum, damping=damping, alpha1=alpha1, weight_decay=weight_decay,
            T=T, lr_cov=lr_cov, structures=structures, kfac_approx=kfac_approx,
            loss_average=loss_average, retraction=retraction, trust_region=trust_region,
            preconditioner_dtype=preconditioner_dtype, init_grad_scale=init_grad_scale,
            normalize_lr_cov=normalize_lr_cov, kfac_like=kfac_like,
            momentum_dtype=momentum_dtype, beta2=beta2, eps=eps,
            outlier_threshold=outlier_threshold,
            diagonal_lr_ratio=diagonal_lr_ratio, relative_damping=relative_damping,
            normalize_preconditioner=normalize_preconditioner,
        )
        self.reducer: F.Reducer = F.LOCAL
        self.skipped_steps = 0  # steps skipped for a non-finite gradient or statistic
        self.clipped_steps = 0  # steps where the outlier rule clipped something
        self._warned: set[str] = set()
        self._attach(model)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        try:
            super().__init__(params, defaults)
            robust.check_params_in_model(self)
            self.reducer = data_parallel_reducer(self, model, ddp)
        except Exception:
            self.close()  # leave the model as it was
            raise
        self._register_state_hooks()
        log_summary(self)

    def describe(self) -> str:
        """Every trained parameter with its rule: a table (see :mod:`structvi.optim.describe`)."""
        return describe(self)

    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per preconditioned layer: distance of ``KKᵀ``, ``CCᵀ`` from the identity (shape only)
        and the cosine between the gradient and the preconditioned gradient
        (:func:`structvi.optim.describe.diagnostics`)."""
        return diagnostics(self)

    # ------------------------------------------------------------------ groups and layers
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated); its ``Linear``/``Conv2d`` weights get preconditioners."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            check_group(self.param_groups[index], index)
            robust.check_group(self.param_groups[index], index)
            for p in self.param_groups[index]["params"]:
                self._group_index[p] = index
            self._register_layers(index)
        except Exception:
            for p in self.param_groups.pop()["params"]:
                self._group_index.pop(p, None)
            raise

    def _register_layers(self, index: int, initialize: bool = True) -> None:
        group = self.param_groups[index]
        new = []
        by_role = {(n, r): q for q, owned in self._owners.items() for n, _, r in owned}
        for p in group["params"]:
            owners = self._owners.get(p, [])
            if len(owners) > 1:
                names = [f"{n}.{role}" for n, _, role in owners]
                raise ValueError(f"params: one tensor is shared by the layers {names}; a parameter "
                                 "shared by several Linear/Conv2d layers is not supported")
            if not owners:
                continue
            name, module, role = owners[0]
            other = by_role.get((name, "bias" if role == "weight" else "weight"))
            other_index = self._group_index.get(other) if other is not None else None
            if other_index is not None and other_index != index:
                w, b = (index, other_index) if role == "weight" else (other_index, index)
                raise ValueError(f"params: {name}.weight and {name}.bias must be in the same "
                                 f"param group, got groups {w} and {b}")
            if role == "weight":
                new.append(kfac.Layer(name, module, p, other if other_index == index else None))
        specs = [self._specs(layer, group) for layer in new]  # validate before any change
        for layer, spec in zip(new, specs):
            if initialize:
                self._add_layer(layer, group, spec)
            else:
                self._hook_layer(layer)

    def _add_layer(self, layer: kfac.Layer, group: dict[str, Any], specs: tuple[dict, dict]
                   ) -> None:
        self._hook_layer(layer)
        state = self.state[layer.weight]
        set_counters(state, 0, group["init_grad_scale"])
        dtypes = self._factor_dtypes(layer, group)
        for key, spec, dtype in zip(("K", "C"), specs, dtypes):
            factor = make_structure(spec["name"], spec["dim"], dtype=dtype,
                                    device=layer.weight.device, **spec["options"])
            write_structure(state, key, factor)
            store_product(state, key, factor)
            if not group["kfac_like"]:
                write_structure(state, "m_" + key, factor.zeros_like())
        self._sync_collecting(layer)

    def _specs(self, layer: kfac.Layer, group: dict[str, Any]) -> tuple[dict, dict]:
        dim_K, dim_C = kfac.weight_dims(layer.weight, layer.bias is not None)
        K_entry, C_entry = group["structures"]
        return (factor_spec(K_entry, dim_K, f"K of layer {layer.name!r}"),
                factor_spec(C_entry, dim_C, f"C of layer {layer.name!r}"))

    @staticmethod
    def _factor_dtypes(layer: kfac.Layer, group: dict[str, Any]) -> tuple[torch.dtype, torch.dtype]:
        dtype_K, dtype_C = group["preconditioner_dtype"]
        return dtype_K or layer.weight.dtype, dtype_C or layer.weight.dtype

    def preconditioner(self, module: nn.Module) -> F.FactorState:
        """The current factors ``K, C`` and momenta ``m_K, m_C`` of a preconditioned layer."""
        layer = self._module_layer.get(module)
        if layer is None:
            raise ValueError(f"module {module!r} has no preconditioner in this optimizer")
        return self._factors(layer)

    def _factors(self, layer: kfac.Layer) -> F.FactorState:
        """The layer's structures, rebuilt from ``state`` only when its tensors were replaced."""
        state = self.state[layer.weight]
        cached = self._factor_cache.get(layer.weight)
        if cached is not None:
            check = self._factor_keys.get(layer.weight)
            if check is None or check[0] is not cached:
                check = self._factor_keys[layer.weight] = (cached, _state_keys(cached))
            for key, t in check[1]:
                if state.get(key) is not t:
                    break
            else:
                return cached
        group = self.param_groups[self._group_index[layer.weight]]
        spec_K, spec_C = self._specs(layer, group)
        m_K = None if group["kfac_like"] else read_structure(state, "m_K", spec_K)
        m_C = None if group["kfac_like"] else read_structure(state, "m_C", spec_C)
        factors = F.FactorState(read_structure(state, "K", spec_K),
                                read_structure(state, "C", spec_C), m_K, m_C)
        if cached is not None:  # factors replaced from outside: refresh the dense products
            store_product(state, "K", factors.K)
            store_product(state, "C", factors.C)
        self._factor_cache[layer.weight] = factors
        return factors

    def _after_load(self) -> None:
        restore_loaded_state(self)
        self._stats.clear()
        self._factor_cache.clear()
        self._gram_cache.clear()
        self._backward_norms.clear()
        self._scale_cache.clear()
        for index, group in enumerate(self.param_groups):
            check_group(group, index)
            robust.check_group(group, index)
        for layer in self._layers.values():
            self._sync_collecting(layer)

    def close(self) -> None:
        """Remove every hook this optimizer installed (the optimizer keeps its state)."""
        robust.release(self._handles, self._receiver_keys)
        self._stats.clear()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` (optional) recomputes the loss with gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss

    def _update(self) -> None:
        """The body of :meth:`step` after the closure (under ``no_grad``): subclasses call it
        without a second pass through ``torch.optim``'s step wrapper (profiling, step hooks)."""
        scale, skip = self._amp_scale()
        if skip:  # GradScaler found inf/NaN: no update, statistics dropped, steps counted
            self._stats.clear()
            self._backward_norms.clear()
            for weight, layer in self._layers.items():
                set_counters(self.state[weight], int(self.state[weight]["step"]) + 1, scale)
                self._sync_collecting(layer)
            return
        robust.check_groups_for_step(self)
        if not robust.screen_step(self, scale):  # non-finite: skipped, state intact
            return
        try:
            for group in self.param_groups:
                with F.autocast_off(group["params"]):
                    moves: tuple[list, list, list] = ([], [], [])  # the group's momentum steps
                    for p in group["params"]:
                        if p in self._layers:
                            self._layer_step(self._layers[p], group, scale, moves)
                        elif p not in self._biases and p.grad is not None:
                            self._diagonal_step(p, group, scale)
                    F.momentum_steps(*moves, lr=group["lr"], momentum=group["momentum"],
                                     weight_decay=group["weight_decay"])
        finally:
            self._verdicts.clear()
            self._screened.clear()
            self._backward_norms.clear()

    def _amp_scale(self) -> tuple[float, bool]:
        """``(s_t, skip)`` from the attributes ``GradScaler.step`` sets on this optimizer."""
        pending = self.__dict__.pop("_amp_pending", None)  # read already in this step()
        if pending is not None:
            return pending
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # after scaler.unscale_(optimizer) the gradients are unscaled (grad_scale is None): the
        # screening rescales the statistics by the observed gradient change instead
        if (isinstance(grad_scale, Tensor) and isinstance(found_inf, Tensor)
                and grad_scale.device == found_inf.device):  # one transfer for both
            scale, inf = torch.stack([grad_scale.reshape(()).double(),
                                      found_inf.reshape(()).double()]).tolist()
            return scale, inf != 0.0
        scale = 1.0 if grad_scale is None else float(grad_scale)
        return scale, found_inf is not None and bool(found_inf)

    def _layer_step(self, layer: kfac.Layer, group: dict[str, Any], scale: float,
                    moves: tuple[list, list, list] | None = None) -> None:
        """Precondition the layer's gradient and take its momentum step: now, or appended to
        ``moves`` (``(params, directions, buffers)``) for the group's fused momentum step when
        the direction does not live in the shared scratch buffer (the next layer reuses it)."""
        weight = layer.weight
        state = self.state[weight]
        stats = self._stats.pop(weight, None)
        if weight.grad is None:
            return
        step = int(state["step"])
        factors = self._factors(layer)
        verdict = self._verdicts.get(weight, _ACCEPT)
        if step % group["T"] == 0 and verdict.update_factors:
            factors = self._update_factors(layer, group, factors, stats, scale)
        KKt, CCt = state.get("KKt"), state.get("CCt")
        if KKt is not None and CCt is not None:  # dense products: [∇W, ∇b] is never formed
            G = None
            grad_b = None if layer.bias is None else layer.bias.grad
            if layer.bias is not None and grad_b is None:
                grad_b = torch.zeros_like(layer.bias)
            # single process: the direction stays in the products' dtype (float32 for bf16
            # parameters); a reducer all-reduces it in the gradient's
            direction = F.precondition_parts(
                weight.grad, grad_b, KKt, CCt, scale=scale, factor=verdict.grad_factor,
                keep_dtype=isinstance(self.reducer, F.LocalReducer))
        else:
            G = kfac.gradient_matrix(layer, scale, self._scratch_matrix(layer))
            if verdict.grad_factor != 1.0:
                G.mul_(verdict.grad_factor)
            cached = self._gram_cache.get(weight)
            if cached is None or cached[0] is not factors:
                cached = (factors, F.gram_product(factors.K), F.gram_product(factors.C))
                self._gram_cache[weight] = cached
            KKt = cached[1] if KKt is None else KKt
            CCt = cached[2] if CCt is None else CCt
            direction = F.precondition(G, factors.K, factors.C, KKt, CCt, overwrite=True)
        direction = self.reducer.gradient(direction, group["loss_average"])
        if group["normalize_preconditioner"]:
            direction = self._normalize(layer, group, factors, direction, step)
        bias = layer.bias
        parts = ((weight, direction),) if bias is None else (
            (weight, direction[:, :-1]), (bias, direction[:, -1]))
        later = moves is not None and (G is None or not _shares_memory(direction, G))
        for param, part in parts:
            if part.shape != param.shape:  # conv weights: the flattened rows
                part = part.reshape(param.shape)
            buffer = self._momentum_buffer(param, group)
            if later:
                moves[0].append(self._target(param))
                moves[1].append(part)
                moves[2].append(buffer)
            else:
                F.momentum_step(self._target(param), part, buffer, lr=group["lr"],
                                momentum=group["momentum"], weight_decay=group["weight_decay"])
        set_counters(state, step + 1, scale)
        robust.write_running(state, verdict)
        self._sync_collecting(layer, step + 1, group)

    def _normalize(self, layer: kfac.Layer, group: dict[str, Any], factors: F.FactorState,
                   direction: Tensor, step: int) -> Tensor:
        """``normalize_preconditioner``: ``d ← d / (tr̄(KKᵀ) tr̄(CCᵀ))``, then ``d ← d / (√v̂ + ε)``
        with ``v ← β v + (1−β) mean(d²)`` (``β = beta2``, ``v̂`` bias-corrected), in place."""
        direction = direction.mul_(self._trace_scale(layer, factors).to(direction.dtype))
        state = self.state[layer.weight]
        beta = group["beta2"]
        sq = state.get("direction_sq")
        if sq is None:
            sq = state["direction_sq"] = torch.zeros((), dtype=torch.float32,
                                                     device=direction.device)
        sq.mul_(beta).add_(direction.square().mean().float(), alpha=1.0 - beta)
        rms = (sq / (1.0 - beta ** (step + 1))).sqrt_().add_(group["eps"])
        return direction.div_(rms.to(direction.dtype))

    def _trace_scale(self, layer: kfac.Layer, factors: F.FactorState) -> Tensor:
        """``1 / (tr̄(K Kᵀ) tr̄(C Cᵀ))``, cached until the factors change."""
        cached = self._scale_cache.get(layer.weight)
        if cached is None or cached[0] is not factors:
            mean = (F.gram_project(factors.K).trace() / factors.K.dim
                    * F.gram_project(factors.C).trace() / factors.C.dim)
            cached = (factors, 1.0 / mean.float())
            self._scale_cache[layer.weight] = cached
        return cached[1]

    def _scratch_matrix(self, layer: kfac.Layer) -> Tensor:
        """A ``(d_C, d_K)`` view of the shared scratch buffer for the layer's gradient matrix."""
        grad = layer.weight.grad
        key = (grad.dtype, grad.device)
        buffer = self._scratch.get(key)
        cached = self._matrix_shapes.get(layer.weight)  # (shape, buffer, view of it)
        if cached is not None and buffer is not None and cached[1] is buffer:
            return cached[2]
        shape = kfac.weight_dims(layer.weight, layer.bias is not None)[::-1]
        if buffer is None or buffer.numel() < shape[0] * shape[1]:
            buffer = self._scratch[key] = torch.empty(shape[0] * shape[1], dtype=grad.dtype,
                                                      device=grad.device)
        view = buffer[: shape[0] * shape[1]].view(shape)
        self._matrix_shapes[layer.weight] = (shape, buffer, view)
        return view

    def _update_factors(self, layer: kfac.Layer, group: dict[str, Any], factors: F.FactorState,
                        stats: kfac.KroneckerStatistics | None, scale: float) -> F.FactorState:
        if stats is None:
            if layer.name not in self._warned:
                self._warned.add(layer.name)
                warnings.warn(f"StructuredNGD: no statistics were recorded for layer "
                              f"{layer.name!r} (its forward hook did not run before backward); "
                              "its preconditioner is not updated", stacklevel=4)
            return factors
        H_K, H_C = self.reducer.statistics(*robust.screened_statistics(self, layer, stats),
                                           group["loss_average"])
        state = self.state[layer.weight]
        new = F.update_preconditioner(
            factors, H_K, H_C, lr_cov=F.schedule(group["lr_cov"], int(state["step"])),
            alpha1=group["alpha1"], damping=group["damping"],
            unscale=float(state["grad_scale"]) / scale**2, kfac_like=group["kfac_like"],
            normalize_lr_cov=group["normalize_lr_cov"], retraction=group["retraction"],
            trust_region=group["trust_region"], relative_damping=group["relative_damping"],
        )
        self._store_factors(layer, new)
        return new

    def _store_factors(self, layer: kfac.Layer, factors: F.FactorState) -> None:
        """Write a layer's factors and momenta (and the ``K Kᵀ``, ``C Cᵀ`` products) to its
        state and the factor cache."""
        state = self.state[layer.weight]
        for key in ("K", "C", "m_K", "m_C"):
            if getattr(factors, key) is not None:
                write_structure(state, key, getattr(factors, key))
        store_product(state, "K", factors.K)
        store_product(state, "C", factors.C)
        self._factor_cache[layer.weight] = factors

    def _target(self, param: Tensor) -> Tensor:
        """The tensor a step writes for ``param``: ``param`` itself (a subclass may keep a wider
        master copy, written by the step and rounded into ``param`` afterwards)."""
        return param

    def _momentum_buffer(self, param: Tensor, group: dict[str, Any]) -> Tensor | None:
        if group["momentum"] == 0.0:
            return None
        state = self.state[param]
        if "momentum_buffer" not in state:
            dtype = group["momentum_dtype"] or self._target(param).dtype
            state["momentum_buffer"] = torch.zeros_like(param, dtype=dtype)
        return state["momentum_buffer"]

    def _diagonal_step(self, param: Tensor, group: dict[str, Any], scale: float) -> None:
        grad = param.grad if scale == 1.0 else param.grad / scale
        verdict = self._verdicts.get(param, _ACCEPT)
        if verdict.grad_factor != 1.0:
            grad = grad * verdict.grad_factor
        grad = self.reducer.gradient(grad, group["loss_average"])
        state = self.state[param]
        target = self._target(param)
        if "step" not in state:
            dtype = group["momentum_dtype"] or target.dtype
            state.update(step=torch.tensor(0), exp_avg=torch.zeros_like(param, dtype=dtype),
                         exp_avg_sq=torch.zeros_like(param, dtype=dtype))
        step = int(state["step"]) + 1
        state["step"] = torch.tensor(step)
        F.diagonal_step(target, grad, state["exp_avg"], state["exp_avg_sq"], step,
                        lr=group["lr"] * group["diagonal_lr_ratio"], momentum=group["momentum"],
                        beta2=group["beta2"],
                        eps=group["eps"], weight_decay=group["weight_decay"])
        robust.write_running(state, verdict)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of one storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
