"""structvi against Pyro's autoguides on Bayesian linear and logistic regression.

Problems (``benchmarks/_vi_problems.py``): diabetes linear regression (d = 11), synthetic linear
regression (d = 200, n = 1000), breast-cancer logistic regression (d = 31); prior ``N(0, I)``.

Rows: structvi ``dense`` / ``low_rank_diagonal`` (rank 4) / ``diagonal`` with the ``stein`` and
``hessian`` estimators at hand-set step sizes and with the public defaults (``config=None``,
``estimator="stein"``, 16 samples: per-structure factor step size, CG mean step), and Pyro's
``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal`` (rank 4) and ``AutoNormal``
trained by ``Trace_ELBO`` + Adam, best of a small learning-rate grid.

Columns. Linear regression: steps and seconds until the **excess KL**
``KL(q‖exact) − KL*_family`` drops below 0.1 and 0.01, where ``KL*_family`` is the smallest KL
the guide's family can reach (0 for dense; computed by L-BFGS over the family's parameters for
the others) — a diagonal q cannot reach KL(q‖exact) < 0.01 on a correlated posterior; the final
raw KL and the floor are listed too. Logistic regression: steps and seconds until the ELBO
(common-random-numbers estimate, 2048 draws, the same for every row) is within 0.5 nats of the
best ELBO reached by any row of the same family (dense: structvi dense + AutoMultivariateNormal;
diagonal: structvi diagonal + AutoNormal). Seconds count only the steps, not the
evaluations; they are CPU seconds of the process (``time.process_time``), which other processes
on a shared machine do not inflate. ``ms/step`` is the mean step CPU time. One intra-op thread
(``--threads``) for all rows.
Every method starts from ``N(0, 0.1² I)``. structvi linear rows stop once the excess KL is below
1e-3.

Run: ``python -m benchmarks.vi_vs_pyro [--quick]``; writes ``benchmarks/results/vi_vs_pyro.json``,
``.md`` and ``.png`` (the markdown table is also printed; quick: ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks._vi_problems import (
    CommonELBO, Problem, breast_cancer, diabetes, kl_to_exact, lowrank_cov_floor,
    structure_floor, synthetic,
)
from structvi.engine import NGDConfig
from structvi.fit import Fitter, TwoStage
from structvi.gaussian import StructuredGaussian

RANK = 4
INIT_SCALE = 0.1  # every method starts from N(0, 0.1² I) (Pyro's default init_scale)
STRUCTVI = [("dense", {}), ("low_rank_diagonal", {"rank": RANK}), ("diagonal", {})]
PYRO = ["AutoMultivariateNormal", "AutoLowRankMultivariateNormal", "AutoNormal"]
FAMILY = {"dense": "dense", "AutoMultivariateNormal": "dense", "diagonal": "diagonal",
          "AutoNormal": "diagonal", "low_rank_diagonal": "structvi low-rank precision",
          "AutoLowRankMultivariateNormal": "pyro low-rank covariance"}


SETTINGS = (
    "Settings. Every method starts from N(0, 0.1² I). structvi hessian rows: "
    "`NGDConfig(lr=1)`, 2 samples (logistic: `TwoStage(1, 10, 0.2, decay_steps=20)`, 4 samples). "
    "structvi stein rows: `TwoStage(1, 10, 1.0, decay_steps=10)` (lr = 1 for 10 steps, then "
    "10/t), 32 samples (64 at d = 200, 16 for logistic), mean step size 1 on the linear "
    "problems; sparse structures use heavy-ball momentum 0.9 on the mean. structvi defaults rows: "
    "`config=None`, `estimator=\"stein\"`, 16 samples (the per-structure factor step size and the "
    "CG mean step of `default_config`), as many steps as the stein rows. Every structvi row uses "
    "the default acceptance rule. Pyro: `Trace_ELBO` (1 "
    "particle), Adam, 2000 steps (quick: 500), best of the learning rates {0.005, 0.02, 0.08} "
    "(quick: {0.01, 0.04}; all in the JSON), evaluated every 10 steps. "
    "Excess KL = KL(q‖exact) − KL*_family; structvi linear rows stop below 1e-3."
)


@dataclass
class Trace:
    """One run: evaluation points (cumulative steps, step seconds, metric)."""

    method: str
    family: str
    settings: str
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)

    def add(self, step: int, seconds: float, value: float) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        self.metric.append(value)

    def first(self, ok: Callable[[float], bool]) -> tuple[int | None, float | None]:
        """(steps, seconds) at the first evaluation where ``ok(metric)``."""
        for s, t, v in zip(self.steps, self.seconds, self.metric):
            if ok(v):
                return s, t
        return None, None

    def ms_per_step(self) -> float:
        return 1e3 * self.seconds[-1] / max(self.steps[-1], 1)


# ---------------------------------------------------------------------- structvi
def structvi_config(problem: Problem, structure: str, estimator: str, quick: bool):
    """(config, num_samples, max_steps) for one structvi row (stated in the report).

    Sparse structures get heavy-ball momentum 0.9 on the mean (its step length comes from the
    fitter's line search): their preconditioner ``K Kᵀ`` leaves the mean step ill-conditioned.
    Stein rows on the linear problems keep the mean step at 1 (the antithetic mean gradient is
    exact there) and anneal the factor step harmonically. ``estimator="defaults"`` is
    ``config=None`` with the stein estimator and its default sample count.
    """
    heavy_ball = 0.0 if structure == "dense" else 0.9
    if estimator == "defaults":  # the public defaults: only the step budget is the stein rows'
        return None, None, structvi_config(problem, structure, "stein", quick)[2]
    if problem.kind == "logistic":
        if estimator == "hessian":
            return TwoStage(1.0, 10, 0.2, 20), 4, 150 if quick else 300
        return TwoStage(1.0, 10, 1.0, 10), 16, 150 if quick else 300
    big = problem.dim > 50
    if estimator == "hessian":
        return NGDConfig(lr=1.0, momentum_mean=heavy_ball), 2, (150 if quick else 400)
    base = NGDConfig(lr_mean=1.0, momentum_mean=heavy_ball)
    samples = 64 if big else 32
    steps = (500 if quick else 3000) if big else (200 if quick else 400)
    return TwoStage(1.0, 10, 1.0, 10, base), samples, steps


def run_structvi(problem: Problem, structure: str, opts: dict, estimator: str, metric, quick,
                 stop: Callable[[float], bool]) -> Trace:
    config, samples, max_steps = structvi_config(problem, structure, estimator, quick)
    q0 = StructuredGaussian.standard(problem.dim, structure, INIT_SCALE, dtype=torch.float64,
                                     **opts)
    fitter = Fitter(problem.log_joint, q0, config, num_samples=samples,
                    estimator="stein" if estimator == "defaults" else estimator,
                    generator=torch.Generator().manual_seed(0))
    label = "defaults (stein)" if estimator == "defaults" else estimator
    trace = Trace(f"structvi {structure} / {label}", FAMILY[structure],
                  f"num_samples={fitter.num_samples}, config={config!r}")
    elapsed = 0.0
    for step in range(1, max_steps + 1):
        t0 = time.process_time()
        fitter.step(monitor=False)
        elapsed += time.process_time() - t0
        q = fitter.q
        trace.add(step, elapsed, metric(q.loc, q.covariance_matrix))
        if stop(trace.metric[-1]):
            break
    return trace


# ---------------------------------------------------------------------- pyro
def pyro_posterior(guide: Any, name: str) -> tuple[Tensor, Tensor]:
    """Dense (mean, covariance) of a fitted Pyro autoguide."""
    with torch.no_grad():
        if name == "AutoNormal":
            return guide.locs.w.detach(), torch.diag(guide.scales.w.detach().square())
        post = guide.get_posterior()
        return post.loc.detach(), post.covariance_matrix.detach()


def run_pyro(problem: Problem, name: str, lr: float, steps: int, every: int, metric) -> Trace:
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO, autoguide

    def model() -> None:
        w = pyro.sample("w", dist.Normal(torch.zeros(problem.dim, dtype=torch.float64), 1.0)
                        .to_event(1))
        pyro.factor("loglik", problem.loglik(w[None])[0])

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    cls = getattr(autoguide, name)
    kwargs = {"rank": RANK} if name == "AutoLowRankMultivariateNormal" else {}
    guide = cls(model, init_scale=INIT_SCALE, **kwargs)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    trace = Trace(f"pyro {name}", FAMILY[name], f"Adam lr={lr}, Trace_ELBO (1 particle)")
    elapsed = 0.0
    for step in range(1, steps + 1):
        t0 = time.process_time()
        svi.step()
        elapsed += time.process_time() - t0
        if step % every == 0 or step == steps:
            trace.add(step, elapsed, metric(*pyro_posterior(guide, name)))
    return trace


# ---------------------------------------------------------------------- one problem
def floors(problem: Problem) -> dict[str, float]:
    """KL*_family for every family (linear problems)."""
    return {
        "dense": 0.0,
        "diagonal": structure_floor(problem, "diagonal"),
        "structvi low-rank precision": structure_floor(problem, "low_rank_diagonal", rank=RANK),
        "pyro low-rank covariance": lowrank_cov_floor(problem, RANK),
    }


def run_problem(problem: Problem, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """All rows for one problem; Pyro rows keep the best learning rate (all kept in ``runs``)."""
    lrs = [0.01, 0.04] if quick else [0.005, 0.02, 0.08]
    pyro_steps, every = (500, 10) if quick else (2000, 10)
    if problem.kind == "linear":
        floor = floors(problem)

        def metric_for(family: str):
            return lambda mean, cov: kl_to_exact(problem, mean, cov) - floor[family]

        def stop(v: float) -> bool:
            return v < 1e-3
    else:
        floor, crn = {}, CommonELBO(problem)

        def metric_for(family: str):
            return crn

        def stop(v: float) -> bool:
            return False
    traces: list[Trace] = []
    for structure, opts in STRUCTVI:
        for estimator in ("stein", "hessian", "defaults"):
            tr = run_structvi(problem, structure, opts, estimator, metric_for(FAMILY[structure]),
                              quick, stop)
            log(f"  {tr.method}: {len(tr.steps)} steps, {tr.seconds[-1]:.2f} s, "
                f"final {tr.metric[-1]:.4g}")
            traces.append(tr)
    runs: list[Trace] = []
    for name in PYRO:
        cands = [run_pyro(problem, name, lr, pyro_steps, every, metric_for(FAMILY[name]))
                 for lr in lrs]
        runs += cands
        key = (lambda t: -t.metric[-1]) if problem.kind == "linear" else (lambda t: t.metric[-1])
        best = max(cands, key=key)
        best.method += " (lr " + best.settings.split("lr=")[1].split(",")[0] + ")"
        log(f"  {best.method} ({best.settings}): final {best.metric[-1]:.4g}")
        traces.append(best)
    grid = [{"method": t.method, "settings": t.settings, "final": t.metric[-1]} for t in runs]
    return {"problem": problem.name, "kind": problem.kind, "floors": floor,
            "rows": [_compact(asdict(t)) for t in traces], "pyro_lr_grid": grid}


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    """Round a trace for the JSON file (6 significant digits)."""
    row["seconds"] = [float(f"{v:.6g}") for v in row["seconds"]]
    row["metric"] = [float(f"{v:.6g}") for v in row["metric"]]
    return row


# ---------------------------------------------------------------------- report
def _fmt(steps: int | None, seconds: float | None) -> str:
    return "—" if steps is None else f"{steps} / {seconds:.2f}s"


def final_value(row: dict[str, Any]) -> float:
    """Mean of the last five evaluations (smooths Monte-Carlo jitter of stochastic fits)."""
    tail = row["metric"][-5:]
    return sum(tail) / len(tail)


def table(result: dict[str, Any]) -> list[str]:
    rows = [Trace(**{k: r[k] for k in ("method", "family", "settings", "steps", "seconds",
                                        "metric")}) for r in result["rows"]]
    if result["kind"] == "linear":
        lines = ["| method | KL*_family | to excess KL < 0.1 | to excess KL < 0.01 | "
                 "final excess KL | final KL | ms/step |", "|---|---:|---:|---:|---:|---:|---:|"]
        for t in rows:
            floor = result["floors"][t.family]
            lines.append(
                f"| {t.method} | {floor:.4g} | {_fmt(*t.first(lambda v: v < 0.1))} | "
                f"{_fmt(*t.first(lambda v: v < 0.01))} | {t.metric[-1]:.3g} | "
                f"{t.metric[-1] + floor:.4g} | {t.ms_per_step():.2f} |")
        return lines
    best: dict[str, float] = {}
    for r in result["rows"]:
        best[r["family"]] = max(best.get(r["family"], -float("inf")), final_value(r))
    lines = ["| method | family best ELBO | to within 0.5 nats | final ELBO | ms/step |",
             "|---|---:|---:|---:|---:|"]
    for t, r in zip(rows, result["rows"]):
        target = best[t.family] - 0.5
        reached = _fmt(*t.first(lambda v: v >= target))
        lines.append(f"| {t.method} | {best[t.family]:.3f} | {reached} | {final_value(r):.3f} | "
                     f"{t.ms_per_step():.2f} |")
    return lines


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"# structvi vs Pyro autoguides ({'quick' if meta['quick'] else 'full'} run)", "",
           f"{meta['machine']}; torch {meta['torch']}, pyro {meta['pyro']}, "
           f"{meta['threads']} thread(s); total {meta['seconds']:.0f} s. Cells `steps / seconds`"
           " (CPU time of the steps only); `—` = not reached.", "", SETTINGS, ""]
    for res in results:
        out += [f"## {res['problem']}", ""] + table(res) + [""]
    return "\n".join(out)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    for ax, res in zip(axes, results):
        for r in res["rows"]:
            style = "-" if r["method"].startswith("structvi") else "--"
            y = r["metric"]
            if res["kind"] == "linear":
                y = [max(v, 1e-6) for v in y]
            ax.plot([max(s, 1e-4) for s in r["seconds"]], y, style, lw=1, label=r["method"])
        ax.set_xscale("log")
        if res["kind"] == "linear":
            ax.set_yscale("log")
            ax.set_ylabel("KL(q‖exact) − KL*_family")
        else:
            top = max(max(r["metric"]) for r in res["rows"])
            ax.set_ylim(top - 40, top + 2)
            ax.set_ylabel("ELBO (common random numbers)")
        ax.set_xlabel("CPU seconds (steps only)")
        ax.set_title(res["problem"])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="structvi vs Pyro autoguides")
    parser.add_argument("--quick", action="store_true", help="fewer steps and learning rates")
    parser.add_argument("--out", default=None,
                        help="output directory (default benchmarks/results, quick: .../quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = []
    for make in (diabetes, lambda: synthetic(200, 1000), breast_cancer):
        problem = make()
        print(f"{problem.name}", flush=True)
        results.append(run_problem(problem, args.quick, lambda s: print(s, flush=True)))
    import pyro

    meta = {"quick": args.quick, "threads": args.threads, "torch": torch.__version__,
            "pyro": pyro.__version__, "machine": f"{platform.machine()} "
            f"{platform.processor() or platform.platform()}",
            "seconds": time.perf_counter() - start}
    out = Path(args.out or ("benchmarks/results/quick" if args.quick else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vi_vs_pyro.json").write_text(json.dumps({"meta": meta, "results": results}))
    text = markdown(results, meta)
    (out / "vi_vs_pyro.md").write_text(text + "\n")
    plot(results, out / "vi_vs_pyro.png")
    print(text)
    return results


if __name__ == "__main__":
    main()
