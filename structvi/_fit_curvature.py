r"""The curvature of the CG mean step: the Hessian at the mean, formed once and reused.

The default mean step (:mod:`structvi.engine.mean_solver`) solves ``Ē v = m_μ`` by conjugate
gradients with Hessian-vector products of ``f = −log_joint`` at the mean. Each product is a
backward pass through the double-backward graph; for a small model with a sequential time loop
(GARCH(1,1): 150 steps of scalar operations) one product costs more than the step's whole
16-sample gradient estimate, and the CG iterations were 80 % of a step.

:class:`MeanCurvature` makes them cheap without changing what the step converges to:

* **Explicit for small ``d``.** For ``d ≤ max_dim`` the Hessian ``H = ∇²f(μ)`` is formed by one
  batched backward pass (:func:`~structvi.engine.mean_solver.target_hessian`: all ``d`` products
  at once, about the cost of one product when the model's cost is per operation); CG then
  multiplies by the matrix. Where the graph cannot be batched it falls back to matrix-free
  products, for the rest of the fit.
* **Reused while the mean stays close.** ``H`` is kept for the next steps while the mean has
  moved less than ``reuse_radius`` in ``H``'s own metric, ``√|(μ − μ_H)ᵀ H (μ − μ_H)| ≤ ρ``
  (for a Gaussian posterior: ``ρ`` posterior standard deviations), and for at most ``max_age``
  steps. The Hessian is only the CG step's preconditioner: a stationary mean solves
  ``E_q[∇f] = 0`` whichever positive-definite ``H`` is used, so reuse changes the path, never the
  answer. Early in a fit the mean moves several standard deviations per step and ``H`` is formed
  at every step; near the optimum it is formed every ``max_age`` steps.

The cached matrix and where it was formed are part of :meth:`structvi.fit.Fitter.state_dict`, so
a resumed fit continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from structvi.engine.mean_solver import accumulation_dtype, target_hessian, target_hvp

__all__ = ["EXPLICIT_MAX_DIM", "MAX_AGE", "REUSE_RADIUS", "MeanCurvature"]

#: Largest latent dimension whose Hessian is formed explicitly (one batched backward pass).
EXPLICIT_MAX_DIM = 64
#: Reuse the Hessian while the mean moved at most this far in its metric (posterior sds).
REUSE_RADIUS = 0.5
#: Form the Hessian again after this many steps at the latest.
MAX_AGE = 20

HVP = Callable[[Tensor], Tensor]


class MeanCurvature:
    """Hessian-vector products of ``−log_joint`` at the mean for the CG mean step (module doc).

    Args:
        max_dim: form the Hessian explicitly for ``d ≤ max_dim`` (``0``: always matrix-free,
            a fresh graph at every step, as before).
        reuse_radius: ``ρ``; reuse an explicit Hessian while ``√|ΔμᵀHΔμ| ≤ ρ`` (``0``: never).
        max_age: the most steps one explicit Hessian serves (>= 1).
    """

    def __init__(self, max_dim: int = EXPLICIT_MAX_DIM, reuse_radius: float = REUSE_RADIUS,
                 max_age: int = MAX_AGE) -> None:
        self.max_dim, self.reuse_radius, self.max_age = max_dim, reuse_radius, max_age
        self.matrix: Tensor | None = None  # H[k] = H e_k, in the accumulation dtype
        self.loc: Tensor | None = None  # where it was formed
        self.age = 0  # steps it has served
        self.batchable = True  # False after a graph that could not be batched
        self.formed = 0  # Hessians formed (explicitly) so far: a diagnostic

    def operator(self, log_joint: Callable[[Tensor], Tensor], loc: Tensor, point_dtype: torch.dtype,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> HVP:
        """``v ↦ ∇²(−log_joint)(μ) v`` for this step (the cached matrix, a new one, or a fresh
        matrix-free graph).

        Args:
            log_joint: ``(n, d) → (n,)`` in ``point_dtype``.
            loc: the mean ``μ``.
            point_dtype: the dtype ``log_joint`` takes; the products run in float32 or wider.
            reduce: data parallel: ``Σ_r w_r`` of the ranks' values (flattened), or ``None``.
        """
        acc = accumulation_dtype(loc.dtype)
        mu = loc.detach().to(acc)
        if self._reusable(mu):
            self.age += 1
            return self._product(self.matrix)

        def f(Z: Tensor) -> Tensor:
            return log_joint(Z.to(point_dtype)).to(Z.dtype)

        if self.batchable and mu.shape[0] <= self.max_dim:
            H, hvp = target_hessian(f, mu[None])
            if H is not None:
                if reduce is not None:
                    H = reduce(H).reshape(H.shape).to(H.dtype)
                self.formed += 1
                if bool(torch.isfinite(H).all()):
                    self.matrix, self.loc, self.age = H, mu.clone(), 1
                else:  # used once (CG falls back to the plain step), never reused
                    self.matrix, self.loc = None, None
                return self._product(H)
            self.batchable = False
        else:
            hvp = target_hvp(f, mu[None])
        self.matrix, self.loc = None, None
        if reduce is None:
            return hvp
        return lambda v: reduce(hvp(v)).reshape(v.shape).to(v.dtype)

    def _reusable(self, mu: Tensor) -> bool:
        H = self.matrix
        if H is None or self.loc is None or self.age >= self.max_age or self.reuse_radius <= 0:
            return False
        if H.shape[0] != mu.shape[0] or H.dtype != mu.dtype:
            return False
        delta = mu - self.loc
        return float((delta @ H @ delta).abs()) <= self.reuse_radius**2

    @staticmethod
    def _product(H: Tensor) -> HVP:
        return lambda v: (v.to(H.dtype) @ H).to(v.dtype)

    def reset(self) -> None:
        """Forget the cached Hessian (the next step forms a new one)."""
        self.matrix, self.loc, self.age = None, None, 0

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any] | None:
        """The cached Hessian (tensors and an int), or ``None`` when there is none."""
        if self.matrix is None or self.loc is None:
            return None
        return {"matrix": self.matrix.clone(), "loc": self.loc.clone(), "age": self.age}

    @staticmethod
    def check_state(sd: Any, dim: int) -> dict[str, Any] | None:
        """Validate :meth:`state_dict` output for a ``dim``-dimensional fit (``None`` passes)."""
        if sd is None:
            return None
        ok = (isinstance(sd, dict) and isinstance(sd.get("matrix"), Tensor)
              and isinstance(sd.get("loc"), Tensor) and isinstance(sd.get("age"), int)
              and sd["matrix"].shape == (dim, dim) and sd["loc"].shape == (dim,)
              and sd["age"] >= 0)
        if not ok:
            raise ValueError(f"state_dict mean_curvature must be None or a dict with a ({dim}, "
                             f"{dim}) 'matrix', a ({dim},) 'loc' and an int 'age' >= 0 "
                             f"(MeanCurvature.state_dict() output), got {sd!r}")
        return sd

    def load(self, sd: dict[str, Any] | None) -> None:
        """Install checked :meth:`state_dict` output."""
        if sd is None:
            self.reset()
        else:
            self.matrix, self.loc, self.age = sd["matrix"].clone(), sd["loc"].clone(), sd["age"]
