"""Export timing for ``real_models.py``: structvi's ArviZ export of a fitted dense guide side by
side with Pyro's ``Predictive``, and ``--export-only`` (re-time the exports of freshly fitted
dense guides and rewrite that table in the saved results without re-running the other fits).

What each column computes, for ``draws`` draws of the same fitted guide:

* ``to_inference_data`` — draws from q, the model run once at all draws (particle plate, or
  ``vmap``), per-observation log-likelihoods, log-joint densities, PSIS (ArviZ's ``psislw``)
  of the importance ratios, posterior-predictive draws of the observed sites, and the ArviZ
  ``InferenceData`` with posterior, posterior_predictive, log_likelihood, sample_stats and
  observed_data groups;
* ``psis_khat`` — draws, log-joint densities, PSIS: the Pareto k̂;
* ``Predictive(parallel=True)`` — draws from the guide and one vectorized model run that
  returns the sites (no log-densities; with the data passed as arguments, as here, the
  observed sites are returned as the data, not drawn); it fails on models whose latents have
  event dims next to data plates (it reshapes a ``(S, p)`` site to ``(S, p)`` instead of
  ``(S, 1, p)``) or that do not broadcast;
* ``Predictive + from_dict`` — the same followed by ``az.from_dict`` of the latent sites (an
  ``InferenceData`` with a posterior group only);
* ``Predictive(parallel=False)`` — Pyro's per-draw loop (guide and model once per draw).

Each time is the minimum wall time over interleaved repetitions after a warm-up call (set-up
and the one-time vectorization detection excluded; the minimum process CPU time is stored
too, under ``cpu``); ``Predictive(parallel=False)`` is timed once.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

KEYS = ("to_inference_data", "psis_khat", "predictive_parallel", "predictive_from_dict",
        "predictive_sequential")


def _latent_names(guide: Any) -> list[str]:
    return [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]


def export_times(model: Callable[..., Any], args: tuple, guide: Any, draws: int = 1000,
                 budget_s: float = 4.0, max_reps: int = 40) -> dict[str, Any]:
    """Seconds per call of the exports and of Pyro's ``Predictive`` (module docstring), ``nan``
    where a call fails; also the vectorization mode the export used."""
    from pyro.infer import Predictive

    from structvi.arviz import _from_dict, psis_khat, to_inference_data

    latent = _latent_names(guide)
    chains = 4

    def predictive(parallel):
        return Predictive(model, guide=guide, num_samples=draws, parallel=parallel)(*args)

    def from_dict():
        samples = predictive(True)
        post = {k: samples[k].detach().double().numpy().reshape((chains, -1)
                                                               + tuple(samples[k].shape[1:]))
                for k in latent}
        return _from_dict({"posterior": post})

    calls = {"to_inference_data": lambda: to_inference_data(guide, model, draws,
                                                             model_args=args),
             "psis_khat": lambda: psis_khat(guide, model, draws, model_args=args),
             "predictive_parallel": lambda: predictive(True),
             "predictive_from_dict": from_dict}
    out: dict[str, Any] = {k: math.nan for k in KEYS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = {}
        for key, call in list(calls.items()):
            try:
                t0 = time.perf_counter()
                call()  # warm-up (set-up, vectorization detection)
                first[key] = time.perf_counter() - t0
            except Exception:  # noqa: BLE001 -- a model Predictive cannot vectorize
                del calls[key]
        reps = max(5, min(max_reps, int(budget_s / max(sum(first.values()), 1e-6))))
        best = {key: math.inf for key in calls}
        cpu = dict(best)
        for _ in range(reps):  # interleaved: load changes hit every column alike
            for key, call in calls.items():
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                best[key] = min(best[key], time.perf_counter() - t0)
                cpu[key] = min(cpu[key], time.process_time() - c0)
        out.update(best)
        out["cpu"] = cpu  # process CPU time: robust to other processes on a shared machine
        try:
            t0 = time.perf_counter()
            predictive(False)
            out["predictive_sequential"] = time.perf_counter() - t0
        except Exception:  # noqa: BLE001
            pass
    modes = getattr(guide, "_structvi_vectorization", {})
    out["mode"] = next(iter(modes.values()), "?") if modes else "?"
    out["draws"], out["reps"] = draws, reps
    return out


def _ms(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{1e3 * x:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    return f"{a / b:.3g}" if ok else "—"


def export_table(rows: list[dict]) -> list[str]:
    """The Markdown section of the export times (dense rows that carry ``export_seconds``)."""
    rows = [r for r in rows if "export_seconds" in r]
    draws = next((r["export_seconds"].get("draws") for r in rows), 1000) or 1000
    lines = [f"## Export time ({draws} draws of the dense guide)", "",
             "| model | d | run | to_inference_data (ms) | psis_khat (ms) | "
             "Predictive(parallel=True) (ms) | **export / Predictive** | export / Predictive, "
             "CPU time | psis_khat / Predictive | Predictive + from_dict (ms) | "
             "Predictive(parallel=False) (ms) | export / Predictive(parallel=False) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["export_seconds"]
        idata, khat = e.get("to_inference_data"), e.get("psis_khat")
        par, seq = e.get("predictive_parallel"), e.get("predictive_sequential")
        cpu = e.get("cpu", {})
        lines.append(
            f"| {r['model']} | {r['dim']} | {e.get('mode', r.get('vectorization', '?'))} | "
            f"{_ms(idata)} | {_ms(khat)} | {_ms(par)} | {_ratio(idata, par)} | "
            f"{_ratio(cpu.get('to_inference_data'), cpu.get('predictive_parallel'))} | "
            f"{_ratio(khat, par)} | {_ms(e.get('predictive_from_dict'))} | {_ms(seq)} | "
            f"{_ratio(idata, seq)} |")
    lines += ["", "What each side computes: `to_inference_data` draws from q, runs the model "
              "once at all draws (`run`: a particle plate, or `torch.func.vmap` for a model that "
              "does not broadcast), and from that one run takes the per-observation "
              "log-likelihoods, the log-joint densities, the posterior-predictive draws of the "
              "observed sites and the deterministic sites; it smooths the importance ratios "
              "with ArviZ's PSIS (k̂, log weights) and builds the InferenceData (posterior, "
              "posterior_predictive, log_likelihood, sample_stats, observed_data). `psis_khat`: "
              "draws, log-joint densities and PSIS. `Predictive(parallel=True)` only draws: "
              "the guide once and one vectorized model run returning the sites (no densities; "
              "the observed sites come back as the data passed in, nothing is sampled for them); "
              "`—` where it fails (a latent with event dims next to a data plate, or a model "
              "that does not broadcast), and there Pyro's only way is the per-draw loop "
              "`Predictive(parallel=False)`. `Predictive + from_dict` adds `az.from_dict` of the "
              "latent draws (a posterior group only). Times: minimum wall time over interleaved "
              "repetitions after a warm-up call, one thread; the CPU-time ratio uses the minimum "
              "process CPU time of the same calls (other processes on the machine do not count "
              "there)."]
    return lines


def rerun_exports(out: Path, names: list[str], make_dense: Callable[[str], Callable],
                  steps: int, models: dict, markdown: Callable[[list, dict], str],
                  log: Callable[[str], None] = print) -> None:
    """``--export-only``: fit the dense guide of each model (``make_dense(name)() → (guide,
    step)``, ``steps`` steps), re-time its export, and rewrite ``export_seconds`` of the dense
    rows in ``out/real_models.json`` and the Markdown (the other rows and the PNG are kept)."""
    import pyro

    path = out / "real_models.json"
    if not path.exists():
        raise SystemExit(f"--export-only rewrites {path}, which does not exist: run the "
                         f"benchmark first")
    saved = json.loads(path.read_text())
    for name in names:
        row = next((r for r in saved["rows"] if r["model"] == name
                    and r["method"] == "structvi dense"), None)
        if row is None:
            log(f"{name}: no 'structvi dense' row in {path}; skipped")
            continue
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide, step = make_dense(name)()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(steps):
                step()
        model, args = models[name]
        row["export_seconds"] = export_times(model, args, guide)
        e = row["export_seconds"]
        cpu = e.get("cpu", {})
        log(f"{name:>18} {e['mode']:>5}  export {_ms(e['to_inference_data'])} ms  psis_khat "
            f"{_ms(e['psis_khat'])} ms  Predictive {_ms(e['predictive_parallel'])} ms  ratio "
            f"{_ratio(e['to_inference_data'], e['predictive_parallel'])} (CPU time "
            f"{_ratio(cpu.get('to_inference_data'), cpu.get('predictive_parallel'))})")
        saved["meta"]["export"] = {"torch": torch.__version__, "fit_steps": steps,
                                   "rerun": "--export-only"}
        path.write_text(json.dumps(saved, indent=1))
        (out / "real_models.md").write_text(markdown(saved["rows"], saved["meta"]))
