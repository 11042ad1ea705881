"""Variational learning on digits: VariationalNGD against IVON, AdamW and StructuredNGD.

The digits MLP (64-128-128-10) and CNN of ``benchmarks/optim_digits.py`` (1200 train / 237
validation / 360 test, batch 64, 30 epochs, cosine lr decay). Each method runs every
configuration of its grid (IVON and VariationalNGD: 6 each, see ``METHODS``; AdamW and
StructuredNGD: 2 lrs) on 3 seeds in float32; the one with the best mean validation NLL is
reported, and trained again on the 3 seeds with bf16 *parameters* (model, inputs and optimizer
state in bf16 where the method keeps them so; logits cast to float32 for the loss). Test
accuracy, NLL, ECE (15 bins) and mean confidence minus accuracy use the Bayesian model average
over 32 posterior draws for IVON and VariationalNGD (``structvi.optim.predict``) and the point
prediction otherwise. Reported: mean ± std over seeds, seconds per epoch, optimizer-state
bytes, and per-step time over IVON's (methods interleaved, fastest of several rounds of whole
factor-update periods, CPU time: robust to load on a shared machine). A reliability diagram
(float32, the seeds' test points pooled) goes to the PNG. Three seeds cannot separate ECEs of
0.01 and 0.012 (one test image is 0.0028 of accuracy), so VariationalNGD is also compared with
IVON at the configurations the table chose on 12 more seeds, paired (same split and data order
per seed: the mean difference, its standard error and the number of seeds where VariationalNGD
is better; ``--more-seeds``), and on 24 resampled splits (each seed its own partition; the
test points of all splits pooled, so the ECE's floor and noise shrink with the number of splits,
which more seeds on one fixed 360-point test split cannot do; 95 % intervals from a bootstrap
over the splits; ``--resampled``, ``--resampled-only`` to add it to an existing JSON).

Run: ``python -m benchmarks.bayesian_digits [--quick]``
→ ``benchmarks/results/bayesian_digits.{json,md,png}`` (``--quick``: ``results/quick/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.optim_digits import NGD, cnn, digits_split, mlp, state_bytes
from structvi.optim import StructuredNGD, VariationalNGD, calibration, ece_floor, predict

MODELS = {"MLP 64-128-128-10": mlp, "CNN": cnn}
SAMPLES = 32
MIN_BIN = 5
# VariationalNGD's fixed settings: a factor update every 40 steps at β₁ = 0.2 (the factor movement
# per step of T = 10 at 0.05, a quarter of the update cost) and training draws in antithetic
# pairs across steps (every second draw reuses the first's noise product: half the draw cost).
# Checked against T = 10 and T = 20 with independent and paired draws on 12 seeds of both models
# (validation and test NLL, ECE, accuracy within the seeds' spread; benchmarks/vngd_step.py,
# docs/variational.md).
VNGD = dict(T=40, lr_cov=0.2, alpha1=0.5, momentum=0.9, antithetic="steps")


def _ivon(model: nn.Module, cfg: dict, n: int) -> torch.optim.Optimizer:
    """IVON with ``ess = N / τ`` (``temperature`` τ as for VariationalNGD; default 1)."""
    import ivon

    cfg = dict(cfg)
    return ivon.IVON(model.parameters(), ess=n / cfg.pop("temperature", 1.0), **cfg)


def _vngd(structures: str) -> Callable:
    def make(model: nn.Module, cfg: dict, n: int) -> torch.optim.Optimizer:
        return VariationalNGD(model, data_size=n, structures=structures, **{**VNGD, **cfg})
    return make


def _ngd(model: nn.Module, cfg: dict, n: int) -> torch.optim.Optimizer:
    del n
    fp32 = (torch.float32, torch.float32) if next(model.parameters()).dtype == torch.bfloat16 \
        else (None, None)
    return StructuredNGD(model, structures="dense", preconditioner_dtype=fp32, **{**NGD, **cfg})


def _adamw(model: nn.Module, cfg: dict, n: int) -> torch.optim.Optimizer:
    del n
    return torch.optim.AdamW(model.parameters(), **cfg)


# Each Bayesian method gets a grid of 6 configurations, chosen on other seeds (100-102) by the
# same rule for every method (``--select-grid``, record in ``results/bayesian_digits_grid.json``):
# of 16 candidates (``CANDIDATES``), the 6 with the best validation NLL averaged over the two
# models and the 3 seeds. IVON's candidates: lr × (temperature ``N/ess``, hess_init) around its
# best lr. VariationalNGD's: lr × temperature τ with δ = 3 and the extra factor damping
# γ = 1e-2 (StructuredNGD's damping), plus δ = 10, γ and lr variants. Without γ
# the factor damping is the prior's λ = τδ/N ~ 1e-4: the natural-gradient step is almost
# unbounded in flat directions, and lr = 1e-2 diverges on some seeds (see docs/variational.md).
def _v(lr: float = 1e-2, temperature: float = 0.1, prior_precision: float = 3.0,
       extra_damping: float = 1e-2) -> dict:
    return dict(lr=lr, prior_precision=prior_precision, temperature=temperature,
                extra_damping=extra_damping)


def _i(lr: float, temperature: float, hess_init: float) -> dict:
    return dict(lr=lr, temperature=temperature, hess_init=hess_init)


# The last 3 candidates of each method were added later, by one rule for both: the 3 best on
# the digits MLP's validation split of seeds 100-102 among configurations that raise the
# damping (γ; IVON: hess_init) together with the step size (lr), i.e. a narrower posterior at a
# similar step — VariationalNGD: at τ = 0.3 (the temperature selected before), γ ∈ {0.03, 0.1,
# 0.3} × lr ∈ {0.03, 0.1} from the damping probe of benchmarks/digits_calibration.py (6);
# IVON: lr 2.4 and 3.2 with (τ, h0) ∈ {(0.3, 0.6), (0.5, 1), (1, 2)} and two colder ones (8).
_VNGD_CANDIDATES = [_v(lr, t) for lr in (5e-3, 1e-2) for t in (0.03, 0.1, 0.3)] + [
    _v(temperature=0.05), _v(temperature=0.2), _v(extra_damping=3e-2),
    _v(temperature=0.3, extra_damping=3e-2), _v(prior_precision=10.0),
    _v(temperature=0.3, prior_precision=10.0), _v(lr=2e-2),
    _v(lr=3e-2, temperature=0.3, extra_damping=3e-2), _v(lr=0.1, temperature=0.3,
                                                         extra_damping=0.3),
    _v(lr=3e-2, temperature=0.3, extra_damping=0.1)]
CANDIDATES = {
    "IVON": [_i(lr, t, t) for lr in (0.5, 1.2, 2.0) for t in (1.0, 0.3)] + [
        _i(0.8, 1.0, 1.0), _i(0.8, 0.3, 0.3), _i(1.6, 1.0, 1.0), _i(1.6, 0.3, 0.3),
        _i(1.2, 1.0, 0.3), _i(1.2, 0.5, 0.5), _i(1.2, 0.1, 0.1),
        _i(2.4, 1.0, 2.0), _i(2.4, 0.3, 0.6), _i(1.2, 0.2, 0.2)],
    "VariationalNGD-dense": _VNGD_CANDIDATES,
    "VariationalNGD-diagonal": _VNGD_CANDIDATES,
}
# the 6 best candidates of each method on seeds 100-102 (``--select-grid``), best first
_IVON_GRID = [_i(1.6, 0.3, 0.3), _i(1.2, 1.0, 1.0), _i(2.0, 0.3, 0.3), _i(1.2, 0.5, 0.5),
              _i(1.2, 0.3, 0.3), _i(1.6, 1.0, 1.0)]
_VNGD_DENSE_GRID = [_v(lr=0.1, temperature=0.3, extra_damping=0.3), _v(temperature=0.3),
                    _v(prior_precision=10.0), _v(lr=3e-2, temperature=0.3, extra_damping=0.1),
                    _v(temperature=0.2), _v(temperature=0.3, extra_damping=3e-2)]
_VNGD_DIAGONAL_GRID = [_v(lr=0.1, temperature=0.3, extra_damping=0.3), _v(prior_precision=10.0),
                       _v(lr=3e-2, temperature=0.3, extra_damping=0.1), _v(lr=5e-3),
                       _v(temperature=0.3, extra_damping=3e-2), _v(extra_damping=3e-2)]
# name → (factory(model, config, data_size), configurations tried, Bayesian prediction)
METHODS: dict[str, tuple[Callable, list[dict], bool]] = {
    "AdamW": (_adamw, [dict(lr=3e-3), dict(lr=1e-2)], False),
    "StructuredNGD-dense": (_ngd, [dict(lr=3e-3), dict(lr=1e-2)], False),
    "IVON": (_ivon, _IVON_GRID, True),
    "VariationalNGD-dense": (_vngd("dense"), _VNGD_DENSE_GRID, True),
    "VariationalNGD-diagonal": (_vngd("diagonal"), _VNGD_DIAGONAL_GRID, True),
}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    draw = opt.sampled_params(train=True) if hasattr(opt, "sampled_params") else (
        contextlib.nullcontext())
    with draw:
        nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()


def predictive_probs(model: nn.Module, opt, X: Tensor, bayes: bool, seed: int) -> Tensor:
    """Predictive probabilities on ``X``: the model average of ``SAMPLES`` seeded draws
    (``bayes``) or the point prediction."""
    model.eval()
    torch.manual_seed(10_000 + seed)  # IVON draws from the global generator
    gen = torch.Generator().manual_seed(seed) if isinstance(opt, VariationalNGD) else None
    probs = predict(model, opt, X, samples=SAMPLES if bayes else 0, generator=gen)
    model.train()
    return probs


def evaluate(model: nn.Module, opt, X: Tensor, y: Tensor, bayes: bool, seed: int,
             floor: bool = False) -> dict:
    probs = predictive_probs(model, opt, X, bayes, seed)
    out = calibration(probs, y)
    out["nll"] = min(out["nll"], 1e9)
    out["conf"] = probs.max(-1).values.float().mean().item()  # < acc: underconfident
    if floor:  # the ECE a calibrated predictor with these probabilities would show
        out["ece_floor"] = ece_floor(probs, draws=100, generator=torch.Generator().manual_seed(
            seed))
    return out


def train(model_name: str, method: str, cfg: dict, data: dict, epochs: int, seed: int,
          bf16: bool, step: Callable | None = None) -> tuple[nn.Module, Any, dict, list[float]]:
    """Train ``model_name`` with ``method`` at ``cfg`` (cosine decay, batch 64, data order from
    ``seed``): ``(model, optimizer, data in the model's dtype, seconds per epoch)``. ``step``
    replaces :func:`train_step` (same signature)."""
    make_opt = METHODS[method][0]
    step = step or train_step
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = model.to(dtype)
    split = {k: (X.to(dtype), y) for k, (X, y) in data.items()}
    Xtr, ytr = split["train"]
    opt = make_opt(model, cfg, len(ytr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(ytr) // 64))
    gen = torch.Generator().manual_seed(seed)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            step(model, opt, Xtr[idx], ytr[idx])
            sched.step()
        seconds.append(time.perf_counter() - start)
    return model, opt, split, seconds


def run(model_name: str, method: str, cfg: dict, data: dict, epochs: int, seed: int,
        bf16: bool, keep_bins: bool = False) -> dict:
    bayes = METHODS[method][2]
    model, opt, split, seconds = train(model_name, method, cfg, data, epochs, seed, bf16)
    val = evaluate(model, opt, *split["val"], bayes, seed)
    test = evaluate(model, opt, *split["test"], bayes, seed, floor=True)
    result = dict(config=cfg, seed=seed, val_acc=val["acc"], val_nll=val["nll"],
                  acc=test["acc"], nll=test["nll"], ece=test["ece"], ece_floor=test["ece_floor"],
                  conf_minus_acc=test["conf"] - test["acc"],
                  sec_per_epoch=sum(seconds) / epochs, state_bytes=state_bytes(opt))
    if keep_bins:
        result["bins"] = test["bins"]
    return result


def step_over_ivon(model_name: str, chosen: dict[str, dict], data: dict, steps: int,
                   rounds: int) -> dict:
    """Per-step time of every (method, precision) over IVON's at the same precision: the
    methods interleaved round after round, each keeping its fastest round, on the process's CPU
    time (robust to load on a shared machine), cycling through the first training batches.

    Raises:
        RuntimeError: a method skipped a step while timed (a skipped step is cheaper: the
            ratio would be wrong).
    """
    X, y = data["train"]
    batches = [(X[i:i + 64], y[i:i + 64]) for i in range(0, len(y) - 63, 64)]
    configs = {}
    for method, cfg in chosen.items():
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            torch.manual_seed(0)
            model = MODELS[model_name]().to(dtype)
            configs[method, precision] = (model, METHODS[method][0](model, cfg, 1200),
                                          [(Xb.to(dtype), yb) for Xb, yb in batches])
    times: dict = {key: [] for key in configs}
    for model, opt, data_ in configs.values():
        for i in range(10):
            train_step(model, opt, *data_[i % len(data_)])
    for r in range(rounds):
        for key, (model, opt, data_) in configs.items():
            start = time.process_time()
            for i in range(steps):
                train_step(model, opt, *data_[(10 + r * steps + i) % len(data_)])
            times[key].append((time.process_time() - start) / steps)
    for (method, precision), (_, opt, _) in configs.items():
        if getattr(opt, "skipped_steps", 0):
            raise RuntimeError(f"{model_name} {method} {precision}: {opt.skipped_steps} steps "
                               "skipped while timed")
    best = {key: min(t) for key, t in times.items()}
    return {f"{m}|{p}": dict(step_s=s, over_ivon=s / best.get(("IVON", p), float("nan")))
            for (m, p), s in best.items()}


def _cfg(cfg: dict) -> str:
    short = {"prior_precision": "δ", "temperature": "τ", "extra_damping": "γ",
             "hess_init": "h0"}
    return " ".join(f"{short.get(k, k)}={v:g}" for k, v in cfg.items())


def _summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("acc", "nll", "ece", "ece_floor", "conf_minus_acc", "sec_per_epoch"):
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["state_bytes"] = runs[0]["state_bytes"]
    return out


def table(methods: list[str], epochs: int, grid: int | None, seeds: list[int], steps: int,
          rounds: int) -> dict:
    data = digits_split()
    results: dict = {}
    for model_name in MODELS:
        results[model_name] = entries = {}
        for method in methods:
            # every configuration on every seed (fp32); keep the best mean validation NLL
            tried = [[run(model_name, method, cfg, data, epochs, s, False,
                          keep_bins=True) for s in seeds]
                     for cfg in METHODS[method][1][:grid]]
            runs = min(tried, key=lambda rs: statistics.fmean(r["val_nll"] for r in rs))
            cfg = runs[0]["config"]
            entry = dict(config=cfg, grid=[(rs[0]["config"],
                                            statistics.fmean(r["val_nll"] for r in rs))
                                           for rs in tried])
            bf16 = [run(model_name, method, cfg, data, epochs, s, True) for s in seeds]
            for precision, chosen in (("fp32", runs), ("bf16", bf16)):
                entry[precision] = e = dict(runs=chosen, **_summary(chosen))
                print(f"{model_name:18s} {method:24s} {precision} {_cfg(cfg)} acc {e['acc']:.4f}"
                      f" nll {e['nll']:.3f} ece {e['ece']:.3f} conf-acc {e['conf_minus_acc']:+.3f}"
                      f" {e['sec_per_epoch']:.3f} s/epoch", flush=True)
            entries[method] = entry
        ratios = step_over_ivon(model_name, {m: e["config"] for m, e in entries.items()}, data,
                                steps, rounds)
        for key, value in ratios.items():
            method, precision = key.split("|")
            entries[method][precision].update(value)
    return results


GRID_SIZE = 6
PAIRED_METHODS = ("VariationalNGD-dense", "VariationalNGD-diagonal")


def paired(results: dict, seeds: list[int], epochs: int) -> dict:
    """VariationalNGD against IVON on more seeds, each at the configuration the table chose:
    per model, precision and method, the per-seed differences (ours − IVON) of test NLL, ECE
    and accuracy, as mean, standard error and the count of seeds where ours is better (a
    paired comparison: both methods see the same split and data order on a seed)."""
    data = digits_split()
    out: dict = {}
    for model_name, methods in results.items():
        if "IVON" not in methods:
            continue
        for precision, bf16 in (("fp32", False), ("bf16", True)):
            ivon = [run(model_name, "IVON", methods["IVON"]["config"], data, epochs, s, bf16)
                    for s in seeds]
            for name in PAIRED_METHODS:
                if name not in methods:
                    continue
                ours = [run(model_name, name, methods[name]["config"], data, epochs, s, bf16)
                        for s in seeds]
                row = {}
                for run_ in (*ours, *ivon):
                    run_["ece_excess"] = run_["ece"] - run_["ece_floor"]
                for key, better in (("nll", -1), ("ece", -1), ("ece_excess", -1), ("acc", 1)):
                    diffs = [o[key] - i[key] for o, i in zip(ours, ivon)]
                    row[key] = dict(
                        mean=statistics.fmean(diffs),
                        se=statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0,
                        better=sum(1 for d in diffs if d * better > 0),
                        ours=statistics.fmean(o[key] for o in ours),
                        ivon=statistics.fmean(i[key] for i in ivon))
                out[f"{model_name}|{name}|{precision}"] = row
                print(f"paired {model_name:18s} {name:24s} {precision} " + " ".join(
                    f"{k} {v['mean']:+.4f}±{v['se']:.4f} ({v['better']}/{len(seeds)})"
                    for k, v in row.items()), flush=True)
    return out


def comparison_markdown(title: str, intro: str, columns: list[str], rows: dict,
                        cells: Callable[[dict], list[str]]) -> str:
    """A ``## title`` section: ``intro``, then a table of one line per ``rows`` key
    (``model|method|precision``) with ``cells(row)`` after those three columns."""
    lines = [f"## {title}", "", intro, "",
             "| model | method | precision | " + " | ".join(columns) + " |",
             "|" + "---|" * (3 + len(columns))]
    for key, row in rows.items():
        lines.append("| " + " | ".join(key.split("|") + cells(row)) + " |")
    return "\n".join(lines) + "\n"


def paired_markdown(rows: dict, seeds: list[int]) -> str:
    def cells(row: dict) -> list[str]:
        out = []
        for k, digits in (("nll", 3), ("ece", 4), ("ece_excess", 4), ("acc", 4)):
            v = row[k]
            out += [f"{v['ours']:.{digits}f} / {v['ivon']:.{digits}f}",
                    f"{v['mean']:+.{digits}f} ± {v['se']:.{digits}f}",
                    f"{v['better']}/{len(seeds)}"]
        return out

    return comparison_markdown(
        f"Against IVON on {len(seeds)} more seeds",
        f"Seeds {seeds[0]}-{seeds[-1]}, each method at the configuration chosen above; per "
        "seed the difference ours − IVON on the test split (same split and data order for "
        "both): mean ± standard error, and on how many seeds ours is better. `ECE − floor`: "
        "the ECE less the ECE a calibrated predictor with the same probabilities would "
        "show on the 360 test points (`structvi.optim.ece_floor`; binned ECE is biased "
        "upwards, the more so the more middling the confidences).",
        ["test NLL (ours / IVON)", "Δ NLL", "better", "ECE (ours / IVON)", "Δ ECE", "better",
         "ECE − floor (ours / IVON)", "Δ", "better", "acc (ours / IVON)", "Δ acc", "better"],
        rows, cells)


BINS = 15  # as structvi.optim.calibration
FAILED_ACC = 0.5  # a run below this test accuracy did not train


def split_stats(probs: Tensor, y: Tensor) -> dict:
    """What pooling needs of one run's test predictions, from
    :func:`structvi.optim.calibration` (``BINS`` bins): per confidence bin the count, summed
    confidence and summed correct predictions (``bins``, shape ``(BINS, 3)``), the summed NLL
    and the number of points."""
    cal = calibration(probs, y, bins=BINS)
    bins = torch.tensor([[b["count"], b["count"] * (b["conf"] or 0.0),
                          b["count"] * (b["acc"] or 0.0)] for b in cal["bins"]],
                        dtype=torch.float64)
    return dict(bins=bins, nll=cal["nll"] * len(y), n=len(y))


def pooled(stats: list[dict], weights: Tensor) -> dict[str, Tensor]:
    """NLL, ECE and accuracy of the pooled test points of several runs, each run counted
    ``weights[..., i]`` times (a bootstrap draw of runs: ``weights`` of shape ``(B, runs)``
    gives ``B`` values of each)."""
    bins = torch.stack([s["bins"] for s in stats])  # (runs, BINS, 3)
    total = torch.einsum("...r,rkc->...kc", weights.double(), bins)
    n = total[..., 0].sum(-1)
    nll = weights.double() @ torch.tensor([s["nll"] for s in stats], dtype=torch.float64)
    return dict(nll=nll / n, ece=(total[..., 2] - total[..., 1]).abs().sum(-1) / n,
                acc=total[..., 2].sum(-1) / n)


def bootstrap_weights(runs: int, draws: int, generator: torch.Generator) -> Tensor:
    """``(draws, runs)`` multiplicities of ``runs`` drawn with replacement ``draws`` times."""
    picks = torch.randint(runs, (draws, runs), generator=generator)
    return torch.zeros(draws, runs).scatter_add_(1, picks, torch.ones(draws, runs))


def compare_pooled(ours: list[dict], ivon: list[dict], draws: int = 2000,
                   seed: int = 0) -> dict:
    """Ours against IVON on the pooled test points of paired runs (run ``i`` of both on the
    same split): the pooled NLL, ECE and accuracy of each, and for their difference
    (ours − IVON) a 95 % percentile interval and the share of draws where ours is better, from
    a bootstrap over the splits (the same draw of splits for both methods)."""
    if len(ours) != len(ivon) or not ours:
        raise ValueError(f"need as many runs of ours as of IVON (>= 1), got {len(ours)} and "
                         f"{len(ivon)}")
    weights = bootstrap_weights(len(ours), draws, torch.Generator().manual_seed(seed))
    ones = torch.ones(len(ours))
    out = {}
    for key, better in (("nll", -1), ("ece", -1), ("acc", 1)):
        a, b = pooled(ours, ones)[key], pooled(ivon, ones)[key]
        diff = pooled(ours, weights)[key] - pooled(ivon, weights)[key]
        lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=diff.dtype)).tolist()
        out[key] = dict(ours=float(a), ivon=float(b), diff=float(a - b), lo=lo, hi=hi,
                        p_better=float((diff * better > 0).double().mean()))
    return out


def resampled(results: dict, seeds: list[int], epochs: int) -> dict:
    """VariationalNGD against IVON on resampled splits: seed ``s`` draws its own
    train/validation/test partition (``digits_split(s)``) and data order, both methods train at
    the configurations the table chose, and the test points of all splits are pooled
    (``compare_pooled``: 360 × splits points, so the ECE's floor and noise shrink with the
    number of splits, unlike on one fixed test split). Also the per-split ECE differences
    (mean, standard error, splits where ours is lower) and the runs that did not train (test
    accuracy < ``FAILED_ACC``)."""
    out: dict = {}
    splits = {s: digits_split(s) for s in seeds}
    for model_name, methods in results.items():
        if "IVON" not in methods:
            continue
        for precision, bf16 in (("fp32", False), ("bf16", True)):
            stats: dict = {}
            floors: dict = {}
            for name in ("IVON",) + PAIRED_METHODS:
                if name not in methods:
                    continue
                stats[name], probs = [], []
                for s in seeds:
                    model, opt, split, _ = train(model_name, name, methods[name]["config"],
                                                 splits[s], epochs, s, bf16)
                    X, y = split["test"]
                    probs.append(predictive_probs(model, opt, X, True, s).float())
                    stats[name].append(split_stats(probs[-1], y))
                # the pooled ECE of a calibrated predictor with these probabilities
                floors[name] = ece_floor(torch.cat(probs), draws=100,
                                         generator=torch.Generator().manual_seed(0))
            ivon = stats.pop("IVON")
            for name, ours in stats.items():
                row = compare_pooled(ours, ivon)
                row["ece"].update(floor_ours=floors[name], floor_ivon=floors["IVON"])
                for key, runs in (("ours", ours), ("ivon", ivon)):
                    per = [pooled([r], torch.ones(1)) for r in runs]
                    row["failed_" + key] = sum(float(p["acc"]) < FAILED_ACC for p in per)
                    row["ece_" + key + "_per_split"] = [float(p["ece"]) for p in per]
                diffs = [a - b for a, b in zip(row["ece_ours_per_split"],
                                               row["ece_ivon_per_split"])]
                row["ece_per_split"] = dict(
                    mean=statistics.fmean(diffs),
                    se=statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0,
                    better=sum(d < 0 for d in diffs))
                out[f"{model_name}|{name}|{precision}"] = row
                print(f"resampled {model_name:18s} {name:24s} {precision} " + " ".join(
                    f"{k} {row[k]['ours']:.4f}/{row[k]['ivon']:.4f} "
                    f"[{row[k]['lo']:+.4f}, {row[k]['hi']:+.4f}]" for k in ("nll", "ece", "acc"))
                    + f" failed {row['failed_ours']}/{row['failed_ivon']}", flush=True)
    return out


def resampled_markdown(rows: dict, seeds: list[int]) -> str:
    def cells(row: dict) -> list[str]:
        out = []
        for k, digits in (("nll", 3), ("ece", 4)):
            v = row[k]
            floors = (f" (floor {v['floor_ours']:.4f} / {v['floor_ivon']:.4f})"
                      if "floor_ours" in v else "")
            out += [f"{v['ours']:.{digits}f} / {v['ivon']:.{digits}f}{floors}",
                    f"{v['diff']:+.{digits}f} [{v['lo']:+.{digits}f}, {v['hi']:+.{digits}f}]",
                    f"{v['p_better']:.2f}"]
        e, v = row["ece_per_split"], row["acc"]
        return out + [f"{e['mean']:+.4f} ± {e['se']:.4f} ({e['better']}/{len(seeds)})",
                      f"{v['ours']:.4f} / {v['ivon']:.4f}",
                      f"{v['diff']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]",
                      f"{row['failed_ours']} / {row['failed_ivon']}"]

    return comparison_markdown(
        f"Against IVON on {len(seeds)} resampled splits (seeds {seeds[0]}-{seeds[-1]})",
        "Each seed with its own train/validation/test partition of digits and data order, "
        "both methods at the configurations chosen above; the test points of all splits "
        f"pooled ({len(seeds)} × 360). Δ: ours − IVON on the pooled points, with a 95 % "
        "interval from 2000 bootstrap draws of the splits (the same draw for both methods); "
        "`P`: the share of draws where ours is better. `failed`: runs below 50 % test "
        "accuracy (ours / IVON), included in the pools. `per split`: the mean ECE difference "
        "± standard error and on how many splits ours is better.",
        ["NLL (ours / IVON)", "Δ NLL [95 %]", "P", "ECE (ours / IVON)", "Δ ECE [95 %]", "P",
         "ECE per split", "acc (ours / IVON)", "Δ acc [95 %]", "failed"], rows, cells)


def select_grids(methods: list[str], seeds: list[int], epochs: int = 30) -> dict:
    """Every candidate of ``CANDIDATES`` on both models and ``seeds`` (float32); the grid of a
    method is its ``GRID_SIZE`` candidates with the best validation NLL averaged over the
    models and seeds (the same rule for every method)."""
    data = digits_split()
    record: dict = dict(seeds=seeds, epochs=epochs, methods={})
    for method in methods:
        rows = []
        for cfg in CANDIDATES[method]:
            val = {m: [run(m, method, cfg, data, epochs, s, False)["val_nll"] for s in seeds]
                   for m in MODELS}
            rows.append(dict(config=cfg, val_nll={m: statistics.fmean(v) for m, v in
                                                  val.items()}, per_seed=val))
            print(f"{method:24s} {_cfg(cfg):40s} " + " ".join(
                f"{m[:3]} {v:.4f}" for m, v in rows[-1]["val_nll"].items()), flush=True)
        record["methods"][method] = dict(candidates=rows, grid=top_grid(rows))
    return record


def top_grid(rows: list[dict]) -> list[dict]:
    """The ``GRID_SIZE`` configurations of ``rows`` with the lowest validation NLL averaged
    over the models, best first."""
    return [r["config"] for r in sorted(rows, key=lambda r: statistics.fmean(
        r["val_nll"].values()))[:GRID_SIZE]]


def markdown(results: dict, seeds: list[int]) -> str:
    lines = [f"Mean ± std over {len(seeds)} seed(s); test split; Bayesian methods average "
             f"{SAMPLES} draws; config: the best mean validation NLL of the method's grid "
             f"(float32; bf16 reuses it; grids of {GRID_SIZE} per Bayesian method: the best "
             f"validation NLL on seeds 100-102 among {len(CANDIDATES['IVON'])} candidates, see "
             f"bayesian_digits_grid.json). `conf − acc`: mean top-class probability minus "
             "accuracy (< 0: underconfident). `step / IVON`: per-step time over IVON's, "
             "interleaved, same precision (the time comparison); `s/epoch`: wall time of "
             "the training runs, one after another (load on the machine shows in it).", ""]
    for precision, title in (("fp32", "float32"), ("bf16", "bf16 parameters")):
        lines += [f"## {title}", "", "| model | method | config | test acc | test NLL | ECE "
                  "| ECE floor | conf − acc | s/epoch | step / IVON | state MiB |",
                  "|" + "---|" * 11]
        for model_name, methods in results.items():
            for name, entry in methods.items():
                e = entry[precision]
                lines.append(
                    f"| {model_name} | {name} | {_cfg(entry['config'])} | {e['acc']:.4f} ± "
                    f"{e['acc_std']:.4f} | {e['nll']:.3f} ± {e['nll_std']:.3f} | "
                    f"{e['ece']:.3f} ± {e['ece_std']:.3f} | {e['ece_floor']:.3f} | "
                    f"{e['conf_minus_acc']:+.3f} | "
                    f"{e['sec_per_epoch']:.3f} | {e.get('over_ivon', 0):.2f} "
                    f"| {e['state_bytes'] / 2**20:.3f} |")
        lines.append("")
    return "\n".join(lines)


GOALS_NOTE = ("On the three seeds: the means of the table. On the resampled splits: NLL and "
              "ECE lower when the 95 % interval of ours − IVON lies below 0, accuracy not "
              "lower when the pooled accuracy is at least IVON's.")


def goals(results: dict, comparisons: list[dict] | None = None) -> dict:
    """VariationalNGD against IVON: NLL and ECE lower, accuracy not lower, step ≤ 1.5× IVON;
    on the three seeds' means, and on the pooled points of each resampled-split comparison
    (``{"seeds", "rows"}`` of :func:`resampled`; NLL and ECE: the 95 % interval of the
    difference below 0; accuracy: the pooled difference ≥ 0)."""
    out = {}
    for model_name, methods in results.items():
        if "IVON" not in methods:
            continue
        for name, entry in methods.items():
            if not name.startswith("VariationalNGD"):
                continue
            for precision in ("fp32", "bf16"):
                ours, ivon = entry[precision], methods["IVON"][precision]
                tag = f"{model_name} {name} {precision}"
                out[f"{tag}: NLL < IVON"] = (ours["nll"] < ivon["nll"],
                                              [round(ours["nll"], 4), round(ivon["nll"], 4)])
                out[f"{tag}: ECE < IVON"] = (ours["ece"] < ivon["ece"],
                                              [round(ours["ece"], 4), round(ivon["ece"], 4)])
                out[f"{tag}: acc >= IVON"] = (ours["acc"] >= ivon["acc"],
                                               [round(ours["acc"], 4), round(ivon["acc"], 4)])
                ratio = ours.get("over_ivon", float("nan"))
                out[f"{tag}: step <= 1.5x IVON"] = (ratio <= 1.5, round(ratio, 2))
    for comparison in comparisons or []:
        span = f"{comparison['seeds'][0]}-{comparison['seeds'][-1]}"
        for key, row in comparison["rows"].items():
            tag = " ".join(key.split("|")) + f", resampled splits {span} pooled"
            for k, label in (("nll", "NLL < IVON"), ("ece", "ECE < IVON")):
                v = row[k]
                out[f"{tag}: {label}"] = (v["hi"] < 0, [
                    round(v["ours"], 4), round(v["ivon"], 4), [round(v["lo"], 4),
                                                               round(v["hi"], 4)]])
            v = row["acc"]
            out[f"{tag}: acc >= IVON"] = (v["diff"] >= 0, [round(v["ours"], 4),
                                                           round(v["ivon"], 4)])
    return {k: {"met": bool(v[0]), "value": v[1]} for k, v in out.items()}


def pooled_bins(runs: list[dict]) -> list[dict]:
    """The reliability bins of several runs (seeds) pooled: counts added, accuracy and
    confidence averaged with the counts as weights."""
    pooled = []
    for parts in zip(*(r["bins"] for r in runs)):
        count = sum(b["count"] for b in parts)
        mean = (lambda key: sum(b["count"] * b[key] for b in parts if b["count"]) / count
                ) if count else (lambda key: None)
        pooled.append(dict(count=count, acc=mean("acc"), conf=mean("conf")))
    return pooled


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.8))
    for ax, (model_name, methods) in zip(axes, results.items()):
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        for name, entry in methods.items():
            e = entry["fp32"]
            bins = [b for b in pooled_bins(e["runs"]) if b["count"] >= MIN_BIN]  # no sparse bins
            ax.plot([b["conf"] for b in bins], [b["acc"] for b in bins], lw=1,
                    label=f"{name} (mean ECE {e['ece']:.3f}, NLL {e['nll']:.3f})")
            ax.scatter([b["conf"] for b in bins], [b["acc"] for b in bins],
                       s=[4 + b["count"] / 12 for b in bins])
        ax.set(title=f"{model_name}, float32", xlabel="confidence", ylabel="accuracy",
               xlim=(0.3, 1.0), ylim=(0.3, 1.0))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = len(next(iter(next(iter(results.values())).values()))["fp32"]["runs"])
    fig.suptitle(f"Reliability: the test points of {seeds} seed(s) pooled; bins with >= "
                 f"{MIN_BIN} points; marker area ~ count", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs, one seed, one lr")
    parser.add_argument("--out", default=None, help="JSON path (default by mode)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first..first+2 (the grids were chosen with 100)")
    parser.add_argument("--select-grid", action="store_true",
                        help="run every CANDIDATES configuration of the Bayesian methods on "
                             "seeds first..first+2 (use --first-seed 100) and write the "
                             "selection to results/bayesian_digits_grid.json")
    parser.add_argument("--more-seeds", type=int, default=12,
                        help="VariationalNGD against IVON, paired, on this many more seeds "
                             "(0: none; --quick: none)")
    parser.add_argument("--resampled", type=int, default=24,
                        help="VariationalNGD against IVON on this many resampled splits, test "
                             "points pooled (0: none; --quick: none)")
    parser.add_argument("--resampled-only", action="store_true",
                        help="run only a resampled-split comparison at the configurations of "
                             "an existing JSON and append it to that JSON and its tables "
                             "(earlier comparisons are kept; seeds must not repeat)")
    parser.add_argument("--resampled-first-seed", type=int, default=None,
                        help="first seed of the resampled splits (default: after every seed "
                             "the results used so far)")
    parser.add_argument("--rewrite", action="store_true",
                        help="rewrite the goals, tables and PNG from an existing JSON (no "
                             "training)")
    args = parser.parse_args(argv)
    if args.resampled < 0:
        parser.error(f"--resampled must be >= 0, got {args.resampled}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*no statistics were recorded.*")
    # timed windows of whole factor-update periods (T = 40 steps) after 10 warm-up steps
    epochs, grid, n_seeds, steps, rounds = (4, 1, 1, 40, 2) if args.quick else (30, None, 3,
                                                                                40, 7)
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    default = "benchmarks/results/" + ("quick/" if args.quick else "") + "bayesian_digits.json"
    out = Path(args.out or default)
    if args.select_grid:
        record = select_grids([m for m in args.methods if m in CANDIDATES], seeds, epochs)
        path = out.with_name(out.stem + "_grid.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # other methods' selections (same seeds and epochs) are kept
            old = json.loads(path.read_text())
            if old.get("seeds") == seeds and old.get("epochs") == epochs:
                record["methods"] = {**old["methods"], **record["methods"]}
        path.write_text(json.dumps(record, indent=1))
        return record
    if args.rewrite:
        return write(json.loads(out.read_text()), out)
    if args.resampled_only:
        result = json.loads(out.read_text())
        splits = resampled_seeds(result, args.resampled, args.resampled_first_seed)
        result.setdefault("resampled", []).append(dict(
            seeds=splits, rows=resampled(result["results"], splits, result["config"]["epochs"])))
        return write(result, out)
    results = table(args.methods, epochs, grid, seeds, steps, rounds)
    more = list(range(seeds[-1] + 1, seeds[-1] + 1 + (0 if args.quick else args.more_seeds)))
    rows = paired(results, more, epochs) if more else {}
    config = dict(quick=args.quick, epochs=epochs, grid_size=grid, seeds=seeds,
                  paired_seeds=more, samples=SAMPLES, vngd=VNGD, ngd=NGD,
                  torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine())
    result = dict(config=config, results=results, paired=rows, resampled=[])
    splits = resampled_seeds(result, 0 if args.quick else args.resampled,
                             args.resampled_first_seed)
    if splits:
        result["resampled"].append(dict(seeds=splits, rows=resampled(results, splits, epochs)))
    return write(result, out)


def resampled_seeds(result: dict, count: int, first: int | None) -> list[int]:
    """``count`` seeds for a resampled-split comparison of ``result``: from ``first``, or after
    every seed it used so far (table, paired and earlier resampled seeds).

    Raises:
        ValueError: a seed that ``result`` used already (a comparison must be independent of
            the earlier ones).
    """
    used = set(result["config"]["seeds"]) | set(result["config"].get("paired_seeds", []))
    for comparison in result.get("resampled", []):
        used |= set(comparison["seeds"])
    start = max(used) + 1 if first is None else first
    seeds = list(range(start, start + count))
    if used & set(seeds):
        raise ValueError(f"--resampled-first-seed {first}: seeds {sorted(used & set(seeds))} "
                         "were used already; expected seeds after " + str(max(used)))
    return seeds


def write(result: dict, out: Path) -> dict:
    """Goals, then the JSON, the markdown tables and the reliability diagram of ``result``."""
    config = result["config"]
    result["goals"] = goals(result["results"], result.get("resampled", []))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    text = markdown(result["results"], config["seeds"])
    if result.get("paired"):
        text += "\n" + paired_markdown(result["paired"], config["paired_seeds"])
    for comparison in result.get("resampled", []):
        text += "\n" + resampled_markdown(comparison["rows"], comparison["seeds"])
    text += "\n## Goals\n\n" + GOALS_NOTE + "\n\n" + "\n".join(
        f"- [{'x' if g['met'] else ' '}] {k}: {g['value']}" for k, g in result["goals"].items())
    out.with_suffix(".md").write_text(text + "\n")
    plot(result["results"], out.with_suffix(".png"))
    print(text)
    return result


if __name__ == "__main__":
    main()
