"""Fault sweep: does a VI run converge, stop with a reason, or go silently wrong?

Cases (models in ``tests/vi/models.py``), each over several seeds:

* ``poisson_bad_start``: Poisson regression (d = 2) started at ``(−3, −3)``, ``K = I``.
* ``garch_nan_region``: GARCH(1,1) whose likelihood is NaN where ``α + β > 1``; start
  ``(−2.3, −2, 1)``, scale 0.3, 64 samples per step.
* ``latent_gp``: latent-GP Poisson regression (d = 13), 64 samples per step.
* ``reparam_2_samples``: a condition-100 Gaussian (d = 6) with ``estimator="reparam"``, 2 samples.
* ``cauchy_hessian``: two Cauchy coordinates with ``estimator="hessian"``.
* ``bf16_long`` / ``fp16_long``: pure low precision (mean, factor and target) on a
  condition-1e4 Gaussian (d = 2), Stein with 4 samples, many steps.

Rows: structvi ``fit`` (dense factor, default settings otherwise) and, on the same log-joints and
starts, Pyro ``AutoMultivariateNormal`` and ``AutoNormal`` trained by ``Trace_ELBO`` + Adam
(lr 0.02; the log-joint enters as ``pyro.factor`` on an improper flat site).

Outcome of a run:

* **converged**: the run ended normally (structvi: ``"steps"``/``"plateau"``) and its final ELBO
  (2048 common draws, float64) is within ``TOL`` nats of the family's reference — the best final
  ELBO of any run of that family (dense: structvi + AutoMultivariateNormal; mean-field:
  AutoNormal + a structvi ``diagonal`` reference fit) — or, for the low-precision rows, its KL to
  the target is below 0.5 and no worse than after 100 steps.
* **stopped**: the run stopped with a reason (structvi ``"non_finite"``, ``"rejected"``,
  ``"diverged"``; an exception raised by Pyro). ``q_finite`` in the JSON says whether the ``q``
  left behind is usable (Pyro's parameters are often already NaN when it raises).
* **silently wrong**: everything else — an ordinary end with a bad or non-finite ``q``. For Pyro
  this includes runs that had simply not converged within the step budget: Adam has no
  convergence or failure signal, so a user cannot tell them apart.

ELBOs leave out draws where the log-joint is not finite (module function :func:`elbo64`).

Run: ``python -m benchmarks.fault_sweep [--quick]``; writes ``benchmarks/results/fault_sweep.json``
and ``.md`` (``--quick``: ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from structvi.fit import fit
from structvi.gaussian import StructuredGaussian
from structvi.structures import make_structure
from tests.vi import models

F64 = torch.float64
TOL = 2.0  # nats
PYRO_LR = 0.02


@dataclass
class Case:
    """One fault case: a log-joint, a start and the structvi settings."""

    name: str
    log_joint: Callable[[Tensor], Tensor]
    dim: int
    start: list[float]
    scale: float = 1.0
    fit_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 300
    pyro_steps: int = 1000


def cases(quick: bool) -> list[Case]:
    poisson, _ = models.poisson_regression()
    garch, _ = models.garch()
    gp, d_gp = models.latent_gp_poisson()
    cauchy, _ = models.cauchy()
    stiff, _, _ = models.stiff_gaussian(cond=1e2)
    s = 0.5 if quick else 1.0
    return [
        Case("poisson_bad_start", poisson, 2, [-3.0, -3.0], steps=300),
        Case("garch_nan_region", garch, 3, [-2.3, -2.0, 1.0], 0.3, {"num_samples": 64},
             steps=200, pyro_steps=int(600 * s)),
        Case("latent_gp", gp, d_gp, [0.0] * d_gp, 1.0, {"num_samples": 64},
             steps=100 if quick else 200, pyro_steps=int(600 * s)),
        Case("reparam_2_samples", stiff, 6, [0.0] * 6, 1.0,
             {"estimator": "reparam", "num_samples": 2}),
        Case("cauchy_hessian", cauchy, 2, [0.0, 0.0], 1.0, {"estimator": "hessian"}),
    ]


# ---------------------------------------------------------------------- ELBO, common draws
def elbo64(log_joint: Callable, loc: Tensor, L: Tensor, logdet: float, n: int = 2048) -> float:
    """ELBO of ``N(loc, L Lᵀ)`` from ``n`` fixed antithetic draws, in float64.

    Draws where ``log_joint`` is not finite (the GARCH model's NaN region, outside the support)
    are left out, with their partners, as long as at most half are; otherwise ``-inf``.
    """
    d = loc.shape[0]
    eps = torch.randn(n // 2, d, generator=torch.Generator().manual_seed(123), dtype=F64)
    eps = torch.cat([eps, -eps])
    if not (torch.isfinite(loc).all() and torch.isfinite(L).all() and math.isfinite(logdet)):
        return -math.inf
    with torch.no_grad():
        values = log_joint(loc.double() + eps @ L.double().T)
    ok = torch.isfinite(values)
    ok = torch.cat([ok[: n // 2] & ok[n // 2 :]] * 2)
    if int(ok.sum()) < n // 2:
        return -math.inf
    value = float(values[ok].mean()) + 0.5 * d * (1 + math.log(2 * math.pi)) + logdet
    return value if math.isfinite(value) else -math.inf


def structvi_elbo(log_joint: Callable, q: StructuredGaussian) -> float:
    K = q.factor.to(F64)
    if not all(bool(torch.isfinite(t).all()) for t in K.tensors().values()):
        return -math.inf
    return elbo64(log_joint, q.loc.double(), K.to_dense(), float(K.logabsdet()))


# ---------------------------------------------------------------------- runs
def run_structvi(case: Case, seed: int, structure: str = "dense") -> dict[str, Any]:
    q0 = StructuredGaussian.standard(case.dim, structure, dtype=F64, init_scale=case.scale)
    q0 = StructuredGaussian(torch.tensor(case.start, dtype=F64), q0.factor)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = fit(case.log_joint, q0, case.steps, generator=torch.Generator().manual_seed(seed),
                      progress=False, **case.fit_kwargs)
            reason, q = res.stopped_reason, res.q
        except Exception as err:  # noqa: BLE001 - recorded as a stop with a reason
            reason = f"error: {type(err).__name__}"
            q = err.fit_result.q if hasattr(err, "fit_result") else q0
    return {"method": f"structvi {structure}", "family": _family(structure), "seed": seed,
            "reason": reason, "elbo": structvi_elbo(case.log_joint, q),
            "seconds": time.perf_counter() - t0,
            "normal_end": reason in ("steps", "plateau")}


def _family(name: str) -> str:
    return "mean-field" if name in ("diagonal", "AutoNormal") else "dense"


def run_pyro(case: Case, seed: int, name: str) -> dict[str, Any]:
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO, autoguide
    from pyro.infer.autoguide.initialization import init_to_value

    def model() -> None:
        z = pyro.sample("z", dist.ImproperUniform(dist.constraints.real, (), (case.dim,)))
        pyro.factor("log_joint", case.log_joint(z[None])[0])

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    init = init_to_value(values={"z": torch.tensor(case.start, dtype=F64)})
    guide = getattr(autoguide, name)(model, init_loc_fn=init, init_scale=case.scale)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": PYRO_LR}), Trace_ELBO())
    t0 = time.perf_counter()
    reason = "steps"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for _ in range(case.pyro_steps):
                svi.step()
        except Exception as err:  # noqa: BLE001 - Pyro's own stop (e.g. a NaN parameter)
            reason = f"error: {type(err).__name__}"
    with torch.no_grad():
        if name == "AutoNormal":
            loc, scale = guide.locs.z.detach(), guide.scales.z.detach()
            L, logdet = torch.diag(scale), float(scale.abs().log().sum())
        else:
            loc, L = guide.loc.detach(), guide.scale_tril.detach()
            logdet = float(L.diagonal().abs().log().sum())
    return {"method": f"pyro {name}", "family": _family(name), "seed": seed, "reason": reason,
            "elbo": elbo64(case.log_joint, loc, L, logdet),
            "seconds": time.perf_counter() - t0, "normal_end": reason == "steps"}


def classify(runs: list[dict[str, Any]], reference: dict[str, float]) -> None:
    """Add ``outcome`` to every run (module doc)."""
    for r in runs:
        ok = math.isfinite(r["elbo"]) and r["elbo"] >= reference[r["family"]] - TOL
        r["q_finite"] = math.isfinite(r["elbo"])
        if r["normal_end"]:
            r["outcome"] = "converged" if ok else "silently wrong"
        else:
            r["outcome"] = "stopped"


def sweep_case(case: Case, seeds: int, log: Callable[[str], None]) -> dict[str, Any]:
    runs = []
    for seed in range(seeds):
        runs.append(run_structvi(case, seed))
        for name in ("AutoMultivariateNormal", "AutoNormal"):
            runs.append(run_pyro(case, seed, name))
    ref_diag = run_structvi(case, 0, "diagonal")
    reference = {
        fam: max([r["elbo"] for r in runs if r["family"] == fam]
                 + ([ref_diag["elbo"]] if fam == "mean-field" else []))
        for fam in ("dense", "mean-field")
    }
    classify(runs, reference)
    for r in runs:
        log(f"  {case.name:18s} {r['method']:30s} seed {r['seed']}: {r['outcome']:14s} "
            f"({r['reason']}, ELBO {r['elbo']:.4g}, ref {reference[r['family']]:.4g}, "
            f"{r['seconds']:.1f} s)")
    return {"case": case.name, "reference": reference, "runs": runs}


# ---------------------------------------------------------------------- low precision
def lowprec_runs(dtype: torch.dtype, steps: int, seeds: int) -> list[dict[str, Any]]:
    from torch.distributions import MultivariateNormal, kl_divergence

    log_joint, m, Lam = models.stiff_gaussian(d=2, cond=1e4)
    exact = MultivariateNormal(m, precision_matrix=Lam)
    out = []
    for seed in range(seeds):
        q0 = StructuredGaussian(torch.zeros(2, dtype=dtype), make_structure("dense", 2, dtype=dtype))
        kls: dict[int, float] = {}

        def callback(fitter: Any, record: Any) -> None:
            if record.iteration in (100, steps):
                q = fitter.q
                q64 = StructuredGaussian(q.loc.double(), q.factor.to(F64))
                kls[record.iteration] = float(kl_divergence(q64, exact))

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit(log_joint, q0, steps, estimator="stein", num_samples=4, progress=False,
                      generator=torch.Generator().manual_seed(seed), early_stopping=None,
                      callback=callback)
        final = kls.get(steps, math.nan)
        if res.stopped_reason != "steps":
            outcome = "stopped"
        else:
            good = final < 0.5 and final <= kls.get(100, math.inf) + 0.05
            outcome = "converged" if good else "silently wrong"
        out.append({"method": f"structvi dense ({str(dtype).replace('torch.', '')})",
                    "seed": seed, "reason": res.stopped_reason, "kl_100": kls.get(100),
                    "kl_final": final, "outcome": outcome,
                    "q_finite": bool(torch.isfinite(res.q.loc).all()),
                    "seconds": time.perf_counter() - t0})
    return out


# ---------------------------------------------------------------------- report
OUTCOMES = ("converged", "stopped", "silently wrong")


def counts(runs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for r in runs:
        row = table.setdefault(r["method"], dict.fromkeys((*OUTCOMES, "usable"), 0))
        row[r["outcome"]] += 1
        row["usable"] += r["outcome"] == "stopped" and r.get("q_finite", True)
    return table


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"# Fault sweep ({'quick' if meta['quick'] else 'full'} run)", "",
           f"{meta['seeds']} seeds per case; Pyro: Trace_ELBO + Adam (lr {PYRO_LR}). "
           f"converged = normal end within {TOL} nats of the family's best ELBO; stopped = a "
           "stop with a reason (an error counts; the 'usable q' column counts stops that left a "
           "finite q); silently wrong = a normal end with a bad q (for "
           "Pyro this includes runs not converged within the step budget: Adam gives no "
           "signal). ELBOs: 2048 common draws in float64, leaving out draws where the "
           "log-joint is not finite.", "",
           "| case | method | converged | stopped (usable q) | silently wrong |",
           "|---|---|---|---|---|"]
    for block in results["cases"] + results["lowprec"]:
        for method, row in counts(block["runs"]).items():
            out.append(f"| {block['case']} | {method} | {row['converged']} | {row['stopped']} "
                       f"({row['usable']}) | {row['silently wrong']} |")
    out += ["", "| method | converged | stopped (usable q) | silently wrong |", "|---|---|---|---|"]
    allruns = [r for b in results["cases"] + results["lowprec"] for r in b["runs"]]
    for method, row in counts(allruns).items():
        out.append(f"| {method} | {row['converged']} | {row['stopped']} ({row['usable']}) | "
                   f"{row['silently wrong']} |")
    out += ["", f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['seconds']:.0f} s."]
    return "\n".join(out) + "\n"


def report_only(out: Path) -> dict[str, Any]:
    """Re-classify the runs in ``out/fault_sweep.json`` and rewrite both files."""
    results = json.loads((out / "fault_sweep.json").read_text())
    for block in results["cases"]:
        classify(block["runs"], block["reference"])
    for block in results["lowprec"]:
        for r in block["runs"]:
            r.setdefault("q_finite", True)
            if r["reason"] != "steps":
                r["outcome"] = "stopped"
    (out / "fault_sweep.json").write_text(json.dumps(results, indent=1, default=float))
    text = markdown(results)
    (out / "fault_sweep.md").write_text(text)
    print(text)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="structvi fault sweep vs Pyro + Adam")
    parser.add_argument("--quick", action="store_true", help="2 seeds, shorter runs")
    parser.add_argument("--out", default="benchmarks/results", help="output directory")
    parser.add_argument("--report-only", action="store_true",
                        help="re-classify the saved JSON and rewrite the Markdown, no runs")
    args = parser.parse_args(argv)
    if args.report_only:
        return report_only(Path(args.out) / ("quick" if args.quick else ""))
    torch.set_num_threads(1)
    out = Path(args.out) / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    seeds = 2 if args.quick else 3
    t0 = time.perf_counter()
    results: dict[str, Any] = {"cases": [], "lowprec": []}
    for case in cases(args.quick):
        print(case.name, flush=True)
        n = min(seeds, 2) if case.name == "latent_gp" else seeds
        results["cases"].append(sweep_case(case, n, lambda s: print(s, flush=True)))
    steps = 300 if args.quick else 2000
    for dtype in (torch.bfloat16, torch.float16):
        name = f"{str(dtype).replace('torch.', '')}_long"
        runs = lowprec_runs(dtype, steps, 1 if args.quick else 2)
        for r in runs:
            print(f"  {name}: {r}", flush=True)
        results["lowprec"].append({"case": f"{name} ({steps} steps)", "runs": runs})
    results["meta"] = {"quick": args.quick, "seeds": seeds, "torch": torch.__version__,
                       "machine": platform.machine(), "seconds": time.perf_counter() - t0}
    (out / "fault_sweep.json").write_text(json.dumps(results, indent=1, default=float))
    text = markdown(results)
    (out / "fault_sweep.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
