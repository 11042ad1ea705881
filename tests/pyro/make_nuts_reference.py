"""Compute and cache the NUTS reference posterior of the Bayesian logistic regression test.

Run once (a few minutes on 2 cores)::

    .venv/bin/python -m tests.pyro.make_nuts_reference

It writes ``tests/pyro/data/logistic_nuts.json``: per-coefficient posterior means and standard
deviations from Pyro's NUTS, with their Monte-Carlo standard errors, effective sample sizes and
R-hat, plus the Laplace approximation's gap to NUTS (the scale of the error any Gaussian
approximation makes on this posterior; ``tests/pyro/test_svi.py`` uses it for its tolerances).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

DATA_FILE = Path(__file__).parent / "data" / "logistic_nuts.json"
PRIOR_SCALE = 1.0


def load_data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's breast cancer data: standardized features with a leading column of ones."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    X = np.concatenate([np.ones((X.shape[0], 1)), X], axis=1)
    return torch.tensor(X, dtype=dtype), torch.tensor(y, dtype=dtype)


def model(X: torch.Tensor, y: torch.Tensor | None = None, subsample_size: int | None = None):
    """``β ~ N(0, PRIOR_SCALE² I)``, ``y_i ~ Bernoulli(sigmoid(x_iᵀβ))``; optional minibatches."""
    beta = pyro.sample(
        "beta", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), PRIOR_SCALE).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=subsample_size) as idx:
        logits = (X[idx] * beta).sum(-1)  # broadcasts over leading (particle) dims of beta
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=None if y is None else y[idx])


def potential(X: torch.Tensor, y: torch.Tensor):
    """``−log p(β, y)`` up to a constant, for NUTS and the Laplace approximation."""

    def u(beta: torch.Tensor) -> torch.Tensor:
        logits = X @ beta
        loglik = -torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        return -(loglik - 0.5 * (beta / PRIOR_SCALE).square().sum())

    return u


def laplace(X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode and covariance of the Laplace approximation (Newton's method)."""
    u = potential(X, y)
    beta = torch.zeros(X.shape[1], dtype=X.dtype)
    for _ in range(50):
        g = torch.autograd.functional.jacobian(u, beta)
        H = torch.autograd.functional.hessian(u, beta)
        beta = beta - torch.linalg.solve(H, g)
    H = torch.autograd.functional.hessian(u, beta)
    return beta, torch.linalg.inv(H)


def run_nuts(num_chains: int = 4, warmup: int = 500, num_samples: int = 1000, seed: int = 0):
    """NUTS draws of β, shape ``(chains, draws, d)``.

    NUTS runs on ``z`` with ``β = m + L z`` (``m``, ``L Lᵀ``: Laplace mode and covariance), an
    exact linear reparametrization (constant Jacobian) under which the posterior is close to
    isotropic, so the trees stay shallow; the draws are mapped back to ``β``.
    """
    from pyro.infer import MCMC, NUTS

    X, y = load_data()
    u = potential(X, y)
    mode, cov = laplace(X, y)
    L = torch.linalg.cholesky(cov)
    chains = []
    for c in range(num_chains):
        pyro.set_rng_seed(seed + c)
        kernel = NUTS(potential_fn=lambda p: u(mode + L @ p["z"]), jit_compile=True,
                      ignore_jit_warnings=True)
        init = {"z": 0.5 * torch.randn(mode.shape, dtype=mode.dtype)}
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, initial_params=init,
                    disable_progbar=True)
        mcmc.run()
        chains.append((mode + mcmc.get_samples()["z"] @ L.T).numpy())
    return np.stack(chains)


def main() -> None:
    import arviz as az

    t0 = time.time()
    draws = run_nuts()
    X, y = load_data()
    mode, cov = laplace(X, y)
    idata = az.from_dict(posterior={"beta": draws})
    summary = az.summary(idata, kind="all", round_to="none")
    flat = draws.reshape(-1, draws.shape[-1])
    mean, std = flat.mean(0), flat.std(0)
    out = {
        "description": "Bayesian logistic regression on sklearn breast_cancer (standardized "
                       "features + intercept), beta ~ N(0, 1); NUTS reference",
        "prior_scale": PRIOR_SCALE,
        "num_chains": int(draws.shape[0]), "num_draws": int(draws.shape[1]), "warmup": 500,
        "sampler": "NUTS on z, beta = laplace_mode + chol(laplace_cov) z",
        "pyro_version": pyro.__version__, "seconds": round(time.time() - t0, 1),
        "mean": mean.tolist(), "std": std.tolist(),
        "mcse_mean": summary["mcse_mean"].tolist(), "mcse_sd": summary["mcse_sd"].tolist(),
        "ess_bulk": summary["ess_bulk"].tolist(), "r_hat": summary["r_hat"].tolist(),
        "laplace_mean": mode.tolist(), "laplace_std": cov.diagonal().sqrt().tolist(),
    }
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    DATA_FILE.write_text(json.dumps(out, indent=1) + "\n")
    z_mean = np.abs(np.array(out["laplace_mean"]) - mean) / std
    r_std = np.abs(np.array(out["laplace_std"]) / std - 1)
    print(f"wrote {DATA_FILE} in {out['seconds']} s; max r_hat {max(out['r_hat']):.3f}, "
          f"min ess {min(out['ess_bulk']):.0f}; Laplace gap: max |Δmean|/sd {z_mean.max():.3f}, "
          f"max |sd ratio − 1| {r_std.max():.3f}")


if __name__ == "__main__":
    main()
