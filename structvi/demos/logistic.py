"""Demo 1: Bayesian logistic regression, three structures against Pyro's autoguides.

Breast-cancer data (bundled, standardized, bias column: ``d = 31``), prior ``w ~ N(0, I)``,
``y_i ~ Bernoulli(sigmoid(x_iᵀ w))``. structvi fits ``dense``, ``low_rank_diagonal`` (rank 4)
and ``diagonal`` factors by natural-gradient VI (Stein estimator, gradients only); Pyro fits the
matching autoguides (``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal`` rank 4,
``AutoNormal``) with ``Adam`` and ``Trace_ELBO``. Every final posterior is scored by the same
Monte-Carlo ELBO (4096 draws, higher is better); the plot shows the ELBO against wall time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from structvi.data import load_breast_cancer
from structvi.demos._common import Clock, markdown_table, progress, pyplot, running_mean, save

STRUCTURES: list[tuple[str, dict[str, Any], str]] = [
    ("dense", {}, "AutoMultivariateNormal"),
    ("low_rank_diagonal", {"rank": 4}, "AutoLowRankMultivariateNormal"),
    ("diagonal", {}, "AutoNormal"),
]


def log_joint_fn(X: Tensor, y: Tensor):
    """``log p(w, y | X)`` for a batch of weights ``(n, d) → (n,)``."""

    def log_joint(W: Tensor) -> Tensor:
        logits = W @ X.T
        loglik = (y * logits - torch.nn.functional.softplus(logits)).sum(-1)
        return loglik - 0.5 * W.square().sum(-1) - log_norm

    log_norm = 0.5 * X.shape[1] * math.log(2 * math.pi)  # normalized prior: ELBOs comparable
    return log_joint


def pyro_model(X: Tensor, y: Tensor) -> None:
    """The same model in Pyro (vectorizable over particles: ``w @ Xᵀ``)."""
    import pyro
    import pyro.distributions as dist

    zero = torch.zeros(X.shape[1], dtype=X.dtype)
    w = pyro.sample("w", dist.Normal(zero, 1.0).to_event(1))
    pyro.sample("y", dist.Bernoulli(logits=w @ X.T).to_event(1), obs=y)


def run_structvi(log_joint, dim: int, name: str, options: dict, steps: int, show: bool
                 ) -> dict[str, Any]:
    """One structvi fit; ELBO trace against step time."""
    from structvi import StructuredGaussian, elbo, fit

    q0 = StructuredGaussian.standard(dim, name, dtype=torch.float64, **options)
    res = fit(log_joint, q0, steps, estimator="stein", num_samples=16, progress=show,
              generator=torch.Generator().manual_seed(0), early_stopping=None)
    final = elbo(log_joint, res.q, 4096, generator=torch.Generator().manual_seed(1))
    label = "structvi " + name + "".join(f" ({k}={v})" for k, v in options.items())
    return {"method": label, "elbo": float(final), "seconds": res.history["time"][-1],
            "steps": len(res.history["elbo"]), "time": list(res.history["time"]),
            "trace": list(res.history["elbo"])}


def run_pyro(X: Tensor, y: Tensor, guide_name: str, steps: int, lr: float, show: bool
             ) -> dict[str, Any]:
    """One Pyro autoguide trained by Adam; ELBO trace (one particle per step)."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO, autoguide

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    cls = getattr(autoguide, guide_name)
    kwargs = {"rank": 4} if guide_name == "AutoLowRankMultivariateNormal" else {}
    guide = cls(pyro_model, init_scale=0.1, **kwargs)
    svi = SVI(pyro_model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO(max_plate_nesting=0))
    clock, times, trace = Clock(), [], []
    for _ in progress(range(steps), f"Pyro {guide_name}", enabled=show):
        with clock:
            loss = svi.step(X, y)
        times.append(clock.seconds)
        trace.append(-loss)
    with torch.no_grad():
        final = -Trace_ELBO(num_particles=4096, vectorize_particles=True,
                             max_plate_nesting=0).loss(
            pyro_model, guide, X, y)
    return {"method": f"Pyro {guide_name} + Adam({lr})", "elbo": float(final),
            "seconds": clock.seconds, "steps": steps, "time": times, "trace": trace}


def plot(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """ELBO (running mean of 10 steps) against wall time, one line per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        style = "-" if r["method"].startswith("structvi") else "--"
        pairs = [(t, e) for t, e in zip(r["time"], running_mean(r["trace"], 10)) if t > 0]
        ax.plot(*zip(*pairs), style, lw=1.5, label=r["method"])
    best = max(r["elbo"] for r in rows)
    ax.set_ylim(best - 40, best + 5)
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s, log scale)")
    ax.set_ylabel("ELBO estimate (mean of 10 steps)")
    ax.set_title("Bayesian logistic regression, breast cancer (d = 31)")
    ax.legend(fontsize=7)
    return save(fig, out_dir, "logistic_regression.png")


def run(out_dir: Path, quick: bool = False, show: bool = True) -> dict[str, Any]:
    """Fit everything, print the table, save ``logistic_regression.png``."""
    X, y = load_breast_cancer()
    log_joint = log_joint_fn(X, y)
    steps, pyro_steps = (30, 100) if quick else (200, 2000)
    rows = [run_structvi(log_joint, X.shape[1], name, opts, steps, show)
            for name, opts, _ in STRUCTURES]
    rows += [run_pyro(X, y, guide, pyro_steps, 0.01, show) for _, _, guide in STRUCTURES]
    pyro_rows = [r for r in rows if r["method"].startswith("Pyro")]
    best = max(pyro_rows, key=lambda r: r["elbo"])
    table = markdown_table(
        ["method", "final ELBO", "seconds", "steps"],
        [(r["method"] + (" (Pyro's best)" if r is best else ""), f"{r['elbo']:.2f}",
          f"{r['seconds']:.2f}", r["steps"]) for r in rows])
    print(table)
    png = plot(rows, out_dir)
    return {"rows": rows, "table": table, "png": png}
