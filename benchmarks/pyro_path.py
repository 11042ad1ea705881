"""The Pyro path: ``NaturalGradientSVI`` + ``AutoStructuredNormal`` vs Pyro's autoguides + Adam.

Part 1 — Bayesian logistic regression (breast cancer, d = 31, ``β ~ N(0, I)``; the model and the
NUTS reference of ``tests/pyro/``). Rows: structvi ``dense`` (Stein and Hessian estimators),
``low_rank_diagonal`` (rank 4) and ``diagonal`` (Stein), and Pyro's ``AutoMultivariateNormal``,
``AutoLowRankMultivariateNormal`` (rank 4) and ``AutoNormal`` with ``Trace_ELBO`` + Adam (best of
a learning-rate grid; one rate with ``--quick``). Every row is scored the same way, from its
Gaussian ``N(m, C)`` over β: the ELBO by common random numbers (the same 1024 standard-normal
draws for every row, exact entropy), the errors of the means and standard deviations against
NUTS (``max |Δmean|/sd``, ``max |sd/sd_NUTS − 1|``) and PSIS k̂ (2000 draws). "Time to target" is
the wall time (steps only, not evaluations) until the ELBO is within 0.5 nats of the best final
ELBO of the row's family (dense, diagonal; structvi's low-rank-plus-diagonal *precision* and
Pyro's low-rank-plus-diagonal *covariance* are different families).

Part 2 — the digits BNN of ``examples/pyro_bnn.py`` (Kronecker NGD vs AutoNormal + Adam):
test accuracy, NLL, ECE, full-data ELBO, wall-clock and CPU seconds (after an untimed warm-up
of both, so one-time imports count for neither), and the CPU time per step of both measured in
alternating rounds (:func:`interleaved_step_times`; the ratio to read on a shared machine).

Run: ``python -m benchmarks.pyro_path [--quick] [--only bnn]``; writes
``benchmarks/results/pyro_path.json`` and ``pyro_path.md`` (``--quick``: under
``benchmarks/results/quick/``; the markdown tables are also printed). ``--only bnn`` reruns part 2
alone and keeps part 1 of the existing results file. One intra-op thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal
from torch import Tensor

from structvi.arviz import pareto_khat
from structvi.fit import TwoStage
from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI, latent_log_joint
from tests.pyro.make_nuts_reference import DATA_FILE, load_data, model

ROOT = Path(__file__).resolve().parents[1]
FAMILY = {"dense": "dense", "AutoMultivariateNormal": "dense", "diagonal": "diagonal",
          "AutoNormal": "diagonal", "low_rank_diagonal": "low-rank precision",
          "AutoLowRankMultivariateNormal": "low-rank covariance"}


class Scorer:
    """Common-random-numbers ELBO, NUTS errors and k̂ for a Gaussian ``N(m, C)`` over β."""

    def __init__(self, X: Tensor, y: Tensor, num_draws: int = 1024) -> None:
        packer = AutoStructuredNormal(model)
        packer.setup(X, y)
        self.log_joint = latent_log_joint(model, packer, (X, y), vectorize=True,
                                          max_plate_nesting=1)
        gen = torch.Generator().manual_seed(12345)
        self.eps = torch.randn(num_draws, X.shape[1], generator=gen, dtype=X.dtype)
        self.eps_khat = torch.randn(2000, X.shape[1], generator=gen, dtype=X.dtype)
        ref = json.loads(DATA_FILE.read_text())
        self.mean, self.std = np.array(ref["mean"]), np.array(ref["std"])

    @torch.no_grad()
    def elbo(self, m: Tensor, C: Tensor) -> float:
        L = torch.linalg.cholesky(C)
        entropy = 0.5 * m.numel() * (1 + math.log(2 * math.pi)) + L.diagonal().log().sum()
        return float(self.log_joint(m + self.eps @ L.T).mean() + entropy)

    @torch.no_grad()
    def final(self, m: Tensor, C: Tensor) -> dict[str, float]:
        L = torch.linalg.cholesky(C)
        z = m + self.eps_khat @ L.T
        log_q = torch.distributions.MultivariateNormal(m, scale_tril=L).log_prob(z)
        sd = C.diagonal().sqrt().numpy()
        return {"elbo": self.elbo(m, C),
                "mean_err": float((np.abs(m.numpy() - self.mean) / self.std).max()),
                "sd_err": float(np.abs(sd / self.std - 1).max()),
                "khat": pareto_khat((self.log_joint(z) - log_q).numpy())}


def gaussian_of(guide: Any) -> tuple[Tensor, Tensor]:
    """Mean and covariance of a fitted guide over β (all guides here are Gaussian)."""
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            m, s = guide.locs.beta.detach(), guide.scales.beta.detach()
            return m.clone(), torch.diag(s.square())
        q = guide.get_posterior()  # StructuredGaussian, MultivariateNormal or LowRank...
        return q.loc.detach().clone(), q.covariance_matrix.detach().clone()


def run(name: str, make: Callable[[], tuple[Any, Callable[[], Any]]], steps: int, every: int,
        scorer: Scorer) -> dict[str, Any]:
    """Step ``make()``'s stepper ``steps`` times, scoring the ELBO every ``every`` steps."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide, step = make()
    trace: dict[str, list[float]] = {"step": [], "seconds": [], "elbo": []}
    elapsed = 0.0
    for t in range(1, steps + 1):
        t0 = time.perf_counter()
        step()
        elapsed += time.perf_counter() - t0
        if t % every == 0 or t == steps:
            trace["step"].append(t)
            trace["seconds"].append(elapsed)
            trace["elbo"].append(scorer.elbo(*gaussian_of(guide)))
    return {"method": name, "trace": trace, "ms_per_step": 1e3 * elapsed / steps,
            **scorer.final(*gaussian_of(guide))}


def logistic_rows(quick: bool, X: Tensor, y: Tensor) -> list[tuple[str, str, Callable, int, int]]:
    """(label, family key, factory, steps, eval interval) for every row."""

    def ours(structure: str, estimator: str, ns: int, **opts: Any):
        def make():
            guide = AutoStructuredNormal(model, structure=structure, **opts)
            config = TwoStage(1.0, 10, 0.3) if estimator == "hessian" else TwoStage(0.2, 60, 0.02)
            svi = NaturalGradientSVI(model, guide, estimator=estimator, num_samples=ns,
                                     config=config, vectorize_particles=True,
                                     generator=torch.Generator().manual_seed(0))
            return guide, lambda: svi.step(X, y)
        return make

    def theirs(cls: type, lr: float, **opts: Any):
        def make():
            guide = cls(model, **opts)
            svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
            return guide, lambda: svi.step(X, y)
        return make

    stein = 300 if quick else 600
    adam = 2000 if quick else 5000
    rows = [("structvi dense (stein, 64)", "dense", ours("dense", "stein", 64), stein, 10),
            ("structvi dense (hessian, 8)", "dense", ours("dense", "hessian", 8), 30, 2),
            ("structvi low_rank_diagonal r=4 (stein, 64)", "low_rank_diagonal",
             ours("low_rank_diagonal", "stein", 64, rank=4), stein, 10),
            ("structvi diagonal (stein, 64)", "diagonal", ours("diagonal", "stein", 64), stein, 10)]
    for lr in [0.01] if quick else [0.003, 0.01, 0.03]:
        rows += [(f"Pyro AutoMultivariateNormal + Adam({lr})", "AutoMultivariateNormal",
                  theirs(AutoMultivariateNormal, lr), adam, 50),
                 (f"Pyro AutoLowRankMultivariateNormal r=4 + Adam({lr})",
                  "AutoLowRankMultivariateNormal",
                  theirs(AutoLowRankMultivariateNormal, lr, rank=4), adam, 50),
                 (f"Pyro AutoNormal + Adam({lr})", "AutoNormal", theirs(AutoNormal, lr), adam, 50)]
    return rows


def time_to_target(results: list[dict[str, Any]], slack: float = 0.5) -> None:
    """Add ``target``, ``steps_to_target`` and ``seconds_to_target`` to every row."""
    best: dict[str, float] = {}
    for r in results:
        best[r["family"]] = max(best.get(r["family"], -math.inf), r["elbo"])
    for r in results:
        r["target"] = best[r["family"]] - slack
        hit = [(s, t) for s, t, e in zip(*(r["trace"][k] for k in ("step", "seconds", "elbo")))
               if e >= r["target"]]
        r["steps_to_target"], r["seconds_to_target"] = hit[0] if hit else (None, None)


def logistic(quick: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    X, y = load_data()
    scorer = Scorer(X, y)
    results = []
    for label, key, make, steps, every in logistic_rows(quick, X, y):
        row = run(label, make, steps, every, scorer)
        row["family"] = FAMILY[key]
        results.append(row)
        log(f"  {label}: ELBO {row['elbo']:.2f}, {row['ms_per_step']:.1f} ms/step")
    time_to_target(results)
    return results


def interleaved_step_times(example: Any, rounds: int = 7, steps: int = 50,
                           warmup: int = 20) -> dict[str, Any]:
    """CPU milliseconds per step of both BNN methods, measured in alternating rounds.

    ``rounds`` times: ``steps`` structvi steps, then ``steps`` AutoNormal + Adam steps (after
    ``warmup`` steps of each; the example's settings, structvi at its post-warm-up rate). On a
    shared machine the load changes during a run; alternating rounds expose both methods to the
    same load, and the ratio per round (fastest and median) is the comparison to read.
    """
    from pyro.infer.autoguide import init_to_sample

    from structvi.engine import NGDConfig
    from structvi.fit import StepRule

    X, y, _, _ = example.load_digits(0)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    ours_model, theirs_model = example.BayesianMLP(), example.BayesianMLP()
    guide = AutoStructuredNormal(ours_model, structure={"fc1.weight": "kronecker",
                                                        "fc2.weight": "kronecker"},
                                 init_loc_fn=init_to_sample, init_scale=0.05)
    ours = NaturalGradientSVI(ours_model, guide, estimator="stein", num_samples=8,
                              config=NGDConfig(lr=0.05), generator=torch.Generator().manual_seed(0),
                              step_rule=StepRule(accept="deferred"))  # as the example
    normal = AutoNormal(theirs_model, init_loc_fn=init_to_sample, init_scale=0.05)
    theirs = SVI(theirs_model, normal, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    methods = {"structvi": lambda: ours.step(X, y, 256), "pyro": lambda: theirs.step(X, y, 256)}
    for step in methods.values():
        for _ in range(warmup):
            step()
    ms: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, step in methods.items():
            t0 = time.process_time()
            for _ in range(steps):
                step()
            ms[name].append(1e3 * (time.process_time() - t0) / steps)
    ratios = [a / b for a, b in zip(ms["structvi"], ms["pyro"])]
    return {"rounds": rounds, "steps_per_round": steps, "cpu_ms": ms,
            "ratio_min": min(ratios), "ratio_median": float(np.median(ratios))}


def bnn(quick: bool) -> dict[str, Any]:
    path = ROOT / "examples" / "pyro_bnn.py"
    spec = importlib.util.spec_from_file_location("pyro_bnn_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    steps = 300 if quick else 1000
    # Untimed warm-up of both methods: one-time lazy imports and caches (e.g. the first
    # torch.broadcast_shapes call imports sympy, ~1 s) must not land in whichever runs first.
    example.main(steps=3, eval_samples=2, verbose=False)
    results = example.main(steps=steps, verbose=False)
    return {"steps": steps, "hidden": 32, "batch_size": 256, "results": results,
            "interleaved": interleaved_step_times(example, rounds=5 if quick else 9)}


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(logi: list[dict[str, Any]], net: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# Pyro path ({'quick' if meta['quick'] else 'full'}; {meta['torch']}, "
             f"pyro {meta['pyro']}, 1 thread, {meta['machine']})", "",
             "## Logistic regression (breast cancer, d = 31) vs NUTS", "",
             "| method | family | ELBO | s to target | steps to target | ms/step "
             "| max \\|Δmean\\|/sd | max \\|sd ratio − 1\\| | k̂ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in logi:
        lines.append(
            f"| {r['method']} | {r['family']} | {r['elbo']:.2f} | "
            f"{_fmt(r['seconds_to_target'], '.2f')} | {_fmt(r['steps_to_target'], 'd')} | "
            f"{r['ms_per_step']:.1f} | {r['mean_err']:.3f} | {r['sd_err']:.3f} | "
            f"{r['khat']:.2f} |")
    lines += ["", "Target: best final ELBO of the family − 0.5 nats; k̂ < 0.7 reads reliable.", "",
              f"## Digits BNN (64-{net['hidden']}-10, {net['steps']} steps, batch "
              f"{net['batch_size']})", "",
              "| method | accuracy | NLL | ECE | ELBO | seconds | ms/step | × AutoNormal "
              "| CPU ms/step | × AutoNormal (CPU) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    labels = {"structvi": "structvi Kronecker NGD (stein, 8, vmap, deferred rule)",
              "pyro": "Pyro AutoNormal + Adam"}
    base = net["results"]["pyro"]
    for name, r in net["results"].items():
        lines.append(f"| {labels[name]} | {r['accuracy']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} "
                     f"| {r['elbo']:.1f} | {r['seconds']:.1f} | "
                     f"{1000 * r['seconds'] / net['steps']:.1f} | "
                     f"{r['seconds'] / base['seconds']:.2f} | "
                     f"{1000 * r['cpu_seconds'] / net['steps']:.1f} | "
                     f"{r['cpu_seconds'] / base['cpu_seconds']:.2f} |")
    inter = net.get("interleaved")
    if inter is not None:
        lines += ["", f"Interleaved CPU time per step ({inter['rounds']} alternating rounds of "
                  f"{inter['steps_per_round']} steps each, after a warm-up): structvi "
                  f"{np.median(inter['cpu_ms']['structvi']):.1f} ms, AutoNormal "
                  f"{np.median(inter['cpu_ms']['pyro']):.1f} ms (medians); structvi / AutoNormal "
                  f"per round: **{inter['ratio_median']:.2f}×** median, "
                  f"{inter['ratio_min']:.2f}× fastest round. The columns above time each "
                  f"method's whole run once, one after the other, so a change of the machine's "
                  f"load between the two runs moves their ratio."]
    lines += ["", "The structvi samples of a step are evaluated under `torch.func.vmap` (detected "
              "at set-up: a `PyroModule` network cannot broadcast a particle plate), and each "
              "step is judged by the deferred rule (`StepRule(accept=\"deferred\")`: at the "
              "next step's estimate, one model run per step instead of the default test's two; "
              "`structvi._fit_deferred`); seconds include the set-up. `seconds`/`ms/step` are wall-clock; `CPU ms/step` is the "
              "process's CPU time (one thread), which waits for a core on a shared machine do "
              "not inflate."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one Adam rate")
    parser.add_argument("--only", choices=["bnn"], default=None,
                        help="rerun only this part, keeping the other parts of the existing "
                             "results file in --out")
    parser.add_argument("--out", default=None,
                        help="results folder (default benchmarks/results, with --quick "
                             "benchmarks/results/quick)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    meta = {"quick": args.quick, "torch": torch.__version__, "pyro": pyro.__version__,
            "machine": platform.machine(), "python": platform.python_version()}
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.only == "bnn":
        old = out / "pyro_path.json"
        if not old.exists():
            parser.error(f"--only bnn keeps part 1 of {old}, which does not exist; run the "
                         f"whole benchmark first")
        previous = json.loads(old.read_text())
        if previous["meta"].get("quick") != args.quick:
            kind = "quick" if previous["meta"].get("quick") else "full"
            parser.error(f"--only bnn: {old} holds a {kind} run; rerun with the same --quick "
                         f"setting")
        logi = previous["logistic"]
        meta = {**previous["meta"], **{k: meta[k] for k in ("torch", "pyro", "machine", "python")}}
    else:
        print("logistic regression", flush=True)
        logi = logistic(args.quick, lambda s: print(s, flush=True))
    print("digits BNN", flush=True)
    net = bnn(args.quick)
    if args.only == "bnn":
        meta["bnn_seconds"] = round(time.perf_counter() - t0, 1)
    else:
        meta["seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "logistic": logi, "bnn": net}
    (out / "pyro_path.json").write_text(json.dumps(payload, indent=1) + "\n")
    text = markdown(logi, net, meta)
    (out / "pyro_path.md").write_text(text)
    print(text)
    return payload


if __name__ == "__main__":
    main()
