r"""The VI step rule: when a proposed engine step is accepted (DESIGN decision 7, VI side).

One place decides, for :class:`structvi.fit.Fitter` (and through it ``fit`` and Pyro's
``NaturalGradientSVI``), whether a proposed step is taken. The rule, with ``ε_s`` the kept draws
of the step's estimate, ``q = N(μ, KKᵀ)`` the current and ``q' = N(μ', K'K'ᵀ)`` the proposed
distribution:

1. **Proposal.** ``q'`` is :func:`structvi.engine.step` with the step sizes ``lr``, ``lr_mean``
   and the trust radius ``c`` all multiplied by the current *step scale* ``s ∈ (0, 1]``.
2. **Common-random-number ELBO change.** With ``z_s = μ + Kε_s``, ``z'_s = μ' + K'ε_s``,

   .. math:: \widehat{\Delta L} = \operatorname{mean}_s\,[\log p(z'_s) - \log p(z_s)]
             + \tau \log|\det h(M)|,

   where ``K' = K h(M)`` is the retraction the engine took, so ``log|det h(M)|`` is the exact
   entropy change. It is computed by matrix products only (:func:`logdet_retraction`).
3. **Acceptance.** Accept iff every ``log p(z'_s)`` is finite and
   ``ΔL̂ ≥ −(tolerance + min(2·se, 10·tolerance + spread))``, with ``se`` the standard error of
   the per-sample differences and ``spread`` the standard deviation of ``log p(z_s)``: a clear
   decrease (beyond two standard errors of the comparison) is rejected, and so is any decrease
   larger than ``11·tolerance + spread`` whatever its noise (one sample at ``−10¹⁰⁰`` makes the
   standard error huge too).
4. **Backtracking.** A rejected proposal is retried from the same state and statistics with the
   step scale halved (mean and factor steps and the trust radius together), at most
   ``max_backtracks`` times. The scale that was accepted is kept for the next step and doubled
   (up to 1) after each step accepted at the first try. If every try is rejected the step
   *fails*: the state is unchanged.

Non-finite samples never reach this rule: the estimators drop them with their antithetic
partners (:mod:`structvi.estimators`); an estimate with no finite sample left is a failed step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

from structvi import engine
from structvi.engine import NGDConfig, NGDState
from structvi.structures import Structure

__all__ = ["Proposal", "StepRule", "logdet_retraction", "retraction_coordinates", "series_terms"]

_RADIUS = {"quadratic": math.sqrt(2.0), "first_order": 1.0}  # convergence radius of log h(x)
_MAX_TERMS = 400  # q < 0.9: the tail bound is below 1e-16·‖M‖_F² well before


@dataclass(frozen=True)
class StepRule:
    """Settings of the acceptance rule (module doc).

    Args:
        tolerance: nats a step may lose beyond the Monte-Carlo noise allowance (> 0).
        max_backtracks: halvings of the step scale before a step fails (>= 0).
        accept: ``True``: the common-random-number test (module doc; two ``log_joint`` calls
            per step, which must see the same data). ``"deferred"``: each step is judged at the
            next step's estimate and undone if that shows a clear loss
            (:mod:`structvi._fit_deferred`; one call per step, minibatch-safe, blind to small
            losses; ``max_backtracks`` bounds the halvings of the step scale). ``False``: no
            test (every finite proposal is taken).
    """

    tolerance: float = 1.0
    max_backtracks: int = 6
    accept: bool | str = True

    def __post_init__(self) -> None:
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"tolerance must be a finite number > 0, got tolerance={t!r}")
        b = self.max_backtracks
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ValueError(f"max_backtracks must be an integer >= 0, got max_backtracks={b!r}")
        if self.accept not in (True, False, "deferred") or isinstance(self.accept, (int, float)) \
                and not isinstance(self.accept, bool):
            raise ValueError(f"accept must be True, False or 'deferred', got "
                             f"accept={self.accept!r}")

    def allowance(self, diffs: Tensor, values: Tensor) -> float:
        """How many nats the CRN estimate may drop before the proposal is rejected."""
        n = diffs.shape[0]
        se = float(diffs.std() / math.sqrt(n)) if n > 1 else math.inf
        spread = float(values.std()) if values.shape[0] > 1 else 0.0
        return self._allowance(se, spread)

    def _allowance(self, se: float, spread: float) -> float:
        se = se if math.isfinite(se) else math.inf
        return self.tolerance + min(2.0 * se, 10.0 * self.tolerance + spread)

    def gain_and_allowance(self, diffs: Tensor, values: Tensor) -> tuple[float, float]:
        """``(mean(diffs), allowance)``, ``mean = −inf`` when a difference is not finite; one
        host transfer (the same numbers as :meth:`allowance`)."""
        n, m = diffs.shape[0], values.shape[0]
        one = diffs.new_ones(())
        stats = torch.stack([diffs.mean(), torch.isfinite(diffs).all().to(diffs.dtype),
                             diffs.std() / math.sqrt(n) if n > 1 else one,
                             values.std() if m > 1 else one]).tolist()
        mean, finite, se, spread = stats
        if not finite:
            return -math.inf, math.nan
        return mean, self._allowance(se if n > 1 else math.inf, spread if m > 1 else 0.0)


class Proposal(NamedTuple):
    """An accepted (or the last rejected) proposal.

    Attributes:
        state: the proposed engine state (work dtypes).
        logdet_change: ``log|det h(M)|`` of its factor step.
        gain: the CRN estimate ``ΔL̂`` (nats; ``-inf`` if a value was not finite).
        scale: the step scale it used.
        tries: proposals evaluated (1 = accepted at once).
        accepted: whether the rule accepted it.
    """

    state: NGDState | None
    logdet_change: float
    gain: float
    scale: float
    tries: int
    accepted: bool


def scaled_config(cfg: NGDConfig, scale: float) -> NGDConfig:
    """``cfg`` with ``lr``, ``lr_mean`` and the trust radius multiplied by ``scale``."""
    if scale == 1.0:
        return cfg
    tr = None if cfg.trust_region is None else cfg.trust_region * scale
    return cfg.replace(lr=cfg.lr * scale, lr_mean=cfg.beta_mean * scale, trust_region=tr)


def retraction_coordinates(new: NGDState, cfg: NGDConfig) -> Structure:
    """The coordinate ``M = −β_eff m_K`` of the engine's factor step ``K' = K h(M)``.

    ``β_eff = min(lr, c/‖m_K‖_∞)`` as in :func:`structvi.engine.factor_step`, recomputed from the
    new momentum ``m_K`` (the engine returns it).
    """
    m = new.factor_momentum
    beta = cfg.lr
    if cfg.trust_region is not None:
        norm = float(m.inf_norm())
        if norm * cfg.lr > cfg.trust_region:
            beta = cfg.trust_region / norm
    return m.to(torch.float64 if m.dtype == torch.float64 else torch.float32).scale(-beta)


@lru_cache(maxsize=4)
def _log_series(retraction: str, terms: int) -> tuple[float, ...]:
    """Taylor coefficients ``c_1..c_terms`` of ``log h(x)`` for ``h(x) = 1 + a₁x + a₂x²``.

    From ``h·(log h)' = h'``: with ``b_j = (j+1) c_{j+1}``,
    ``b_j + a₁ b_{j−1} + a₂ b_{j−2} = [j=0] a₁ + [j=1] 2a₂``.
    """
    a1, a2 = 1.0, (0.5 if retraction == "quadratic" else 0.0)
    b: list[float] = []
    for j in range(terms):
        rhs = a1 if j == 0 else (2 * a2 if j == 1 else 0.0)
        rhs -= (a1 * b[j - 1] if j >= 1 else 0.0) + (a2 * b[j - 2] if j >= 2 else 0.0)
        b.append(rhs)
    return tuple(bj / (j + 1) for j, bj in enumerate(b))


_LOGDET_TOL = 1e-11  # nats: the bound on the truncation error of one log|det h(M)|


def _coefficient_bound(retraction: str) -> tuple[float, float]:
    """``(a, R)`` with ``|c_k| ≤ (a/k)·R^{−k}`` for the Taylor coefficients of ``log h``.

    ``first_order``: ``log(1 + x) = Σ (−1)^{k+1} x^k / k``, so ``|c_k| = 1/k`` (``a = 1, R = 1``).
    ``quadratic``: ``h(x) = ½(x − r)(x − r̄)`` with ``r = −1 + i`` and ``|r|² = 2``, so
    ``log h(x) = log(1 − x/r) + log(1 − x/r̄)`` and ``c_k = −(2/k) Re(r^{−k})``:
    ``|c_k| ≤ (2/k)·2^{−k/2}`` (``a = 2, R = √2``).
    """
    return (2.0, math.sqrt(2.0)) if retraction == "quadratic" else (1.0, 1.0)


def series_terms(rho: float, fro2: float, retraction: str, tol: float) -> int | None:
    r"""The number ``K ≥ 1`` of series terms after which the tail of ``Σ_k c_k tr(M^k)`` is
    below ``tol``, given ``ρ ≥ ρ(M)`` (an upper bound on the spectral radius) and
    ``fro2 = ‖M‖_F²``; ``None`` when ``ρ ≥ 0.9 R``.

    For ``k ≥ 2``, ``|tr M^k| ≤ Σ|λ_i|^k ≤ ρ^{k−2} Σ|λ_i|² ≤ ρ^{k−2} ‖M‖_F²`` (Schur), so with
    ``|c_k| ≤ (a/k) R^{−k}`` and ``q = ρ/R``:

    .. math:: \Big|\sum_{k>K} c_k \operatorname{tr} M^k\Big|
              \le \frac{a\,\|M\|_F^2}{\rho^2}\sum_{k>K}\frac{q^k}{k}
              \le \frac{a\,\|M\|_F^2}{R^2}\,\frac{q^{K-1}}{(K+1)(1-q)}.
    """
    a, R = _coefficient_bound(retraction)
    if not (math.isfinite(rho) and math.isfinite(fro2)) or rho >= 0.9 * R:
        return None
    q = rho / R
    scale = a * fro2 / (R * R * (1.0 - q))
    K = 1
    while scale * q ** (K - 1) / (K + 1) > tol and K < _MAX_TERMS:
        K += 1
    return K


def _leaves(M: Structure, weight: float, out: list[tuple[Structure, float]]) -> None:
    """``log|det h(M)| = Σ weight_i · log|det h(M_i)|`` over the leaves ``M_i`` of ``M``: a
    Kronecker coordinate ``M₁ ⊗ I + I ⊗ M₂`` (retracted factor-wise) gives ``(M₁, d₂)`` and
    ``(M₂, d₁)``, a block-sites coordinate its sites (each retracted on its own)."""
    parts = getattr(M, "factors", None)
    if parts is not None and getattr(M, "kind", None) == "sum":
        d1, d2 = M.dims
        _leaves(parts[0], weight * d2, out)
        _leaves(parts[1], weight * d1, out)
        return
    blocks = getattr(M, "blocks", None)
    if isinstance(blocks, (list, tuple)) and all(isinstance(b, Structure) for b in blocks):
        for b in blocks:
            _leaves(b, weight, out)
        return
    out.append((M, weight))


def logdet_retraction(M: Structure, retraction: str = "quadratic",
                      tol: float = _LOGDET_TOL) -> float | None:
    r"""``log|det h(M)|`` by matrix products only: ``tr log h(M) = Σ_k c_k tr(M^k)``.

    ``"expm"``: exactly ``tr M``. ``"quadratic"`` / ``"first_order"``: the Taylor series of
    ``log h`` (convergence radius ``R = √2`` / ``1`` in the spectral radius ``ρ(M)``), summed
    to ``K`` terms with the rigorous tail bound of :func:`series_terms`,

    .. math:: \Big|\sum_{k>K} c_k \operatorname{tr} M^k\Big|
              \le \frac{a\,\|M\|_F^2}{R^2}\,\frac{q^{K-1}}{(K+1)(1-q)},\qquad
              q = \frac{\min(\|M\|_\infty, \|M\|_F)}{R},

    (``a = 2`` / ``1``; ``|tr M^k| ≤ ρ^{k−2}‖M‖_F²`` and ``|c_k| ≤ (a/k)R^{−k}``), below ``tol``
    nats in all (each leaf gets ``tol`` divided by the number of leaves and its weight). A
    Kronecker coordinate ``M₁ ⊗ I + I ⊗ M₂`` (retracted factor-wise) gives
    ``d₂ log|det h(M₁)| + d₁ log|det h(M₂)|``, and a block-sites coordinate the sum over its
    sites (each retracted on its own). The truncation error is at most ``tol``; the products
    themselves are computed in ``M``'s dtype.

    Returns:
        The value, or ``None`` when ``min(‖M‖_∞, ‖M‖_F)`` of a leaf is not below ``0.9 R``
        (only possible without a trust region or with ``trust_region ≥ 1.27``).
    """
    leaves: list[tuple[Structure, float]] = []
    _leaves(M, 1.0, leaves)
    if retraction == "expm":
        traces = torch.stack([m.trace() for m, _ in leaves]).tolist()
        return sum(w * t for (_, w), t in zip(leaves, traces))
    norms = torch.stack([x for m, _ in leaves
                         for x in (m.inf_norm(), m.gram_diagonal().sum())]).tolist()
    traces, weights = [], []
    leaf_tol = tol / len(leaves)
    coeffs = _log_series(retraction, _MAX_TERMS)
    for i, (m, w) in enumerate(leaves):
        inf, fro2 = norms[2 * i], norms[2 * i + 1]
        if fro2 == 0.0:
            continue
        terms = series_terms(min(inf, math.sqrt(fro2)), fro2, retraction, leaf_tol / w)
        if terms is None:
            return None
        traces.append(m.power_trace_tensor(terms))
        weights.extend(w * c for c in coeffs[:terms])
    if not traces:
        return 0.0
    t = torch.cat([x.to(traces[0].dtype) for x in traces]).to(torch.float64)
    return float(t @ torch.tensor(weights, dtype=torch.float64, device=t.device))


def propose(
    old: NGDState,
    stats: engine.NGDStats,
    cfg: NGDConfig,
    *,
    scale: float,
    rule: StepRule,
    values: Tensor,
    eps: Tensor,
    evaluate: object,
    temperature: float,
) -> Proposal:
    """Propose, test and backtrack (module doc, steps 1–4).

    Args:
        old: current state (work dtypes).
        stats: the step's statistics.
        cfg: the step's configuration before scaling.
        scale: the current step scale.
        rule: the :class:`StepRule`.
        values: ``log p(z_s)`` at the kept samples.
        eps: the kept draws ``ε_s``.
        evaluate: ``Z -> log p(Z)`` without gradients (values in the work dtype).
        temperature: ``τ``.

    Returns:
        The first accepted :class:`Proposal`, or the last rejected one.
    """
    last = Proposal(None, math.nan, -math.inf, scale, 0, False)
    for k in range(rule.max_backtracks + 1):
        s = scale * 0.5**k
        c = scaled_config(cfg, s)
        new = engine.step(old, stats, c)
        if not _is_finite_state(new):
            last = Proposal(None, math.nan, -math.inf, s, k + 1, False)
            continue
        logdet = logdet_retraction(retraction_coordinates(new, c), c.retraction)
        if logdet is None:  # outside the series' radius: exact fallback (monitoring-grade)
            logdet = float(new.factor.logabsdet().double() - old.factor.logabsdet().double())
        if rule.accept is not True:  # False, or "deferred" (judged at the next step)
            return Proposal(new, logdet, math.nan, s, k + 1, True)
        Z = new.loc + new.factor.matmul(eps.T.to(new.factor.dtype)).T.to(new.loc.dtype)
        mean, allowance = rule.gain_and_allowance(evaluate(Z) - values, values)
        gain = mean + temperature * logdet if math.isfinite(mean) else -math.inf
        accepted = math.isfinite(gain) and gain >= -allowance
        last = Proposal(new, logdet, gain, s, k + 1, accepted)
        if accepted:
            return last
    return last


def _is_finite_state(state: NGDState) -> bool:
    """Every entry of the mean, the factor and both momenta is finite (one check, one sync)."""
    tensors = [state.loc, state.loc_momentum, *state.factor._t.values(),
               *state.factor_momentum._t.values()]
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = t.dtype if t.dtype == dt else torch.promote_types(dt, t.dtype)
    flat = torch.cat([t.reshape(-1) if t.dtype == dt else t.reshape(-1).to(dt) for t in tensors])
    return bool(torch.isfinite(flat).all())
