"""Dense-factor fast path of :func:`structvi.optim.functional.update_preconditioner`.

When the factors, their momenta and the statistics of a layer are all dense matrices (one dtype
and device) and the retraction is quadratic (without ``normalize_lr_cov``), the update is the
same maths as the structure path (:func:`~structvi.optim.functional._directions`, then
:func:`structvi.engine.factor_step`) in plain matrix operations: a factor update of a small layer
is otherwise dominated by the structure objects' per-operation overhead. On a GPU it is the
structure path's operations, bit for bit (scalar coefficients stay on the device: no host
synchronization); on the CPU, where reading a number costs nothing, the scalar coefficients
(traces, the trust-region cap) are combined on the host and each matrix term is one fused
operation: the same maths to rounding, with about half the operations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structvi.optim.functional import FactorState
from structvi.structures.base import Structure

__all__ = ["dense_update"]

# CPU factors: scalar coefficients on the host (tests switch it off to compare with the
# device path, which is the structure path bit for bit)
HOST_SCALARS = True


def _dense_directions(K: Tensor, C: Tensor, H_K: Tensor, H_C: Tensor, *, damping: float,
                      unscale: float, kfac_like: bool, half: float, relative_damping: bool
                      ) -> tuple[Tensor, Tensor]:
    """:func:`_directions` on dense matrices: the same operations without structure objects."""
    K_hat, C_hat = K.T @ K, C.T @ C
    K_hat, C_hat = 0.5 * (K_hat + K_hat.T), 0.5 * (C_hat + C_hat.T)  # Π̂ = sym
    d_K, d_C = K.shape[0], C.shape[0]
    if kfac_like:
        coef_K, coef_C, damp_K, damp_C = 1.0, unscale, damping, damping
    else:
        coef_K = (H_C.diagonal().sum() / d_C) * unscale
        coef_C = (H_K.diagonal().sum() / d_K) * unscale
        damp_K = (C_hat.diagonal().sum() / d_C) * damping
        damp_C = (K_hat.diagonal().sum() / d_K) * damping
    if relative_damping:
        tiny = torch.finfo(K_hat.dtype).tiny
        damp_K = damping * (H_K.diagonal().sum() / K_hat.diagonal().sum().clamp(min=tiny)
                            * coef_K)
        damp_C = damping * (H_C.diagonal().sum() / C_hat.diagonal().sum().clamp(min=tiny)
                            * coef_C)
    out = []
    for H, hat, coef, damp in ((H_K, K_hat, coef_K, damp_K), (H_C, C_hat, coef_C, damp_C)):
        nu = H * coef + hat * damp
        nu.diagonal().sub_(1.0)  # − I
        out.append(nu * half)
    return out[0], out[1]


def _dense_factor_step(factor: Tensor, m: Tensor, nu: Tensor, *, lr: float, alpha: float,
                       trust_region: float | None) -> tuple[Tensor, Tensor]:
    """:func:`structvi.engine.factor_step` with the quadratic retraction on dense matrices."""
    m = m * alpha + nu
    beta: float | Tensor = lr
    if trust_region is not None:
        dt = torch.promote_types(m.dtype, torch.float32)
        norm = m.abs().sum(-1).max().to(dt)  # ‖m‖_∞, the largest absolute row sum
        cap = (trust_region / (torch.as_tensor(lr, dtype=dt, device=norm.device) * norm)
               ).clamp(max=1.0)
        beta = lr * cap.nan_to_num(nan=1.0)
    step = m * (-beta if isinstance(beta, float) else -beta.to(factor.dtype))
    return _retract(factor, step), m


def _retract(factor: Tensor, step: Tensor) -> Tensor:
    """The quadratic retraction ``K (I + M + ½M²)`` of :meth:`Dense.retract` (``M = step``)."""
    if factor.dtype in (torch.float32, torch.float64) and step.dtype == factor.dtype:
        KM = factor @ step  # K + KM + ½(KM)M, as Dense.retract
        return torch.addmm(factor + KM, KM, step, alpha=0.5)
    h = step.clone()
    h.diagonal().add_(1.0)
    h.add_(0.5 * (step @ step))  # (I + M) + ½M², in the order of the structure path
    return factor @ h


def _host_directions(K: Tensor, C: Tensor, H_K: Tensor, H_C: Tensor, *, damping: float,
                     unscale: float, kfac_like: bool, half: float, relative_damping: bool
                     ) -> tuple[Tensor, Tensor]:
    """:func:`_dense_directions` with the scalar coefficients combined on the host (CPU)."""
    K_hat, C_hat = K.T @ K, C.T @ C
    K_hat, C_hat = (K_hat + K_hat.T).mul_(0.5), (C_hat + C_hat.T).mul_(0.5)  # Π̂ = sym
    d_K, d_C = K.shape[0], C.shape[0]
    tr_HK, tr_HC, tr_Kh, tr_Ch = torch.stack(
        [H_K.trace(), H_C.trace(), K_hat.trace(), C_hat.trace()]).tolist()
    if kfac_like:
        coef_K, coef_C, damp_K, damp_C = 1.0, unscale, damping, damping
    else:
        coef_K, coef_C = tr_HC / d_C * unscale, tr_HK / d_K * unscale
        damp_K, damp_C = tr_Ch / d_C * damping, tr_Kh / d_K * damping
    if relative_damping:
        tiny = torch.finfo(K_hat.dtype).tiny
        damp_K = damping * (tr_HK / max(tr_Kh, tiny) * coef_K)
        damp_C = damping * (tr_HC / max(tr_Ch, tiny) * coef_C)
    out = []
    for H, hat, coef, damp in ((H_K, K_hat, coef_K, damp_K), (H_C, C_hat, coef_C, damp_C)):
        nu = torch.add(H * (coef * half), hat, alpha=damp * half)
        nu.diagonal().sub_(half)  # ½(coef H + damp Ŝ − I)
        out.append(nu)
    return out[0], out[1]


def _host_factor_step(factor: Tensor, m: Tensor, nu: Tensor, *, lr: float, alpha: float,
                      trust_region: float | None) -> tuple[Tensor, Tensor]:
    """:func:`_dense_factor_step` with the trust-region cap computed on the host (CPU)."""
    m = torch.add(nu, m, alpha=alpha)  # α m + ν
    beta = lr
    if trust_region is not None:
        scaled = lr * m.abs().sum(-1).max().item()  # β ‖m‖_∞ (largest absolute row sum)
        if scaled != 0.0 and not math.isnan(scaled):  # 0 or NaN: no cap needed (as 0/0 → 1)
            beta = lr * min(1.0, trust_region / scaled)
    return _retract(factor, m * -beta), m


def dense_update(state: FactorState, H_K: Structure, H_C: Structure, *, lr: float,
                  alpha: float, damping: float, unscale: float, kfac_like: bool, half: float,
                  trust_region: float | None, relative_damping: bool) -> FactorState:
    """:func:`update_preconditioner` for dense factors, momenta and statistics (quadratic
    retraction, no ``normalize_lr_cov``): the same maths in plain matrix operations, without the
    structure objects' per-operation overhead (a factor update of a small layer is dominated by
    it)."""
    K, C = state.K.to_dense(), state.C.to_dense()
    host = HOST_SCALARS and K.device.type == "cpu"
    directions = _host_directions if host else _dense_directions
    factor_step = _host_factor_step if host else _dense_factor_step
    nu_K, nu_C = directions(K, C, H_K.to_dense(), H_C.to_dense(), damping=damping,
                            unscale=unscale, kfac_like=kfac_like, half=half,
                            relative_damping=relative_damping)
    new = []
    for factor, m, nu in ((state.K, state.m_K, nu_K), (state.C, state.m_C, nu_C)):
        m_t = m.to_dense() if m is not None else torch.zeros_like(nu)
        new_factor, new_m = factor_step(factor.to_dense(), m_t, nu, lr=lr, alpha=alpha,
                                        trust_region=trust_region)
        new += [factor.from_dense(new_factor), m.from_dense(new_m) if m is not None else None]
    return FactorState(new[0], new[2], new[1], new[3])
