"""Out-of-the-box VariationalNGD against out-of-the-box IVON, at a constant learning rate.

A user's first run: ``VariationalNGD(model, data_size=N)`` with every default, and no
learning-rate schedule. The digits MLP (64-128-128-10, 60 epochs) and CNN (30 epochs) of
``benchmarks/bayesian_digits.py`` (1200 train / 237 validation / 360 test, batch 64), 6 seeds,
float32:

* ``VariationalNGD``: every default (``lr = 3e-3``, ``τ = 1``, ``δ = 1``, ``γ = 1e-2``).
* ``VariationalNGD γ=0``: the same with ``extra_damping = 0``, the default before it was
  ``1e-2``: the factor damping is then the prior's ``λ = τδ/N`` alone.
* ``VariationalNGD lr=1e-2``: the defaults with a larger learning rate (the benchmarks'
  ``lr``, there with a cosine schedule).
* ``IVON``: ``ivon.IVON(model.parameters(), lr, ess=N)`` with its defaults (``hess_init = 1``)
  at ``lr`` 0.5 and 1.2 (IVON has no default learning rate).

Reported per method (over the seeds): epochs whose mean training loss is a *spike* (more than
3 times the best earlier epoch and above 0.05, after the fifth), runs ending non-finite, median
and largest training loss of the last epoch, steps the optimizer skipped, and test NLL and
accuracy of the model average (32 draws).

Run: ``python -m benchmarks.vngd_defaults [--quick]`` →
``benchmarks/results/vngd_defaults.{json,md}`` (``--quick``: 2 seeds, 6 epochs, into
``results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.bayesian_digits import MODELS, evaluate
from benchmarks.optim_digits import digits_split
from structvi.optim import VariationalNGD

EPOCHS = {"MLP 64-128-128-10": 60, "CNN": 30}
SEEDS = 6


def _ivon(lr: float) -> Callable:
    def make(model: nn.Module, n: int) -> torch.optim.Optimizer:
        import ivon

        return ivon.IVON(model.parameters(), lr=lr, ess=n)
    return make


METHODS: dict[str, Callable[[nn.Module, int], torch.optim.Optimizer]] = {
    "VariationalNGD": lambda model, n: VariationalNGD(model, data_size=n),
    "VariationalNGD γ=0": lambda model, n: VariationalNGD(model, data_size=n, extra_damping=0.0),
    "VariationalNGD lr=1e-2": lambda model, n: VariationalNGD(model, data_size=n, lr=1e-2),
    "IVON lr=0.5": _ivon(0.5),
    "IVON lr=1.2": _ivon(1.2),
}


def spikes(losses: list[float]) -> int:
    """Epochs after the fifth whose loss is over 3 times the best before it and over 0.05
    (a non-finite epoch counts)."""
    return sum(1 for i in range(5, len(losses))
               if not math.isfinite(losses[i])
               or (losses[i] > 3 * min(losses[:i]) and losses[i] > 0.05))


def run(model_name: str, method: str, data: dict, epochs: int, seed: int) -> dict:
    """Train with ``method`` at a constant learning rate; the per-epoch training losses, the
    skipped steps and the test NLL and accuracy of the model average."""
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    Xtr, ytr = data["train"]
    opt = METHODS[method](model, len(ytr))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            opt.zero_grad()
            with opt.sampled_params(train=True):
                loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
                loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(ytr))
    test = evaluate(model, opt, *data["test"], True, seed)
    return dict(seed=seed, losses=losses, skipped=int(getattr(opt, "skipped_steps", 0)),
                nll=test["nll"], acc=test["acc"])


def summary(runs: list[dict]) -> dict:
    finals = [r["losses"][-1] for r in runs]
    finite = [f for f in finals if math.isfinite(f)]
    return dict(spikes=[spikes(r["losses"]) for r in runs],
                non_finite=len(finals) - len(finite),
                final_median=statistics.median(finite) if finite else math.inf,
                final_max=max(finite) if finite else math.inf,
                skipped=sum(r["skipped"] for r in runs),
                nll=statistics.median(r["nll"] for r in runs),
                acc=statistics.fmean(r["acc"] for r in runs))


def markdown(results: dict, seeds: int, epochs: dict[str, int]) -> str:
    lines = ["# Out-of-the-box VariationalNGD and IVON at a constant learning rate", "",
             f"{seeds} seeds, batch 64, no schedule; `spike epochs`: per seed, epochs whose "
             "training loss is over 3× the best before it (and over 0.05); `final loss`: "
             "training loss of the last epoch, median / largest over the seeds; test NLL "
             "(median over the seeds) and accuracy (mean) of the model average of 32 draws. "
             "`python -m benchmarks.vngd_defaults`.", "",
             "| model | method | spike epochs | non-finite runs | final loss | skipped steps | "
             "test NLL | test acc |", "|" + "---|" * 8]
    for model_name, methods in results.items():
        for method, s in methods.items():
            lines.append(
                f"| {model_name} ({epochs[model_name]} ep) | {method} | "
                f"{', '.join(map(str, s['spikes']))} | {s['non_finite']} | "
                f"{s['final_median']:.4f} / {s['final_max']:.4g} | {s['skipped']} | "
                f"{min(s['nll'], 1e9):.4g} | {s['acc']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 6 epochs")
    parser.add_argument("--out", default=None, help="JSON path (default by mode)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*no statistics were recorded.*")
    warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*outlier.*")
    seeds = 2 if args.quick else SEEDS
    data = digits_split()
    results: dict = {}
    budget = {m: 6 if args.quick else e for m, e in EPOCHS.items()}
    for model_name, epochs in budget.items():
        results[model_name] = {}
        for method in METHODS:
            runs = [run(model_name, method, data, epochs, seed) for seed in range(seeds)]
            results[model_name][method] = dict(summary(runs), runs=runs)
            print(model_name, method, {k: v for k, v in results[model_name][method].items()
                                       if k != "runs"}, flush=True)
    default = "benchmarks/results/" + ("quick/" if args.quick else "") + "vngd_defaults.json"
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = dict(quick=args.quick, seeds=seeds, epochs=budget, torch=torch.__version__,
                  machine=platform.processor() or platform.machine())
    out.write_text(json.dumps(dict(config=config, results=results), indent=1))
    out.with_suffix(".md").write_text(markdown(results, seeds, budget))
    return results


if __name__ == "__main__":
    main()
