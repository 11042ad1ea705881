"""Out-of-the-box StructuredNGD against AdamW and SINGD on a small suite, three seeds.

The suite (benchmarks/_defaults_suite.py): digits MLP and CNN, a CNN with BatchNorm, a small
transformer (Embedding + MultiheadAttention + LayerNorm) on synthetic sequences, a regression
MLP. Each problem has a fixed epoch budget (batch 64, constant lr). Methods:

* ``AdamW-default``: ``torch.optim.AdamW(model.parameters())`` (lr 1e-3).
* ``AdamW-tuned``: the lr of ``{3e-4, 1e-3, 3e-3, 1e-2}`` with the best validation loss (seed 0).
* ``NGD-default``: ``StructuredNGD(model)``.
* ``NGD-tuned``: the lr of ``{1e-3, 3e-3, 1e-2}`` with the best validation loss (seed 0).
* ``NGD-frozen``: the defaults with ``lr_cov=0`` (``K = C = I`` forever: SGD with momentum
  for the Kronecker layers, the same diagonal rule elsewhere) — what the second-order part adds.
* ``SINGD-default``: ``singd.optim.SINGD(model)`` (the ``bench`` extra); it fails on the
  transformer (``nn.MultiheadAttention``), which the table reports.

Reported per problem and method (mean ± standard deviation over the seeds): test accuracy
(classifiers), test loss, training loss of the last epoch, time per step (whole training step,
mean over the run; methods interleaved per seed, as a ratio to AdamW-default in the same run).
The goal check compares NGD-default with AdamW-default (test metric) and with NGD-frozen
(training loss, the quantity the optimizer minimizes: margin = difference of the means,
spread = the larger of the two ranges over the seeds).

Run: ``python -m benchmarks.optim_defaults [--quick] [--out DIR]``
→ ``benchmarks/results/optim_defaults.{json,md,png}`` (``--quick``: two seeds, half the
epochs, smaller grids, into ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from benchmarks._defaults_suite import PROBLEMS, Problem, train
from structvi.optim import StructuredNGD

Maker = Callable[[nn.Module], torch.optim.Optimizer]
ADAMW_GRID = [3e-4, 1e-3, 3e-3, 1e-2]
NGD_GRID = [1e-3, 3e-3, 1e-2]


def _adamw(lr: float) -> Maker:
    return lambda model: torch.optim.AdamW(model.parameters(), lr=lr)


def _ngd(**options) -> Maker:
    return lambda model: StructuredNGD(model, **options)


def _singd(model: nn.Module) -> torch.optim.Optimizer:
    from singd.optim.optimizer import SINGD

    return SINGD(model, warn_unsupported=False)


def _key(problem: Problem) -> str:
    return "test_acc" if problem.classification else "test_loss"


def _tune(problem: Problem, data, make: Callable[[float], Maker], grid: list[float]) -> float:
    """The lr of ``grid`` with the best validation loss (seed 0)."""
    runs = {lr: train(problem, data, make(lr), seed=0)["val_loss"] for lr in grid}
    return min(runs, key=runs.get)


def methods(problem: Problem, data, quick: bool) -> dict[str, tuple[float | None, Maker]]:
    adamw_lr = _tune(problem, data, _adamw, ADAMW_GRID[1:3] if quick else ADAMW_GRID)
    ngd_lr = _tune(problem, data, lambda lr: _ngd(lr=lr), NGD_GRID[:2] if quick else NGD_GRID)
    return {
        "AdamW-default": (1e-3, _adamw(1e-3)),
        "AdamW-tuned": (adamw_lr, _adamw(adamw_lr)),
        "NGD-default": (3e-3, _ngd()),
        "NGD-tuned": (ngd_lr, _ngd(lr=ngd_lr)),
        "NGD-frozen": (3e-3, _ngd(lr_cov=0.0)),
        "SINGD-default": (1e-3, _singd),
    }


def _run(problem: Problem, data, make: Maker, seed: int) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return train(problem, data, make, seed)
    except Exception as err:  # noqa: BLE001 - reported in the table (singd on attention)
        return {"error": f"{type(err).__name__}: {err}"}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.pstdev(values),
            "min": min(values), "max": max(values)}


def run_problem(name: str, problem: Problem, seeds: int, quick: bool) -> dict:
    data = problem.make_data()
    table = methods(problem, data, quick)
    runs: dict[str, list[dict]] = {m: [] for m in table}
    for seed in range(seeds):  # methods interleaved: the same machine load for each
        for method, (_, make) in table.items():
            runs[method].append(_run(problem, data, make, seed))
    result = {}
    adamw_step = statistics.fmean(r["step_s"] for r in runs["AdamW-default"])
    for method, (lr, _) in table.items():
        ok = [r for r in runs[method] if "error" not in r]
        entry: dict = {"lr": lr, "runs": runs[method]}
        if ok:
            for key in ("test_loss", "train_loss", "step_s", "test_acc"):
                if key in ok[0]:
                    entry[key] = _stats([r[key] for r in ok])
            entry["step_over_adamw"] = entry["step_s"]["mean"] / adamw_step
        else:
            entry["error"] = runs[method][0]["error"]
        result[method] = entry
        print(f"{name:12s} {method:14s} " + (
            f"{_key(problem)} {entry[_key(problem)]['mean']:.4f} ± "
            f"{entry[_key(problem)]['sd']:.4f}  train {entry['train_loss']['mean']:.4f}  "
            f"step/AdamW {entry['step_over_adamw']:.2f}" if ok else entry["error"][:80]),
            flush=True)
    return result


def goals(results: dict, suite: dict[str, Problem]) -> dict[str, dict]:
    """NGD-default vs AdamW-default (test metric) and vs NGD-frozen (training loss)."""
    out = {}
    for name, entries in results.items():
        problem = suite[name]
        key = _key(problem)
        sign = 1 if problem.classification else -1  # accuracy up, loss down
        ngd, adamw, frozen = (entries[m] for m in ("NGD-default", "AdamW-default", "NGD-frozen"))
        margin = frozen["train_loss"]["mean"] - ngd["train_loss"]["mean"]
        spread = max(s["train_loss"]["max"] - s["train_loss"]["min"] for s in (ngd, frozen))
        separated = ngd["train_loss"]["max"] < frozen["train_loss"]["min"]
        out[name] = {
            "beats_adamw_default": sign * (ngd[key]["mean"] - adamw[key]["mean"]) >= 0,
            "train_loss_margin_vs_frozen": margin, "seed_spread": spread,
            "beats_frozen_outside_spread": bool(separated and margin > spread),
            "frozen_over_default_train_loss": frozen["train_loss"]["mean"]
            / ngd["train_loss"]["mean"],
        }
    return out


def _cell(entry: dict, key: str, digits: int = 4) -> str:
    if "error" in entry:
        return "fails"
    if key not in entry:
        return "–"
    return f"{entry[key]['mean']:.{digits}f} ± {entry[key]['sd']:.{digits}f}"


def markdown(results: dict, checks: dict, seeds: int, suite: dict[str, Problem]) -> str:
    lines = [f"## Out-of-the-box optimizers ({seeds} seeds, mean ± sd; fixed epoch budget)", "",
             "| model | method | lr | test acc | test loss | train loss | step / AdamW |",
             "|---|---|---|---|---|---|---|"]
    for name, entries in results.items():
        for method, e in entries.items():
            ratio = "–" if "error" in e else f"{e['step_over_adamw']:.2f}"
            lines.append(f"| {name} ({suite[name].epochs} ep) | {method} | {e['lr']:g} | "
                         f"{_cell(e, 'test_acc')} | {_cell(e, 'test_loss')} | "
                         f"{_cell(e, 'train_loss')} | {ratio} |")
    lines += ["", "| model | NGD-default ≥ AdamW-default | train loss frozen / default | "
              "margin | seed spread | outside spread |", "|---|---|---|---|---|---|"]
    for name, c in checks.items():
        lines.append(f"| {name} | {'yes' if c['beats_adamw_default'] else 'no'} | "
                     f"{c['frozen_over_default_train_loss']:.2f} | "
                     f"{c['train_loss_margin_vs_frozen']:.4f} | {c['seed_spread']:.4f} | "
                     f"{'yes' if c['beats_frozen_outside_spread'] else 'no'} |")
    errors = {e["error"] for es in results.values() for e in es.values() if "error" in e}
    lines += [""] + [f"- fails: `{err[:160]}`" for err in sorted(errors)]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Training loss (mean over seeds) against training wall time, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.4))
    for ax, (name, entries) in zip(axes, results.items()):
        for method, e in entries.items():
            curves = [r["curve"] for r in e["runs"] if "curve" in r]
            if not curves:
                continue
            n = len(curves[0])
            t = [statistics.fmean(c[i][0] for c in curves) for i in range(n)]
            loss = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
            ax.plot(t, loss, marker="o", ms=3, label=method)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("training seconds")
    axes[0].set_ylabel("training loss (epoch mean)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, half the epochs")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default benchmarks/results[/quick])")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = 2 if args.quick else 3
    start = time.perf_counter()
    suite = {name: replace(p, epochs=max(2, p.epochs // 2)) if args.quick else p
             for name, p in PROBLEMS.items()}
    results = {name: run_problem(name, problem, seeds, args.quick)
               for name, problem in suite.items()}
    checks = goals(results, suite)
    out = args.out or Path(__file__).parent / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "platform": platform.platform(), "seeds": seeds,
            "threads": 1, "seconds": time.perf_counter() - start,
            "epochs": {n: p.epochs for n, p in suite.items()}}
    (out / "optim_defaults.json").write_text(json.dumps(
        {"meta": meta, "results": results, "goals": checks}, indent=1))
    table = markdown(results, checks, seeds, suite)
    (out / "optim_defaults.md").write_text(table)
    plot(results, out / "optim_defaults.png")
    print(table)
    print(f"total {meta['seconds']:.0f} s → {out}")
    return checks


if __name__ == "__main__":
    main()
