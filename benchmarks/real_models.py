"""Structured VI on eight real-shaped Pyro models against NUTS, side by side with Pyro's guides.

Models (:mod:`benchmarks._real_models`): a non-centred hierarchy (eight schools), a collinear
regression, AR(5), GARCH(1,1), a latent-GP Poisson regression, varying intercepts, a small-N
log-log regression with a flat prior on the scale, and an interaction regression. Rows per model:
structvi ``dense`` / ``low_rank_diagonal`` / ``diagonal`` with the defaults of
``NaturalGradientSVI`` (1000 steps), and Pyro's ``AutoMultivariateNormal`` /
``AutoLowRankMultivariateNormal`` / ``AutoNormal`` with ``Trace_ELBO`` + Adam at the best of the
learning rates {0.003, 0.01, 0.03} (4000 steps).

Every row is scored the same way from its Gaussian ``N(m, C)`` over the unconstrained latents:
ELBO with common random numbers (2000 standard-normal draws shared by all rows, exact entropy);
against the cached NUTS reference (``benchmarks/data/real_models_nuts.json``; regenerate with
``--make-reference``) the max standardized mean error ``max |mean − mean_NUTS| / sd_NUTS`` and
the max ``|log(sd / sd_NUTS)|`` over all constrained coordinates, raw and PSIS-corrected
(:mod:`structvi.psis`); the Pareto ``k̂``; the wall time of the steps (evaluations excluded);
and the number of non-finite steps. The ELBO is also tracked against wall time (the PNG).

Run: ``python -m benchmarks.real_models [--quick]``; writes ``benchmarks/results/real_models.{json,
md,png}`` (``--quick``: three models, 300/1000 steps, one learning rate, to
``benchmarks/results/quick/``; ``--models``, ``--ours-steps``, ``--their-steps`` and ``--lrs``
override the configuration, and the results are rewritten after every model;
``--export-only [--models ...]`` refits only the dense guides and rewrites the export-time table,
:mod:`benchmarks._export_times`; ``--only-ours STRUCTURE ... [--models ...]`` refits only those
structvi rows and splices them into the saved results). One intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal

from benchmarks import _export_times as _export
from benchmarks._real_models import MODELS
from structvi.psis import smooth_log_weights
from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI
from structvi.pyro.psis import constrained_draws, guide_log_joint

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks" / "data" / "real_models_nuts.json"
OURS = ("dense", "low_rank_diagonal", "diagonal")
THEIRS = {"AutoMultivariateNormal": AutoMultivariateNormal,
          "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal,
          "AutoNormal": AutoNormal}
FAMILY = {"dense": "dense", "AutoMultivariateNormal": "dense", "diagonal": "diagonal",
          "AutoNormal": "diagonal", "low_rank_diagonal": "low-rank",
          "AutoLowRankMultivariateNormal": "low-rank"}


# ---------------------------------------------------------------------- NUTS reference
def flat_sites(values: dict[str, torch.Tensor], S: int) -> np.ndarray:
    """``{site: (S, ...)}`` → ``(S, D)`` in site order."""
    return np.concatenate([v.reshape(S, -1).double().numpy() for v in values.values()], 1)


def make_reference(draws: int, warmup: int, names: list[str] | None = None) -> None:
    """Run NUTS on the models (default all) and store their constrained means and sds as JSON
    (one model at a time, so an interrupted run keeps what it has)."""
    out = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    for name in names or list(MODELS):
        model, args = MODELS[name]
        t0 = time.perf_counter()
        pyro.set_rng_seed(0)
        mcmc = MCMC(NUTS(model, full_mass=name in ("collinear", "interaction")),
                    num_samples=draws, warmup_steps=warmup, disable_progbar=True)
        mcmc.run(*args)
        samples = mcmc.get_samples()
        packer = AutoStructuredNormal(model)
        packer.setup(*args)
        order = [n for n, _ in packer.prototype_trace.iter_stochastic_nodes()]
        flat = flat_sites({n: samples[n] for n in order}, draws)
        out[name] = {"mean": flat.mean(0).tolist(), "sd": flat.std(0, ddof=1).tolist(),
                     "sites": order, "draws": draws, "warmup": warmup,
                     "seconds": time.perf_counter() - t0}
        print(f"{name}: {flat.shape[1]} coordinates, {out[name]['seconds']:.0f} s", flush=True)
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------------- scoring
class Scorer:
    """ELBO (common random numbers), NUTS errors raw and PSIS-corrected, and k̂ of ``N(m, C)``."""

    def __init__(self, name: str, num_draws: int = 2000) -> None:
        model, args = MODELS[name]
        self.model, self.args = model, args
        self.packer = AutoStructuredNormal(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.log_joint, self.mode, _, _ = guide_log_joint(self.packer, model, args, {},
                                                              "scoring")
        d = self.packer.latent_dim
        gen = torch.Generator().manual_seed(12345)
        self.eps = torch.randn(num_draws, d, generator=gen, dtype=torch.float64)
        self.eps_track = self.eps[:256]
        ref = json.loads(REFERENCE.read_text())[name]
        self.mean, self.sd = np.array(ref["mean"]), np.array(ref["sd"])

    @torch.no_grad()
    def _terms(self, m: torch.Tensor, C: torch.Tensor, eps: torch.Tensor):
        L = torch.linalg.cholesky(C + 1e-12 * torch.eye(C.shape[0], dtype=C.dtype))
        U = m + eps @ L.T
        with pyro.validation_enabled(False):  # a diverged fit scores -inf/nan, not an error
            log_p = self.log_joint(U)
        log_q = (-0.5 * eps.square().sum(1) - L.diagonal().log().sum()
                 - 0.5 * m.numel() * math.log(2 * math.pi))
        return U, log_p, log_q

    def elbo(self, m: torch.Tensor, C: torch.Tensor, eps: torch.Tensor | None = None) -> float:
        _, log_p, log_q = self._terms(m, C, self.eps_track if eps is None else eps)
        value = float((log_p - log_q).mean())
        return value if math.isfinite(value) else math.nan

    def final(self, m: torch.Tensor, C: torch.Tensor) -> dict[str, float]:
        U, log_p, log_q = self._terms(m, C, self.eps)
        S = U.shape[0]
        flat = flat_sites(constrained_draws(self.packer, U), S)
        lr = (log_p - log_q).numpy()
        elbo = float(lr.mean())
        out = {"elbo": elbo if math.isfinite(elbo) else math.nan,
               **self._errors(flat, np.full(S, 1.0 / S), "raw")}
        if np.isfinite(lr).all():
            lw, k = smooth_log_weights(lr)
            out.update(self._errors(flat, np.exp(lw), "psis"), khat=float(k))
        else:
            out.update(mean_err_psis=math.nan, sd_err_psis=math.nan, khat=math.nan)
        return out

    def _errors(self, flat: np.ndarray, w: np.ndarray, tag: str) -> dict[str, float]:
        if not np.isfinite(flat).all():
            return {f"mean_err_{tag}": math.nan, f"sd_err_{tag}": math.nan}
        mean = w @ flat
        sd = np.sqrt(np.maximum(w @ (flat - mean) ** 2, 1e-300))
        return {f"mean_err_{tag}": float((np.abs(mean - self.mean) / self.sd).max()),
                f"sd_err_{tag}": float(np.abs(np.log(sd / self.sd)).max())}


def gaussian_of(guide: Any, packer: AutoStructuredNormal) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, C)`` over the packed unconstrained latents, for our and Pyro's guides."""
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            names = [n for n, _ in packer.prototype_trace.iter_stochastic_nodes()]
            m = torch.cat([getattr(guide.locs, n).reshape(-1) for n in names])
            s = torch.cat([getattr(guide.scales, n).reshape(-1) for n in names])
            return m.double(), torch.diag(s.double() ** 2)
        post = guide.get_posterior()
        if isinstance(guide, AutoStructuredNormal):
            K = post.factor.to_dense()
            return post.loc.detach().double(), (K @ K.T).double()
        return post.loc.detach().double(), post.covariance_matrix.detach().double()


# ---------------------------------------------------------------------- runs
def run_row(name: str, label: str, make, steps: int, every: int, scorer: Scorer) -> dict:
    """Train one guide, tracking the ELBO against the wall time of the steps."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide, step = make()
    trace, elapsed, bad = [], 0.0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(1, steps + 1):
            t0 = time.perf_counter()
            loss = step()
            elapsed += time.perf_counter() - t0
            bad += not math.isfinite(loss)
            if t % every == 0 or t == steps:
                trace.append((elapsed, scorer.elbo(*gaussian_of(guide, scorer.packer))))
    row = {"model": name, "method": label, "steps": steps, "seconds": elapsed,
           "dim": scorer.packer.latent_dim,
           "non_finite": bad, "trace": trace}
    row.update(scorer.final(*gaussian_of(guide, scorer.packer)))
    return row, guide


def export_times(name: str, guide: AutoStructuredNormal, draws: int = 1000) -> dict[str, Any]:
    """Export and ``Predictive`` times of a fitted guide (:mod:`benchmarks._export_times`)."""
    model, args = MODELS[name]
    return _export.export_times(model, args, guide, draws)


def ours(name: str, structure: str):
    model, args = MODELS[name]

    def make():
        guide = AutoStructuredNormal(model, structure=structure)
        svi = NaturalGradientSVI(model, guide, generator=torch.Generator().manual_seed(0))
        return guide, lambda: svi.step(*args)

    return make


def theirs(name: str, cls: type, lr: float):
    model, args = MODELS[name]

    def make():
        guide = cls(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
        return guide, lambda: svi.step(*args)

    return make


def run_model(name: str, ours_steps: int, their_steps: int, lrs: list[float], log) -> list[dict]:
    scorer = Scorer(name)
    rows = []
    for structure in OURS:
        row, guide = run_row(name, f"structvi {structure}", ours(name, structure), ours_steps,
                             ours_steps // 20, scorer)
        row.update(family=FAMILY[structure], vectorization=scorer.mode)
        if structure == "dense":
            row["export_seconds"] = export_times(name, guide)
        rows.append(row)
        log(row)
    for label, cls in THEIRS.items():
        best = None
        for lr in lrs:
            row, _ = run_row(name, f"Pyro {label} + Adam({lr})", theirs(name, cls, lr),
                             their_steps, their_steps // 20, scorer)
            row.update(family=FAMILY[label], lr=lr)
            if best is None or _key(row) > _key(best):
                best = row
        log(best)
        rows.append(best)
    return rows


def splice_ours(out: Path, names: list[str], structures: list[str], steps: int) -> None:
    """Refit the structvi ``structures`` rows of ``names`` and replace them in ``out``'s saved
    results (every other row, and the meta, kept; ``meta["spliced"]`` records what was rerun)."""
    saved = json.loads((out / "real_models.json").read_text())
    rows = saved["rows"]
    for name in names:
        pyro.clear_param_store()  # a guide named like the scorer's packer would share its params
        scorer = Scorer(name)
        for structure in structures:
            label = f"structvi {structure}"
            at = next((i for i, r in enumerate(rows) if r["model"] == name and r["method"] == label),
                      None)
            if at is None:
                raise ValueError(f"no saved row {label!r} of model {name!r} in {out}")
            row, guide = run_row(name, label, ours(name, structure), steps, steps // 20, scorer)
            row.update(family=FAMILY[structure], vectorization=scorer.mode)
            if "export_seconds" in rows[at]:
                row["export_seconds"] = rows[at]["export_seconds"]
            rows[at] = row
            print(f"{name:>18} {label:<30} ELBO {row['elbo']:10.3f}  {row['seconds']:.1f}s",
                  flush=True)
    saved["meta"].setdefault("spliced", []).append(
        {"models": names, "structures": structures, "steps": steps})
    (out / "real_models.json").write_text(json.dumps(saved, indent=1))
    (out / "real_models.md").write_text(markdown(rows, saved["meta"]))
    plot(rows, out / "real_models.png")


def _key(row: dict) -> float:
    return row["elbo"] if math.isfinite(row["elbo"]) else -math.inf


# ---------------------------------------------------------------------- output
def _f(x: float, spec: str) -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def markdown(rows: list[dict], meta: dict) -> str:
    spec = meta["ours_steps"] == 1000 and meta["their_steps"] == 4000 and len(meta["lrs"]) == 3
    kind = "quick" if meta["quick"] else ("full" if spec else "reduced")
    lines = [f"# Real models vs NUTS ({kind}: structvi {meta['ours_steps']} steps, Pyro "
             f"{meta['their_steps']} steps at lr {meta['lrs']}; torch {meta['torch']}, "
             f"pyro {meta['pyro']}, 1 thread)", "",
             "| model | method | ELBO | max \\|Δmean\\|/sd (raw / PSIS) | max \\|log sd ratio\\| "
             "(raw / PSIS) | k̂ | s | non-finite |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {_f(r['elbo'], '.2f')} | "
            f"{_f(r['mean_err_raw'], '.3f')} / {_f(r['mean_err_psis'], '.3f')} | "
            f"{_f(r['sd_err_raw'], '.3f')} / {_f(r['sd_err_psis'], '.3f')} | "
            f"{_f(r['khat'], '.2f')} | {_f(r['seconds'], '.1f')} | {r['non_finite']} |")
    lines += ["", "## structvi vs Pyro, same family", "",
              "| model | family | ELBO structvi − Pyro | time structvi / Pyro | dense − best ELBO |",
              "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        best = max(r["elbo"] for r in mine if math.isfinite(r["elbo"]))
        for fam in ("dense", "low-rank", "diagonal"):
            a = next(r for r in mine if r["family"] == fam and r["method"].startswith("structvi"))
            b = next(r for r in mine if r["family"] == fam and r["method"].startswith("Pyro"))
            gap = best - a["elbo"] if fam == "dense" else math.nan
            lines.append(f"| {name} | {fam} | {_f(a['elbo'] - b['elbo'], '+.2f')} | "
                         f"{_f(a['seconds'] / b['seconds'], '.2f')} | {_f(gap, '.2f')} |")
    lines += [""] + _export.export_table(rows)
    lines += ["", "structvi: `NaturalGradientSVI` defaults, "
              f"{meta['ours_steps']} steps; Pyro: Trace_ELBO + Adam, {meta['their_steps']} steps, "
              "best ELBO over the learning rates " + str(meta["lrs"]) + ". Errors over all "
              "constrained coordinates against NUTS; PSIS: Pareto-smoothed importance weights of "
              "2000 draws of q; k̂ < 0.7 reads reliable."]
    for sp in meta.get("spliced", []):
        lines += ["", f"Rows `structvi {'`/`'.join(sp['structures'])}` of "
                  f"{', '.join(sp['models'])} re-run alone after a change of their defaults "
                  f"(`--only-ours`, {sp['steps']} steps); every other row is from the full run."]
    if "note_garch" in meta:
        lines += ["", meta["note_garch"] + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(4, len(models))
    fig, axes = plt.subplots(math.ceil(len(models) / cols), cols,
                             figsize=(4 * cols, 3.2 * math.ceil(len(models) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, models):
        mine = [r for r in rows if r["model"] == name]
        best = max(r["elbo"] for r in mine if math.isfinite(r["elbo"]))
        for r in mine:
            t, e = zip(*r["trace"])
            ax.plot(t, np.maximum(best - np.array(e), 1e-2), label=r["method"],
                    ls="-" if r["method"].startswith("structvi") else "--")
        ax.set(title=name, xscale="log", yscale="log", xlabel="wall time of the steps (s)",
               ylabel="best final ELBO − ELBO (nats)")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default benchmarks/results[/quick])")
    parser.add_argument("--make-reference", action="store_true",
                        help="regenerate the cached NUTS reference and exit")
    parser.add_argument("--nuts-draws", type=int, default=1000)
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--replot", action="store_true",
                        help="rewrite the .md and .png from the saved .json and exit")
    parser.add_argument("--models", nargs="*", default=None, choices=list(MODELS))
    parser.add_argument("--ours-steps", type=int, default=None, help="default 1000 (quick 300)")
    parser.add_argument("--their-steps", type=int, default=None,
                        help="default 4000 (quick 1000)")
    parser.add_argument("--lrs", type=float, nargs="*", default=None,
                        help="Adam learning rates (default 0.003 0.01 0.03; quick 0.01)")
    parser.add_argument("--export-only", action="store_true",
                        help="refit only the dense guides, re-time their ArviZ export and "
                             "rewrite that table in the saved results")
    parser.add_argument("--only-ours", nargs="+", default=None, choices=list(OURS),
                        help="refit only these structvi rows of --models (default all) and "
                             "replace them in the saved results, keeping every other row")
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    if a.make_reference:
        make_reference(a.nuts_draws, a.nuts_warmup, a.models)
        return
    default_out = ROOT / "benchmarks" / "results" / ("quick" if a.quick else "")
    if a.replot:
        out = a.out or default_out
        saved = json.loads((out / "real_models.json").read_text())
        (out / "real_models.md").write_text(markdown(saved["rows"], saved["meta"]))
        plot(saved["rows"], out / "real_models.png")
        return
    names = a.models or (["hierarchical", "loglog", "interaction"] if a.quick else list(MODELS))
    ours_steps = a.ours_steps or (300 if a.quick else 1000)
    their_steps = a.their_steps or (1000 if a.quick else 4000)
    lrs = a.lrs or ([0.01] if a.quick else [0.003, 0.01, 0.03])
    out = a.out or default_out
    if a.export_only:
        _export.rerun_exports(out, names, lambda n: ours(n, "dense"), ours_steps, MODELS,
                              markdown)
        return
    if a.only_ours:
        splice_ours(out, names, a.only_ours, ours_steps)
        return
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    def log(r):
        print(f"{r['model']:>18} {r['method']:<48} ELBO {r['elbo']:10.2f}  mean {r['mean_err_raw']:.3f}"
              f"/{r['mean_err_psis']:.3f}  sd {r['sd_err_raw']:.3f}/{r['sd_err_psis']:.3f}  "
              f"k {r['khat']:.2f}  {r['seconds']:.1f}s  bad {r['non_finite']}", flush=True)

    meta = {"quick": a.quick, "torch": torch.__version__, "pyro": pyro.__version__,
            "machine": platform.machine(), "ours_steps": ours_steps,
            "their_steps": their_steps, "lrs": lrs}
    for name in names:  # results are rewritten after every model
        rows += run_model(name, ours_steps, their_steps, lrs, log)
        (out / "real_models.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "real_models.md").write_text(markdown(rows, meta))
        plot(rows, out / "real_models.png")
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
