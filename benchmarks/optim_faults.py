"""Robustness sweep: StructuredNGD against AdamW under bad batches, counted over seeds.

A regression (``y = sin(x·w) + noise``, 512 points, MLP 8-32-32-1, batch 32) trained for 80 steps;
at step 40 one fault is injected:

* a **loss spike**: the loss of one batch multiplied by 1e3, 1e6, 1e10 or 1e20, with and without
  ``clip_grad_norm_(…, 1.0)``;
* a **NaN batch**: a NaN loss, or one NaN input feature;
* a **zero-gradient stretch**: 300 steps whose loss is multiplied by 0, then 40 normal steps.

A run *recovers* when its full-data MSE 40 steps after the fault is finite and within 2× of the
same optimizer's fault-free run (same seed); for the zero-gradient stretch the first real step
must also be within 3× of the mean step before the stretch. Methods: StructuredNGD (default
outlier rule), StructuredNGD with ``outlier_threshold=None`` (non-finite skip and clip-aware
statistics only) and AdamW, all on the same data and seeds.

Run: ``python -m benchmarks.optim_faults [--quick]``
→ ``benchmarks/results/optim_faults.{json,md}`` (``--quick``: ``benchmarks/results/quick/``).
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
from torch import Tensor, nn

from structvi.optim import StructuredNGD

MAGNITUDES = (1e3, 1e6, 1e10, 1e20)
CLIPS = (None, 1.0)
AT, AFTER, ZERO_STRETCH = 40, 40, 300
# the published INGD/SINGD update (no normalization, absolute damping) at a large step size
PUBLISHED = dict(lr=0.05, relative_damping=False, normalize_preconditioner=False,
                 diagonal_lr_ratio=1.0)
METHODS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "StructuredNGD (defaults)": lambda net: StructuredNGD(net),
    "StructuredNGD (published update, lr 0.05)": lambda net: StructuredNGD(net, **PUBLISHED),
    "same, no outlier clipping": lambda net: StructuredNGD(net, **PUBLISHED,
                                                            outlier_threshold=None),
    "AdamW": lambda net: torch.optim.AdamW(net.parameters(), lr=1e-2),
}


def _problem(seed: int) -> tuple[Tensor, Tensor, nn.Module]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(512, 8, generator=gen)
    y = torch.sin(X @ torch.randn(8, 1, generator=gen)) + 0.1 * torch.randn(512, 1, generator=gen)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 1))
    return X, y, net


def run(method: str, seed: int, fault: str | None = None, magnitude: float = 1.0,
        clip: float | None = None) -> dict:
    """One training run; returns the final MSE and, for ``"zero"``, the step-size ratio."""
    X, y, net = _problem(seed)
    opt = METHODS[method](net)
    gen = torch.Generator().manual_seed(seed + 1)

    def step(t: int, weight: float = 1.0) -> float:
        idx = torch.randint(0, X.shape[0], (32,), generator=gen)
        x = X[idx].clone()
        if fault == "nan_input" and t == AT:
            x[0, 0] = float("nan")
        loss = nn.functional.mse_loss(net(x), y[idx]) * weight
        if t == AT and fault == "spike":
            loss = loss * magnitude
        if t == AT and fault == "nan_loss":
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        before = [p.detach().clone() for p in net.parameters()]
        opt.step()
        return math.sqrt(sum(((p - b) ** 2).sum().item()
                             for p, b in zip(net.parameters(), before)))

    sizes = [step(t) for t in range(AT)]
    out: dict = {}
    if fault == "zero":
        for _ in range(ZERO_STRETCH):
            step(-1, 0.0)
        out["first_step_over_normal"] = step(-1) / statistics.mean(sizes[-10:])
        start = AT + 1
    else:
        start = AT
    for t in range(start, AT + AFTER):
        step(t)
    with torch.no_grad():
        out["mse"] = nn.functional.mse_loss(net(X), y).item()
    out["skipped"] = getattr(opt, "skipped_steps", None)
    out["clipped"] = getattr(opt, "clipped_steps", None)
    return out


def _faults() -> list[dict]:
    faults = [dict(fault="spike", magnitude=m, clip=c) for m in MAGNITUDES for c in CLIPS]
    faults += [dict(fault="nan_loss"), dict(fault="nan_input"), dict(fault="zero")]
    return faults


def _label(f: dict) -> str:
    if f["fault"] == "spike":
        return f"spike ×{f['magnitude']:.0e}" + (" + clip_grad_norm_" if f.get("clip") else "")
    return {"nan_loss": "NaN loss", "nan_input": "NaN input feature",
            "zero": f"{ZERO_STRETCH} zero-gradient steps"}[f["fault"]]


def sweep(seeds: list[int]) -> dict:
    """Every fault × method × seed, with each method's fault-free baseline per seed and clip."""
    baselines = {(m, s, c): run(m, s, clip=c)["mse"] for m in METHODS for s in seeds for c in CLIPS}
    rows = []
    for f in _faults():
        row = dict(label=_label(f), **f, methods={})
        for m in METHODS:
            runs = []
            for s in seeds:
                r = run(m, s, **f)
                ratio = r["mse"] / baselines[(m, s, f.get("clip"))]
                ok = math.isfinite(r["mse"]) and ratio < 2.0
                if "first_step_over_normal" in r:
                    ok = ok and r["first_step_over_normal"] < 3.0
                runs.append(dict(seed=s, ratio=ratio, recovered=ok, **r))
            row["methods"][m] = runs
        rows.append(row)
        print(_line(row), flush=True)
    return dict(rows=rows, baselines={f"{m}|{s}|{c}": v for (m, s, c), v in baselines.items()})


def _summary(runs: list[dict]) -> str:
    ok = sum(r["recovered"] for r in runs)
    ratios = [r["ratio"] for r in runs]
    median = statistics.median(ratios) if all(math.isfinite(x) for x in ratios) else math.nan
    text = f"{ok}/{len(runs)} ({median:.3g}×)" if math.isfinite(median) else f"{ok}/{len(runs)}"
    if "first_step_over_normal" in runs[0]:
        text += f", first step {statistics.median(r['first_step_over_normal'] for r in runs):.2g}×"
    return text


def _line(row: dict) -> str:
    return f"{row['label']:<40} " + " | ".join(
        f"{m}: {_summary(runs)}" for m, runs in row["methods"].items())


def markdown(result: dict) -> str:
    methods = list(METHODS)
    lines = ["## Recovered runs (final MSE within 2× of the fault-free run; median ratio)", "",
             "| fault | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for row in result["rows"]:
        lines.append(f"| {row['label']} | " + " | ".join(_summary(row["methods"][m])
                                                        for m in methods) + " |")
    totals = {m: (sum(r["recovered"] for row in result["rows"] for r in row["methods"][m]),
                  sum(len(row["methods"][m]) for row in result["rows"])) for m in methods}
    lines.append("| **all faults** | " + " | ".join(f"**{a}/{b}**" for a, b in totals.values())
                 + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds instead of 5")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="structvi")
    seeds = list(range(2 if args.quick else 5))
    default = "benchmarks/results/quick/optim_faults.json" if args.quick \
        else "benchmarks/results/optim_faults.json"
    out = Path(args.out or default)
    result = dict(config=dict(quick=args.quick, seeds=seeds, at=AT, after=AFTER,
                              zero_stretch=ZERO_STRETCH, torch=torch.__version__,
                              machine=platform.processor() or platform.machine()),
                  **sweep(seeds))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    table = markdown(result)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
