"""Per-step cost of VariationalNGD and StructuredNGD over IVON's on the digits models.

One training step (``zero_grad``, a training draw where the method has one, forward, backward,
``step``) of the digits MLP (64-128-128-10) and CNN of ``benchmarks/bayesian_digits.py``, batch
64 (cycling through one epoch of the training split; a skipped step would be cheaper, so any
skip fails the run), in float32 and with bf16 parameters, for IVON, StructuredNGD-dense (non-variational) and
VariationalNGD with dense and diagonal factors (the configurations of the bayesian_digits table:
a factor update every ``T = 40`` steps and training draws in antithetic pairs across steps; every
timed window holds a whole number of factor-update periods). All (model, precision, method)
configurations are timed interleaved, round after round, and each keeps its fastest round; the
clock is the process's CPU time (``--clock wall``: elapsed time). Reported: milliseconds per step
(fastest round) and the ratio to IVON's at the same model and precision, as fastest over fastest
and as the median over rounds of the ratio within a round (issue 14's goal: VariationalNGD ≤ 1.5×
IVON). Next to VariationalNGD-dense: its compute floors (the dense products of every step, and
those plus one factor update per ``T`` steps).

The previous configuration is timed next to it: VariationalNGD-dense with ``T = 10``,
``lr_cov = 0.05`` (the same factor movement per step) and independent draws. The full run also
trains both on the digits MLP and CNN (12 seeds, float32, as ``benchmarks.bayesian_digits``
does) and reports validation and test NLL, test ECE and accuracy (``--no-quality``: timing only).

Run: ``python -m benchmarks.vngd_step [--quick]`` → ``benchmarks/results/vngd_step.{json,md}``
(``--quick``: ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks.bayesian_digits import METHODS, MODELS, VNGD, run, train_step
from benchmarks.optim_digits import digits_split

# a configuration of the bayesian_digits grids (the first of each when this was measured; the
# grids now start with lr 0.1, γ 0.3, τ 0.3, which bayesian_digits times itself). The extra
# factor damping γ = 1e-2 is included: without it the repeated batch makes VariationalNGD-dense
# diverge, and skipped steps would be timed
_VNGD_CFG = dict(lr=1e-2, prior_precision=3.0, temperature=0.1, extra_damping=1e-2)
PREVIOUS = dict(T=10, lr_cov=0.05, antithetic=False)  # before: T = 10, independent draws
CONFIGS = {
    "IVON": dict(lr=1.2, temperature=0.5, hess_init=0.5),
    "StructuredNGD-dense": dict(lr=1e-2),
    "VariationalNGD-dense": _VNGD_CFG,
    "VariationalNGD-diagonal": _VNGD_CFG,
    "VariationalNGD-dense previous": {**_VNGD_CFG, **PREVIOUS},
}


def setting(method: str, key: str):
    """The value of ``key`` (``"T"``, ``"antithetic"``) a configuration trains with."""
    return CONFIGS[method].get(key, VNGD[key])


def factory(method: str):
    """``METHODS``' factory of a configuration name (``"... previous"``: the base method's)."""
    return METHODS[method.split(" ")[0]][0]


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(batch: int = 64) -> dict[tuple[str, str, str], tuple]:
    """Every (model, precision, method): ``(model, optimizer, batches)`` after seed 0, the
    batches those of one epoch of the digits training split in order."""
    data = digits_split(0)
    X, y = data["train"]
    batches = [(X[i:i + batch], y[i:i + batch]) for i in range(0, len(y) - batch + 1, batch)]
    configs = {}
    for model_name, make_model in MODELS.items():
        for precision, dtype in PRECISIONS.items():
            for method, cfg in CONFIGS.items():
                torch.manual_seed(0)
                model = make_model().to(dtype)
                opt = factory(method)(model, cfg, 1200)
                configs[model_name, precision, method] = (
                    model, opt, [(Xb.to(dtype), yb) for Xb, yb in batches])
    return configs


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_steps(configs: dict, steps: int, rounds: int, warmup: int = 10,
               clock: str = "cpu") -> dict:
    """Seconds per step of every configuration in each of ``rounds`` interleaved rounds.

    ``clock="cpu"`` (default) counts the process's CPU time (single-threaded: the step's cost
    without the time other processes of a shared machine took the core); ``"wall"`` the
    elapsed time.
    """
    now = CLOCKS[clock]
    for model, opt, batches in configs.values():
        for i in range(warmup):
            train_step(model, opt, *batches[i % len(batches)])
    times: dict = {key: [] for key in configs}
    for r in range(rounds):
        for key, (model, opt, batches) in configs.items():
            start = now()
            for i in range(steps):
                train_step(model, opt, *batches[(warmup + r * steps + i) % len(batches)])
            times[key].append((now() - start) / steps)
    for key, (_, opt, _) in configs.items():
        if getattr(opt, "skipped_steps", 0):  # cheaper steps: the ratio would be wrong
            raise RuntimeError(f"{key}: {opt.skipped_steps} steps skipped while timed")
    return times


def dense_products_s(model_name: str, rounds: int, reps: int = 50) -> tuple[float, float]:
    """Seconds of the dense-factor products a VariationalNGD-dense step cannot avoid, in float32:
    ``(draw, preconditioning)``, the draw ``C (K Eᵀ)ᵀ`` and the preconditioning ``CCᵀ (G KKᵀ)``
    of every layer (the factor updates every ``T`` steps and all overhead excluded): with IVON's
    step, a lower bound."""
    from structvi.optim.kfac import is_supported, layer_dims

    mats = []
    for module in MODELS[model_name]().modules():
        if is_supported(module):
            d_K, d_C = layer_dims(module, module.bias is not None)
            mats.append([torch.randn(*shape) for shape in ((d_K, d_K), (d_C, d_C), (d_C, d_K))])

    def draw() -> None:
        for K, C, E in mats:
            C @ (K @ E.T).T

    def precondition() -> None:
        for K, C, E in mats:
            C @ (E @ K)

    return _fastest(draw, rounds, reps), _fastest(precondition, rounds, reps)


def update_products_s(model_name: str, rounds: int, reps: int = 20) -> float:
    """Seconds of the dense products of one factor update of every layer, in float32: per
    factor ``K``, ``KᵀK``, ``M²``, ``K h(M)`` and ``K Kᵀ`` (the statistics excluded)."""
    from structvi.optim.kfac import is_supported, layer_dims

    mats = []
    for module in MODELS[model_name]().modules():
        if is_supported(module):
            mats += [torch.randn(d, d) / d for d in layer_dims(module, module.bias is not None)]

    def products() -> None:
        for K in mats:
            K.T @ K
            M = K @ K
            K = K @ M
            K @ K.T

    return _fastest(products, rounds, reps)


def _fastest(products, rounds: int, reps: int) -> float:
    """Seconds of one call of ``products``: the fastest of ``rounds`` rounds of ``reps`` calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(reps):
            products()
        best = min(best, (time.process_time() - start) / reps)
    return best


QUALITY = ("VariationalNGD-dense", "VariationalNGD-dense previous")
QUALITY_SEEDS = tuple(range(12))


def t_quality(seeds: tuple[int, ...] = QUALITY_SEEDS, epochs: int = 30) -> dict:
    """Validation and test NLL, test ECE and accuracy (mean, std over ``seeds``) of the
    :data:`QUALITY` configurations on both digits models in float32, trained as in
    ``benchmarks.bayesian_digits`` (its ``run``: 30 epochs, cosine schedule, 32-draw Bayesian
    model average)."""
    out = {}
    for model_name in MODELS:
        for name in QUALITY:
            runs = []
            for seed in seeds:
                torch.manual_seed(seed)
                runs.append(run(model_name, name.split(" ")[0], CONFIGS[name],
                                digits_split(seed), epochs, seed, False))
            out[f"{model_name}|{name}"] = {
                k: (statistics.mean(r[k] for r in runs), statistics.stdev(r[k] for r in runs))
                for k in ("val_nll", "nll", "ece", "acc")}
    return out


def rows(times: dict) -> list[dict]:
    """One row per configuration: fastest round, and the ratio to IVON's at the same model and
    precision both as fastest over fastest and as the median over rounds of the ratio within a
    round (the two were timed next to each other: robust to load that drifts between rounds)."""
    out = []
    for (model_name, precision, method), seconds in times.items():
        ivon = times[model_name, precision, "IVON"]
        per_round = [s / i for s, i in zip(seconds, ivon)]
        out.append(dict(model=model_name, precision=precision, method=method,
                        ms_per_step=1e3 * min(seconds), over_ivon=min(seconds) / min(ivon),
                        over_ivon_median=statistics.median(per_round)))
    return out


def markdown(table: list[dict], quality: dict | None = None) -> str:
    lines = ["Per-step time (fastest of interleaved rounds, one thread) and its ratio to IVON's "
             "at the same model and precision. Goal (issue 14): VariationalNGD ≤ 1.5× IVON.", "",
             "`step / IVON`: fastest round over IVON's fastest; `median`: median over rounds of "
             "the ratio within a round.", "",
             "`floor`: IVON's step plus the float32 dense products VariationalNGD-dense cannot "
             "avoid (the preconditioning CCᵀGKKᵀ of every layer, and its draw C(KEᵀ)ᵀ, every "
             "second step with antithetic pairs; factor updates and all overhead excluded), over "
             "IVON's step: a lower bound. `floor + updates`: plus the float32 products of one "
             "factor update of every layer (KᵀK, M², K h(M), KKᵀ per factor; the statistics "
             "excluded) divided by T.", "",
             "| model | precision | method | ms / step | step / IVON | median | floor | "
             "floor + updates |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        floor = f"{r['floor_over_ivon']:.2f}" if "floor_over_ivon" in r else ""
        floor_T = f"{r['floor_T_over_ivon']:.2f}" if "floor_T_over_ivon" in r else ""
        lines.append(f"| {r['model']} | {r['precision']} | {r['method']} | "
                     f"{r['ms_per_step']:.3f} | {r['over_ivon']:.2f} | "
                     f"{r['over_ivon_median']:.2f} | {floor} | {floor_T} |")
    if quality:
        lines += ["", f"Quality of the two configurations (float32, seeds 0-{len(QUALITY_SEEDS) - 1}, "
                  "validation and test splits, 32-draw model average; mean ± std over seeds). "
                  "`previous`: T = 10, lr_cov = 0.05, independent draws; the other: T = 40, "
                  "lr_cov = 0.2, antithetic pairs across steps:", "",
                  "| model | configuration | val NLL | test NLL | ECE | test acc |",
                  "|---|---|---|---|---|---|"]
        for key, q in quality.items():
            model_name, name = key.split("|")
            cells = " | ".join(f"{q[k][0]:.4f} ± {q[k][1]:.4f}"
                               for k in ("val_nll", "nll", "ece", "acc"))
            lines.append(f"| {model_name} | {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (a multiple of 40, the factor-update interval)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine); wall: elapsed")
    parser.add_argument("--out", default=None, help="JSON path (default by mode)")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip the 12-seed quality comparison with the previous "
                             "configuration")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*no statistics were recorded.*")
    warnings.filterwarnings("ignore", message=".*outlier gradient.*")
    steps, rounds = (40, 3) if args.quick else (40, 12)
    steps, rounds = args.steps or steps, args.rounds or rounds
    default = "benchmarks/results/" + ("quick/" if args.quick else "") + "vngd_step.json"
    out = Path(args.out or default)
    table = rows(time_steps(build(), steps, rounds, clock=args.clock))
    products = {m: (dense_products_s(m, rounds), update_products_s(m, rounds)) for m in MODELS}
    for r in table:  # the compute floor of VariationalNGD-dense next to its measured ratio
        if r["method"].startswith("VariationalNGD-dense"):
            ivon = next(q for q in table if q["method"] == "IVON" and q["model"] == r["model"]
                        and q["precision"] == r["precision"])
            (draw, precondition), update = products[r["model"]]
            every = precondition + draw / (2 if setting(r["method"], "antithetic") else 1)
            T = setting(r["method"], "T")
            r["floor_over_ivon"] = 1.0 + 1e3 * every / ivon["ms_per_step"]
            r["floor_T_over_ivon"] = 1.0 + 1e3 * (every + update / T) / ivon["ms_per_step"]
    quality = None if args.quick or args.no_quality else t_quality()
    config = dict(quick=args.quick, steps=steps, rounds=rounds, clock=args.clock, batch=64,
                  configs=CONFIGS,
                  torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine())
    result = dict(config=config, results=table, quality=quality)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    text = markdown(table, quality)
    out.with_suffix(".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
