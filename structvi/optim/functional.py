r"""The per-layer maths of :class:`~structvi.optim.StructuredNGD`: pure functions.

* :func:`update_preconditioner` — MATH (3.2): the natural gradient ``ν`` of the Kronecker factors
  in local coordinates, then the shared engine step :func:`structvi.engine.factor_step`
  (``m ← α₁ m + ν``; ``K ← K h(−β₁ m)``).
* :func:`precondition` — ``Ĝ = C Cᵀ G K Kᵀ`` (matrix products only); :func:`precondition_parts`
  the same with dense products from ``∇W`` and ``∇b`` without forming ``G = [∇W, ∇b]``.
* :func:`momentum_step` — MATH (3.3): weight decay after preconditioning, heavy-ball momentum;
  :func:`momentum_steps` the same for a group's parameters in fused calls.
* :func:`diagonal_step` — the documented rule for every other trainable parameter.
* :func:`screen` — the acceptance rule of a step (non-finite, zero and outlier gradients and
  statistics; DESIGN decision 7), applied by the optimizer before it changes anything.

Communication points for data-parallel training are the two methods of :class:`Reducer`;
:data:`LOCAL` does nothing (single process).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from structvi.engine import factor_step
from structvi.structures.base import Structure

__all__ = [
    "LOCAL",
    "FactorState",
    "SparseGram",
    "autocast_off",
    "LocalReducer",
    "Reducer",
    "Screen",
    "dense_product",
    "diagonal_step",
    "gram_product",
    "gram_project",
    "momentum_step",
    "momentum_steps",
    "precondition_parts",
    "precondition",
    "schedule",
    "screen",
    "update_preconditioner",
]


class Reducer(Protocol):
    """Where data-parallel training all-reduces (a later ``optim/distributed.py``)."""

    def statistics(self, H_K: Structure, H_C: Structure, loss_average: str | None
                   ) -> tuple[Structure, Structure]:
        """All-reduce one layer's normalized statistics before the preconditioner update."""

    def gradient(self, grad: Tensor, loss_average: str | None) -> Tensor:
        """All-reduce a preconditioned layer gradient ``Ĝ`` or a diagonal-rule gradient."""


class LocalReducer:
    """Single process: statistics and gradients pass through unchanged."""

    def statistics(self, H_K: Structure, H_C: Structure, loss_average: str | None
                   ) -> tuple[Structure, Structure]:
        """Return ``(H_K, H_C)`` unchanged."""
        del loss_average
        return H_K, H_C

    def gradient(self, grad: Tensor, loss_average: str | None) -> Tensor:
        """Return ``grad`` unchanged."""
        del loss_average
        return grad


LOCAL = LocalReducer()


class FactorState(NamedTuple):
    """One layer's preconditioner.

    ``K`` (input side) and ``C`` (output side) are the factors, ``m_K`` and ``m_C`` their
    momenta (``None`` for IKFAC, which keeps none).
    """

    K: Structure
    C: Structure
    m_K: Structure | None
    m_C: Structure | None


def gram_project(K: Structure) -> Structure:
    """``K̂ = Π̂(KᵀK)`` (singd's ``from_inner()``), specialized per structure when available."""
    specialized = getattr(K, "inner_project_self", None)
    if specialized is not None:
        return specialized()
    dense = K.to_dense()  # dense fallback until the structure provides inner_project_self
    return K.project(dense.T @ dense)


def _avg_trace(S: Structure) -> Tensor:
    return S.trace() / S.dim


def _relative(H: Structure, S_hat: Structure, coef: Tensor | float) -> Tensor:
    """``coef · tr(H) / tr(Ŝ)``: the mean eigenvalue of ``coef · H`` in the metric ``Ŝ``."""
    ratio = H.trace() / S_hat.trace().clamp(min=torch.finfo(S_hat.dtype).tiny)
    return (ratio * coef).to(S_hat.dtype)


def _directions(
    state: FactorState, H_K: Structure, H_C: Structure, *, damping: float, unscale: float,
    kfac_like: bool, half: float, relative_damping: bool = False,
) -> tuple[Structure, Structure]:
    r"""``ν_K, ν_C`` of MATH (3.2) (``half`` is ½, or ½(1−α₁) with ``normalize_lr_cov``).

    INGD:  :math:`\nu_K = \tfrac12[u\,\bar{tr}(H_C) H_K + \lambda\,\bar{tr}(\hat C)\hat K - I]`;
    IKFAC: :math:`\nu_K = \tfrac12[H_K + \lambda \hat K - I]`, :math:`\nu_C = \tfrac12[u H_C +
    \lambda \hat C - I]`, with :math:`\hat K = \hat\Pi(K^\top K)`. ``relative_damping``
    (scale-free) replaces the damping coefficient of ``K̂`` by ``λ c_K tr(H_K)/tr(K̂)``, with
    ``c_K`` the coefficient of ``H_K`` (``u tr̄(H_C)`` or 1), and likewise for ``C``: each term
    becomes ``c_K (H_K + λ μ_K K̂)`` with ``μ_K = tr(H_K)/tr(K̂)`` the mean eigenvalue of the
    statistic in the factor's metric, so the fixed point ``K Kᵀ ≈ (Ā + λ μ I)⁻¹/…`` does not
    change with the scale of the loss.
    """
    K_hat, C_hat = gram_project(state.K), gram_project(state.C)
    if kfac_like:
        coef_K, coef_C, damp_K, damp_C = 1.0, unscale, damping, damping
    else:
        coef_K = _avg_trace(H_C).to(H_K.dtype) * unscale
        coef_C = _avg_trace(H_K).to(H_C.dtype) * unscale
        damp_K = _avg_trace(C_hat).to(K_hat.dtype) * damping
        damp_C = _avg_trace(K_hat).to(C_hat.dtype) * damping
    if relative_damping:  # λ times the mean eigenvalue of each factor's term
        damp_K = damping * _relative(H_K, K_hat, coef_K)
        damp_C = damping * _relative(H_C, C_hat, coef_C)
    nu_K = H_K.scale(coef_K).add(K_hat.scale(damp_K)).add(K_hat.coord_identity(), alpha=-1.0)
    nu_C = H_C.scale(coef_C).add(C_hat.scale(damp_C)).add(C_hat.coord_identity(), alpha=-1.0)
    return nu_K.scale(half), nu_C.scale(half)


def _factor_update(
    factor: Structure, momentum: Structure | None, nu: Structure, *, lr: float, alpha: float,
    normalize: bool, retraction: str, trust_region: float | None,
) -> tuple[Structure, Structure | None]:
    """Engine step of one factor.

    ``normalize``: ``β = lr / max(1, max|α m + ν|)`` (MATH §3.3), then the engine's cap
    ``β_eff = min(β, c/‖m‖_∞)`` when ``trust_region = c`` is set.
    """
    m = momentum if momentum is not None else nu.zeros_like()
    beta: float | Tensor = lr
    if normalize:
        norm = m.scale(alpha).add(nu).max_abs()
        beta = lr / norm.to(torch.promote_types(norm.dtype, torch.float32)).clamp(min=1.0)
    new_factor, new_m = factor_step(
        factor, m, nu, lr=beta, alpha=alpha, retraction=retraction, trust_region=trust_region
    )
    return new_factor, (new_m if momentum is not None else None)


def update_preconditioner(
    state: FactorState, H_K: Structure, H_C: Structure, *, lr_cov: float, alpha1: float,
    damping: float, unscale: float = 1.0, kfac_like: bool = False,
    normalize_lr_cov: bool = False, retraction: str = "quadratic",
    trust_region: float | None = None, relative_damping: bool = False,
) -> FactorState:
    """One preconditioner update, MATH (3.2), through :func:`structvi.engine.factor_step`.

    Args:
        state: the layer's factors and momenta.
        H_K: ``Π̂_K(Kᵀ Ā K)`` (see :mod:`structvi.optim.kfac`).
        H_C: ``Π̂_C(Cᵀ Ḡ C)``.
        lr_cov: ``β₁``.
        alpha1: ``α₁`` (ignored by IKFAC).
        damping: ``λ``.
        unscale: ``u`` multiplying the ``H_C`` terms (GradScaler bookkeeping, MATH §3.7).
        kfac_like: IKFAC update (no trace coupling, no momenta).
        normalize_lr_cov: ``½ → ½(1−α₁)`` and ``β₁ → β₁ / max(1, max|m|)``.
        retraction: ``h`` of the factor step (``"first_order"`` is SINGD's ``K − β₁ K m``).
        trust_region: ``c`` of the step cap ``min(β₁, c/‖m‖_∞)`` (MATH §2.6); ``None``: no cap.
        relative_damping: ``λ`` relative to each statistic's mean eigenvalue (scale-free).

    Returns:
        The new :class:`FactorState`.
    """
    alpha = 0.0 if kfac_like else alpha1
    half = 0.5 * ((1.0 - alpha) if normalize_lr_cov else 1.0)
    if retraction == "quadratic" and not normalize_lr_cov and _all_dense(state, H_K, H_C):
        from structvi.optim._dense_update import dense_update  # (imports FactorState)

        return dense_update(state, H_K, H_C, lr=lr_cov, alpha=alpha, damping=damping,
                             unscale=unscale, kfac_like=kfac_like, half=half,
                             trust_region=trust_region, relative_damping=relative_damping)
    nu_K, nu_C = _directions(state, H_K, H_C, damping=damping, unscale=unscale,
                             kfac_like=kfac_like, half=half, relative_damping=relative_damping)
    opts = dict(lr=lr_cov, alpha=alpha, normalize=normalize_lr_cov, retraction=retraction,
                trust_region=trust_region)
    K, m_K = _factor_update(state.K, state.m_K, nu_K, **opts)
    C, m_C = _factor_update(state.C, state.m_C, nu_C, **opts)
    return FactorState(K, C, m_K, m_C)


def _all_dense(state: FactorState, H_K: Structure, H_C: Structure) -> bool:
    """Whether every factor, momentum and statistic is a dense matrix of one dtype and device."""
    parts = [p for p in (*state, H_K, H_C) if p is not None]
    first = parts[0].to_dense() if getattr(parts[0], "name", None) == "dense" else None
    return first is not None and all(
        getattr(p, "name", None) == "dense" and p.dtype == first.dtype
        and p.device == first.device for p in parts)


class SparseGram(NamedTuple):
    r"""``S Sᵀ = diag(w) + (\text{rows and columns } J)``, kept between factor updates.

    For factors whose rows outside an index set ``J`` are those of a diagonal (``diagonal``:
    ``J = ∅``; ``low_rank_diagonal``: the ``k`` dense rows; ``hierarchical``: the ``k₁ + k₂``
    dense rows), ``S Sᵀ`` is diagonal off the rows and columns ``J``: ``w`` is that diagonal
    (zero on ``J``) and ``rows = (S Sᵀ)[J, :]``. It holds ``d + |J|·d`` numbers, no more than the
    factor, and applies ``S Sᵀ`` to a ``d × n`` matrix in one diagonal scaling and two rank-``|J|``
    products instead of the factor's four block products and concatenations.
    """

    index: Tensor  # J, int64
    w: Tensor  # (d,)
    rows: Tensor  # (|J|, d)


def gram_product(S: Structure) -> SparseGram | None:
    """``S Sᵀ`` as a :class:`SparseGram` (structure API only), or ``None`` for other structures."""
    index = S.gram_rows()
    if index is None:
        return None
    w = S.gram_diagonal().clone()
    w[index] = 0
    unit = torch.zeros(S.dim, index.numel(), dtype=S.dtype, device=S.device)
    unit[index, torch.arange(index.numel(), device=S.device)] = 1
    rows = S.matmul(S.rmatmul(unit)).T.contiguous() if index.numel() else unit.T
    return SparseGram(index, w, rows)


def _gram_right(G: Tensor, P: SparseGram, overwrite: bool) -> Tensor:
    """``G (S Sᵀ)`` for ``G`` of shape ``(n, d)``, in ``G``'s memory when ``overwrite``."""
    if not P.index.numel():
        return G.mul_(P.w) if overwrite else G * P.w
    G_J, GP = G.index_select(1, P.index), G @ P.rows.T  # before G is overwritten
    out = G.mul_(P.w) if overwrite else G * P.w
    return out.addmm_(G_J, P.rows).index_copy_(1, P.index, GP)


def _gram_left(P: SparseGram, X: Tensor, overwrite: bool) -> Tensor:
    """``(S Sᵀ) X`` for ``X`` of shape ``(d, n)``, in ``X``'s memory when ``overwrite``."""
    w = P.w[:, None]
    if not P.index.numel():
        return X.mul_(w) if overwrite else X * w
    X_J, PX = X.index_select(0, P.index), P.rows @ X
    out = X.mul_(w) if overwrite else X * w
    return out.addmm_(P.rows.T, X_J).index_copy_(0, P.index, PX)


def precondition(G: Tensor, K: Structure, C: Structure, KKt: Tensor | SparseGram | None = None,
                 CCt: Tensor | SparseGram | None = None, *, overwrite: bool = False) -> Tensor:
    """``C Cᵀ G K Kᵀ`` for a gradient matrix ``G`` of shape ``(d_C, d_K)``.

    Computed as ``(K (Kᵀ Gᵀ))ᵀ`` in ``K``'s dtype, then ``C (Cᵀ ·)`` in ``C``'s dtype, or with
    the products ``KKt = K Kᵀ``, ``CCt = C Cᵀ`` when given (dense matrices or
    :class:`SparseGram`, applied in place to intermediates); returned in ``G``'s dtype.
    ``overwrite``: ``G`` is a scratch copy that may hold the result.
    """
    if isinstance(KKt, SparseGram):
        G_K = _cast(G, KKt.w.dtype)
        right = _gram_right(G_K, KKt, overwrite or G_K is not G)
    elif KKt is not None:
        right = _cast(G, KKt.dtype) @ KKt
    else:
        dtype = K.dtype
        right = K.matmul(K.rmatmul(_cast(G.T, dtype))).T
    if isinstance(CCt, SparseGram):  # `right` is a new tensor: overwrite it
        return _cast(_gram_left(CCt, _cast(right, CCt.w.dtype), True), G.dtype)
    if CCt is not None:
        return _cast(CCt @ _cast(right, CCt.dtype), G.dtype)
    return _cast(C.matmul(C.rmatmul(_cast(right, C.dtype))), G.dtype)


def precondition_parts(grad_W: Tensor, grad_b: Tensor | None, KKt: Tensor, CCt: Tensor, *,
                       scale: float = 1.0, factor: float = 1.0, keep_dtype: bool = False
                       ) -> Tensor:
    """``C Cᵀ [∇W, ∇b] K Kᵀ · factor / scale`` for dense products, without forming
    ``[∇W, ∇b]``: ``∇W (KKᵀ)[:-1] + ∇b ⊗ (KKᵀ)[-1]`` (one product and a rank-one update), then
    ``CCᵀ ·``; computed in the products' dtypes and returned as a ``(d_C, d_K)`` matrix (conv
    weights flattened) in ``∇W``'s dtype, or in ``CCᵀ``'s with ``keep_dtype`` (no rounding of
    a float32 direction to a bf16 gradient's precision before a float32 momentum)."""
    G_W = _cast(grad_W.flatten(1), KKt.dtype)
    if grad_b is None:
        right = G_W @ KKt
    else:
        right = torch.addr(G_W @ KKt[:-1], _cast(grad_b, KKt.dtype), KKt[-1])
    coef = factor / scale
    if coef != 1.0:
        right.mul_(coef)
    direction = CCt @ _cast(right, CCt.dtype)
    return direction if keep_dtype else _cast(direction, grad_W.dtype)


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def dense_product(S: Structure) -> Tensor | None:
    """``S Sᵀ`` as a dense matrix when ``S`` already stores ``d²`` numbers, else ``None``.

    Preconditioning with it costs one product per side instead of two, at no more memory than
    the factor itself.
    """
    if sum(t.numel() for t in S.tensors().values()) < S.dim**2:
        return None
    dense = S.to_dense()
    return dense @ dense.T


def momentum_step(
    param: Tensor, direction: Tensor, buffer: Tensor | None, *, lr: float, momentum: float,
    weight_decay: float,
) -> None:
    """In place: ``d ← Ĝ + γ W``; ``m ← α₂ m + d``; ``W ← W − β₂ m`` (MATH (3.3)).

    ``buffer`` (any float dtype) is ``None`` when ``momentum == 0``.
    """
    if weight_decay != 0.0:
        direction = direction.add(param, alpha=weight_decay)
    if buffer is not None:  # m ← d + α₂ m in one pass
        torch.add(_cast(direction, buffer.dtype), buffer, alpha=momentum, out=buffer)
        direction = buffer
    param.add_(_cast(direction, param.dtype), alpha=-lr)


def momentum_steps(
    params: list[Tensor], directions: list[Tensor], buffers: list[Tensor | None], *, lr: float,
    momentum: float, weight_decay: float,
) -> None:
    """:func:`momentum_step` for many parameters of one group, bit for bit, in a few fused
    (``torch._foreach_*``) calls for those whose parameter, direction and buffer share a dtype
    and device (one call per parameter otherwise). ``directions`` may be overwritten."""
    batches: dict[tuple, list[int]] = {}
    for i, (param, direction, buffer) in enumerate(zip(params, directions, buffers)):
        dtype, device = param.dtype, param.device
        if (direction.dtype is dtype and direction.device == device and (
                buffer is None or (buffer.dtype is dtype and buffer.device == device))):
            key = (dtype, device, buffer is None)
            batch = batches.get(key)
            if batch is None:
                batches[key] = [i]
            else:
                batch.append(i)
        else:
            momentum_step(param, direction, buffer, lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    for indices in batches.values():
        ps = [params[i] for i in indices]
        ds = [directions[i] for i in indices]
        if weight_decay != 0.0:
            ds = torch._foreach_add(ds, ps, alpha=weight_decay)
        if buffers[indices[0]] is not None:  # m ← d + α₂ m (as torch.add(d, m, alpha=α₂))
            bs = [buffers[i] for i in indices]
            torch._foreach_add_(ds, bs, alpha=momentum)
            torch._foreach_copy_(bs, ds)
            ds = bs
        torch._foreach_add_(ps, ds, alpha=-lr)


def diagonal_step(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *, lr: float,
    momentum: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    r"""In place, the rule for parameters outside ``Linear``/``Conv2d`` (AdamW; ``step`` ≥ 1).

    .. math::
        m &\leftarrow \alpha_2 m + (1-\alpha_2) g, \qquad v \leftarrow \beta v + (1-\beta) g^2 \\
        \theta &\leftarrow \theta(1 - \beta_2\gamma) - \beta_2\,
        \frac{m / (1-\alpha_2^t)}{\sqrt{v / (1-\beta^t)} + \epsilon}

    i.e. :class:`torch.optim.AdamW` with ``betas=(momentum, beta2)``: the diagonal empirical
    Fisher ``v`` preconditions the momentum.
    """
    g = grad.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1.0 - momentum)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias1, bias2 = 1.0 - momentum**step, 1.0 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias2**0.5).add_(eps)
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    param.addcdiv_(exp_avg.to(param.dtype), denom.to(param.dtype), value=-lr / bias1)


def schedule(value: float | Callable[[int], float], step: int, name: str = "lr_cov") -> float:
    """``value(step)`` for a schedule, else ``value`` (as a float).

    Raises:
        ValueError: the schedule returned something other than a finite number ``>= 0``.
    """
    result = value(step) if callable(value) else value
    try:
        number = float(result)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0.0) or isinstance(result, bool):
        source = f"the callable {name} returned {result!r} at step {step}" if callable(value) \
            else f"{name}={result!r}"
        raise ValueError(f"{name}: {source}; expected a finite number >= 0 (fix the schedule so "
                         "that it returns a non-negative float for every step)")
    return number


# ---------------------------------------------------------------------------------- acceptance
RUNNING_DECAY = 0.9  # decay of the running means of the outlier rule


class Screen(NamedTuple):
    """The verdict of :func:`screen` for one layer (or one diagonal-rule parameter) at one step.

    ``grad_factor`` multiplies the gradient, ``stat_factors`` the statistics ``(H_K, H_C)``,
    ``update_factors`` says whether the preconditioner takes its update (``False`` for a zero
    gradient), ``running`` are the new running means (``[‖G‖, tr H_K/d_K, tr H_C/d_C]``, or
    ``[‖g‖]`` for a diagonal-rule parameter; 0 = not yet seen) and ``clipped`` whether the outlier
    rule changed anything.
    """

    grad_factor: float = 1.0
    stat_factors: tuple[float, float] = (1.0, 1.0)
    update_factors: bool = True
    running: tuple[float, ...] = ()
    clipped: bool = False


def screen(grad_norm: float, running: tuple[float, ...], *, threshold: float | None,
           stats: tuple[float, float] | None = None, modified: float = 1.0,
           decay: float = RUNNING_DECAY) -> Screen:
    r"""The acceptance rule of one step for one layer, on magnitudes only (DESIGN decision 7).

    Called after the whole step was checked finite (a non-finite gradient or statistic anywhere
    skips the step with the state intact: the caller never gets here). With :math:`n = \|G\|_F`
    the layer's gradient norm at ``step()`` (GradScaler scale divided out), :math:`h_K, h_C` the
    average traces :math:`\operatorname{tr}(H)/d` of this period's statistics and
    :math:`\bar n, \bar h_K, \bar h_C` their running means over earlier accepted steps:

    1. **User changes of the gradient apply to the statistics.** ``modified`` is
       :math:`\rho = \|G_{\text{step}}\| / \|G_{\text{backward}}\|` (``scaler.unscale_``,
       ``clip_grad_norm_`` between backward and ``step()``); the gradient-side statistics are
       quadratic in the gradient, so :math:`H_C \leftarrow \rho^2 H_C`.
    2. **Zero gradient: no information.** :math:`n = 0` leaves the preconditioner and the running
       means as they are (a stretch of zero gradients would otherwise inflate ``K Kᵀ``, ``C Cᵀ``
       towards :math:`1/\lambda`).
    3. **Outliers are clipped relative to the running means** (``threshold`` :math:`\kappa`):
       :math:`G \leftarrow \min(1, \kappa\bar n/n)\,G` and, the statistics being quadratic in
       the gradient, :math:`H \leftarrow \min(1, \kappa^2\bar h/h)\,H` for each side; nothing
       is clipped before a running mean exists or with ``threshold=None``.
    4. The running means move towards the clipped values:
       :math:`\bar x \leftarrow \delta\bar x + (1-\delta)x` (:math:`\delta` = ``decay``), or
       :math:`\bar x = x` the first time.

    Args:
        grad_norm: :math:`n`.
        running: the running means (``(n̄,)`` or ``(n̄, h̄_K, h̄_C)``; 0 = none yet).
        threshold: :math:`\kappa > 1`, or ``None`` (no clipping; the means are still kept).
        stats: ``(h_K, h_C)`` on a step that updates the preconditioner, else ``None``.
        modified: :math:`\rho`.
        decay: :math:`\delta`.

    Returns:
        The :class:`Screen` verdict.
    """
    if grad_norm == 0.0:
        return Screen(1.0, (1.0, 1.0), False, tuple(running))
    rho2 = modified * modified
    values = [grad_norm] + ([] if stats is None else [stats[0], stats[1] * rho2])
    factors, new_running = [], list(running)
    for i, value in enumerate(values):
        mean = running[i]
        factor = 1.0
        bound = None if threshold is None else threshold * (threshold if i else 1.0)
        if bound is not None and mean > 0.0 and value > bound * mean:
            factor = bound * mean / value
        factors.append(factor)
        kept = value * factor
        new_running[i] = kept if mean <= 0.0 else decay * mean + (1.0 - decay) * kept
    clipped = any(f < 1.0 for f in factors)
    stat_factors = (1.0, 1.0) if stats is None else (factors[1], factors[2] * rho2)
    return Screen(factors[0], stat_factors, True, tuple(new_running), clipped)


def autocast_off(params: list[Tensor]) -> contextlib.ExitStack:
    """Disable autocast on the devices of ``params`` (the update runs in the state dtypes)."""
    stack = contextlib.ExitStack()
    for device_type in sorted({p.device.type for p in params} | {"cpu"}):
        if torch.is_autocast_enabled(device_type):  # nothing to turn off otherwise
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack
