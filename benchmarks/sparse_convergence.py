"""Sparse structured-VI families on correlated posteriors: old vs new defaults, and Pyro + Adam.

Problems (float64, one latent vector ``z``):

* ``collinear``: linear regression with 24 predictors sharing one latent factor (correlation
  ≈ 0.9999) plus an intercept, N = 5000, unit noise, prior ``N(0, 5²)`` — posterior correlation
  condition number ≈ 2.5e5; Gaussian, so every family's optimum is a deterministic
  optimization of the closed-form ``KL(q‖p)``.
* ``ar5``: AR(5) time series (T = 300), latent ``(c, φ₁..φ₅, log σ)``, priors ``N(0, 1)``.
* ``loglog``: small-N log-log regression (N = 10), latent ``(a, b, log σ)``, ``a, b ~ N(0, 10²)``,
  a flat prior on ``σ`` (``log p(log σ) = log σ``).

Metric: **nats below the family optimum** — ``ELBO*_family − ELBO(q)``. For ``collinear`` both
are exact (``KL`` closed form). For the others both are evaluated on one fixed set of 4096
standard-normal draws (common random numbers) and ``ELBO*_family`` is the maximum of that
sample-average ELBO over the family's free parameters by L-BFGS (float64), so the gap of the
final ``q`` is exact up to the sampling of that shared objective. Families: structvi
``diagonal``, ``low_rank_diagonal`` (rank ``min(4, d − 1)``; low-rank *precision*), ``dense``;
Pyro ``AutoNormal`` (diagonal) and ``AutoLowRankMultivariateNormal`` (same rank, low-rank
*covariance*: its own family optimum).

Rows: structvi with the **old** defaults (``TwoStage(1, 10, 1, 10)``: mean steps share the
factor's ``10/t`` decay and are line-searched ``K Kᵀ g`` steps), the **new** defaults
(``config=None``: CG mean step, decoupled mean schedule, per-structure factor step), and, for
``diagonal``, ablations (decoupled mean schedule alone, plus heavy-ball momentum 0.5, and 5 CG
iterations); Pyro guides trained by ``Trace_ELBO`` + Adam, best of the learning rates
{0.01, 0.05} (quick: 0.05). Every method starts at ``N(0, 0.1² I)``, takes 1000 steps (quick:
300), structvi with the ``stein`` estimator and 16 samples. Wall seconds count only the steps;
the ratio column divides by Pyro AutoNormal's time on the same problem. One intra-op thread.

Run: ``python -m benchmarks.sparse_convergence [--quick]``; writes
``benchmarks/results/sparse_convergence.json`` and ``.md`` (quick: ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from structvi.engine import NGDConfig
from structvi.fit import Fitter, TwoStage
from structvi.gaussian import StructuredGaussian
from tests.test_sparse_convergence import collinear_regression

F64 = torch.float64
INIT_SCALE = 0.1
NUM_SAMPLES = 16
CRN_DRAWS = 4096


# ---------------------------------------------------------------------- problems
@dataclass
class Problem:
    """``log_joint: (n, d) → (n,)``; ``exact = (H, m)`` for a Gaussian target, else ``None``."""

    name: str
    dim: int
    log_joint: Callable[[Tensor], Tensor]
    exact: tuple[Tensor, Tensor] | None = None


def collinear(n: int = 5000, p: int = 24, noise: float = 0.01, seed: int = 0) -> Problem:
    """The collinear regression of tests/test_sparse_convergence.py (one definition)."""
    log_joint, H, m = collinear_regression(n, p, noise, seed)
    return Problem("collinear", p + 1, log_joint, (H, m))


def ar5(T: int = 300, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    phi = torch.tensor([0.5, -0.2, 0.15, 0.1, -0.1], dtype=F64)
    y = torch.zeros(T + 5, dtype=F64)
    for t in range(5, T + 5):
        y[t] = 0.3 + phi @ y[t - 5:t].flip(0) + 0.5 * torch.randn(1, generator=g, dtype=F64)
    lags = torch.stack([y[5 - k:T + 5 - k] for k in range(1, 6)], dim=1)  # (T, 5)
    target = y[5:]

    def log_joint(Z: Tensor) -> Tensor:
        c, ph, log_s = Z[:, 0], Z[:, 1:6], Z[:, 6]
        resid = target - c[:, None] - ph @ lags.T
        lik = -0.5 * (resid / log_s.exp()[:, None]).square().sum(-1) - T * log_s
        return lik - 0.5 * Z.square().sum(-1)

    return Problem("ar5", 7, log_joint)


def loglog(n: int = 10, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=F64) * 9 + 1
    ly = 0.5 + 1.2 * x.log() + 0.3 * torch.randn(n, generator=g, dtype=F64)
    lx = x.log()

    def log_joint(Z: Tensor) -> Tensor:
        a, b, log_s = Z[:, 0], Z[:, 1], Z[:, 2]
        resid = ly - a[:, None] - b[:, None] * lx
        lik = -0.5 * (resid / log_s.exp()[:, None]).square().sum(-1) - n * log_s
        return lik - 0.5 * (a.square() + b.square()) / 100.0 + log_s  # flat prior on σ

    return Problem("loglog", 3, log_joint)


# ---------------------------------------------------------------------- objective and optima
class Objective:
    """Negative ELBO of ``N(μ, L Lᵀ)`` up to the problem's constant (exact or common draws)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        g = torch.Generator().manual_seed(12345)
        half = torch.randn(CRN_DRAWS // 2, 2 * problem.dim, generator=g, dtype=F64)
        self.eps = torch.cat([half, -half])

    def __call__(self, mu: Tensor, L: Tensor) -> Tensor:
        """``L``: ``(d, k)`` with ``Σ = L Lᵀ`` (``k > d`` for low-rank-plus-diagonal ``[W, S]``)."""
        if L.shape[0] == L.shape[1]:
            logdet = torch.linalg.slogdet(L)[1]
        else:
            logdet = 0.5 * torch.linalg.slogdet(L @ L.T)[1]
        if self.problem.exact is not None:
            H, m = self.problem.exact
            r = mu - m
            return 0.5 * ((H * (L @ L.T)).sum() + r @ H @ r) - logdet
        return -self.problem.log_joint(mu + self.eps[:, :L.shape[1]] @ L.T).mean() - logdet


def _family_builder(family: str, d: int, rank: int) -> tuple[int, Callable[[Tensor], Tensor]]:
    """(number of factor parameters, parameters → dense factor ``L`` with ``Σ = L Lᵀ``)."""
    if family == "diagonal":
        return d, lambda p: torch.diag(p)
    if family == "dense":
        idx = torch.tril_indices(d, d)
        return idx.shape[1], lambda p: torch.zeros(d, d, dtype=F64).index_put((idx[0], idx[1]), p)
    if family == "low-rank precision":  # structvi low_rank_diagonal: [[A, B], [0, diag c]]
        def build(p: Tensor) -> Tensor:
            K = torch.zeros(d, d, dtype=F64)
            K[:rank, :] = p[: rank * d].reshape(rank, d)
            return K + torch.diag(torch.cat([torch.zeros(rank, dtype=F64), p[rank * d:]]))
        return rank * d + d - rank, build
    if family == "low-rank covariance":  # Pyro: Σ = W Wᵀ + diag(s²) = L Lᵀ, L = [W, diag s]
        def build_cov(p: Tensor) -> Tensor:
            return torch.cat([p[: rank * d].reshape(d, rank), torch.diag(p[rank * d:].exp())], 1)
        return rank * d + d, build_cov
    raise ValueError(family)


def family_optimum(objective: Objective, family: str, rank: int, mu0: Tensor,
                   L0: Tensor) -> float:
    """Minimal objective over the family by L-BFGS (float64), started from a fitted ``q``."""
    d = objective.problem.dim
    n, build = _family_builder(family, d, rank)
    # start: the fitted q's mean and a factor of the family with the fitted marginal scales
    scale = (L0 @ L0.T).diagonal().sqrt()
    if family != "low-rank covariance" and L0.shape[0] != L0.shape[1]:
        raise ValueError("only the low-rank covariance family has a non-square factor")
    if family == "diagonal":
        p0 = scale
    elif family == "dense":
        C = torch.linalg.cholesky(L0 @ L0.T)
        p0 = C[tuple(torch.tril_indices(d, d))]
    elif family == "low-rank precision":
        p0 = torch.cat([(scale[:rank, None] * torch.eye(rank, d, dtype=F64)).reshape(-1),
                        scale[rank:]])
    else:  # the fitted [W, diag s]
        p0 = torch.cat([L0[:, :rank].reshape(-1), L0[:, rank:].diagonal().log()])
    mu = mu0.clone().requires_grad_(True)
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([mu, p], max_iter=400, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=30, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective(mu, build(p))
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    with torch.no_grad():
        return float(objective(mu, build(p)))


# ---------------------------------------------------------------------- runs
def structvi_rows(d: int, rank: int) -> list[tuple[str, str, dict, Any]]:
    """(label, structure, options, config) for every structvi row."""
    old = TwoStage(1.0, 10, 1.0, 10)
    decoupled = TwoStage(1.0, 10, 1.0, 10, lr_mean=1.0, mean_decay_steps=100)
    rows = []
    for structure, opts in (("diagonal", {}), ("low_rank_diagonal", {"rank": rank}),
                            ("dense", {})):
        rows.append((f"structvi {structure}, old defaults", structure, opts, old))
        rows.append((f"structvi {structure}, new defaults", structure, opts, None))
    rows += [
        ("ablation diagonal: decoupled mean, no CG", "diagonal", {}, decoupled),
        ("ablation diagonal: decoupled mean + momentum 0.5", "diagonal", {},
         TwoStage(1.0, 10, 1.0, 10, NGDConfig(momentum_mean=0.5), lr_mean=1.0,
                  mean_decay_steps=100)),
        ("ablation diagonal: CG 5 iterations", "diagonal", {},
         TwoStage(1.0, 10, 1.0, 10, NGDConfig(mean_cg_iters=5), lr_mean=1.0,
                  mean_decay_steps=100)),
    ]
    return rows


FAMILY = {"diagonal": "diagonal", "low_rank_diagonal": "low-rank precision", "dense": "dense",
          "AutoNormal": "diagonal", "AutoLowRankMultivariateNormal": "low-rank covariance"}


def run_structvi(problem: Problem, structure: str, opts: dict, config: Any, steps: int):
    q0 = StructuredGaussian.standard(problem.dim, structure, INIT_SCALE, dtype=F64, **opts)
    fitter = Fitter(problem.log_joint, q0, config, num_samples=NUM_SAMPLES,
                    generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in range(steps):
        fitter.step(monitor=False)
    seconds = time.perf_counter() - t0
    q = fitter.q
    return q.loc.detach(), q.factor.to_dense().detach(), seconds, fitter.num_skipped


def run_pyro(problem: Problem, name: str, lr: float, rank: int, steps: int):
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO, autoguide

    wide = dist.Normal(torch.zeros(problem.dim, dtype=F64), 1e3).to_event(1)

    def model() -> None:
        z = pyro.sample("z", wide)
        pyro.factor("rest", problem.log_joint(z[None])[0] - wide.log_prob(z))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    kwargs = {"rank": rank} if name == "AutoLowRankMultivariateNormal" else {}
    guide = getattr(autoguide, name)(model, init_scale=INIT_SCALE, **kwargs)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            svi.step()
    except (ValueError, RuntimeError) as err:  # Pyro's own failure (NaN parameters): reported
        return None, str(err).splitlines()[0], time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        if name == "AutoNormal":
            mu, L = guide.locs.z.detach(), torch.diag(guide.scales.z.detach())
        else:
            post = guide.get_posterior()  # LowRankMultivariateNormal: Σ = W Wᵀ + diag(D)
            mu = post.loc.detach()
            L = torch.cat([post.cov_factor.detach(), torch.diag(post.cov_diag.detach().sqrt())], 1)
    return mu, L, seconds


def run_problem(problem: Problem, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    steps = 300 if quick else 1000
    lrs = [0.05] if quick else [0.01, 0.05]
    rank = min(4, problem.dim - 1)
    objective = Objective(problem)
    fits: list[dict[str, Any]] = []
    pyro_failures: list[dict[str, Any]] = []
    for label, structure, opts, config in structvi_rows(problem.dim, rank):
        mu, L, sec, skipped = run_structvi(problem, structure, opts, config, steps)
        fits.append({"method": label, "family": FAMILY[structure], "mu": mu, "L": L,
                     "seconds": sec, "skipped": skipped})
        log(f"  {label}: {sec:.2f} s")
    for name in ("AutoNormal", "AutoLowRankMultivariateNormal"):
        cands, failed = [], []
        for lr in lrs:
            mu, L, sec = run_pyro(problem, name, lr, rank, steps)
            if mu is None:
                failed.append(f"lr {lr}: {L}")
                continue
            value = float(objective(mu, L))
            cands.append((value if math.isfinite(value) else math.inf, lr, mu, L, sec))
        if not cands:
            log(f"  pyro {name}: failed at every lr ({failed})")
            pyro_failures.append({"method": f"pyro {name}", "errors": failed})
            continue
        value, lr, mu, L, sec = min(cands, key=lambda c: c[0])
        fits.append({"method": f"pyro {name} + Adam (lr {lr})", "family": FAMILY[name], "mu": mu,
                     "L": L, "seconds": sec, "skipped": 0, "failed_lrs": failed})
        log(f"  pyro {name}: lr {lr}, {sec:.2f} s" + (f" (failed: {failed})" if failed else ""))
    optimum: dict[str, float] = {}
    for fam in sorted({f["family"] for f in fits}):
        starts = [f for f in fits if f["family"] == fam]
        best = min(starts, key=lambda f: float(objective(f["mu"], f["L"])))
        optimum[fam] = min(family_optimum(objective, fam, rank, best["mu"], best["L"]),
                           min(float(objective(f["mu"], f["L"])) for f in starts))
    ref = next((f["seconds"] for f in fits if "AutoNormal" in f["method"]), math.nan)
    rows = []
    for f in fits:
        value = float(objective(f["mu"], f["L"]))
        rows.append({"method": f["method"], "family": f["family"],
                     "nats_below_optimum": value - optimum[f["family"]], "seconds": f["seconds"],
                     "time_ratio_vs_autonormal": f["seconds"] / ref,
                     "ms_per_step": 1e3 * f["seconds"] / steps, "skipped_steps": f["skipped"],
                     "failed_lrs": f.get("failed_lrs", [])})
    return {"problem": problem.name, "dim": problem.dim, "rank": rank, "steps": steps,
            "family_optimum_neg_elbo": optimum, "rows": rows, "pyro_failures": pyro_failures}


# ---------------------------------------------------------------------- report
def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"# Sparse families on correlated posteriors ({'quick' if meta['quick'] else 'full'} "
           "run)", "",
           f"{results[0]['steps']} steps each; structvi `stein`, {NUM_SAMPLES} samples; Pyro "
           "`Trace_ELBO` + Adam (best lr). Nats below the family optimum (exact for collinear, "
           f"common {CRN_DRAWS} draws otherwise); time ratio = wall seconds / Pyro AutoNormal's "
           f"on the same problem; {meta['threads']} thread(s).", ""]
    for res in results:
        out += [f"## {res['problem']} (d = {res['dim']}, rank {res['rank']})", "",
                "| method | family | nats below family optimum | ms/step | time ratio vs "
                "AutoNormal |", "|---|---|---:|---:|---:|"]
        for r in res["rows"]:
            note = f" (diverged at {', '.join(r['failed_lrs'])})" if r["failed_lrs"] else ""
            out.append(f"| {r['method']}{note} | {r['family']} | "
                       f"{r['nats_below_optimum']:.3g} | {r['ms_per_step']:.2f} | "
                       f"{r['time_ratio_vs_autonormal']:.2f} |")
        for fail in res["pyro_failures"]:
            out.append(f"| {fail['method']} (diverged at every lr: {'; '.join(fail['errors'])})"
                       " | | — | | |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="sparse VI families: old vs new defaults")
    parser.add_argument("--quick", action="store_true", help="300 steps, one Adam lr")
    parser.add_argument("--out", default="benchmarks/results", help="output directory")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out) / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for make in (collinear, ar5, loglog):
        problem = make()
        print(problem.name, flush=True)
        results.append(run_problem(problem, args.quick, lambda s: print(s, flush=True)))
    meta = {"quick": args.quick, "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    (out / "sparse_convergence.json").write_text(json.dumps({"meta": meta, "results": results},
                                                            indent=1))
    text = markdown(results, meta)
    (out / "sparse_convergence.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
