"""Time per step and state size of structured VI against the dimension d.

Model: a synthetic sparse logistic regression, ``n = d`` data points with ``nnz`` random nonzero
features each (a sparse ``X``, ``torch.sparse.mm``), prior ``N(0, I)``. For d ∈ {10³, 10⁴, 10⁵}
and the ``diagonal``, ``block_diagonal`` (block 16) and ``low_rank_diagonal`` (rank 8) factors,
one :meth:`structvi.fit.Fitter.step` with the gradient-only Stein estimator (8 samples) is
timed (median CPU time of the process after warm-up, one intra-op thread: other processes on a
shared machine do not inflate it), and the state size is counted in stored floats (mean,
factor, both momenta). The fitted exponent ``log(t(d_max)/t(d_min)) / log(d_max/d_min)`` should be ≈ 1
(linear in d); state floats are exactly linear.

Run: ``python -m benchmarks.vi_scaling [--quick]``; writes ``benchmarks/results/vi_scaling.json``,
``vi_scaling.md`` and ``vi_scaling.png`` (quick: ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from structvi.fit import Fitter, TwoStage
from structvi.gaussian import StructuredGaussian

STRUCTURES = [("diagonal", {}), ("block_diagonal", {"block_size": 16}),
              ("low_rank_diagonal", {"rank": 8})]


def sparse_logistic(dim: int, nnz: int = 10, seed: int = 0):
    """``log_joint`` of a sparse logistic regression with ``n = dim`` rows (float32)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(dim).repeat_interleave(nnz)
    cols = torch.randint(0, dim, (dim * nnz,), generator=gen)
    vals = torch.randn(dim * nnz, generator=gen)
    X = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (dim, dim),
                                check_invariants=False).coalesce()
    w = torch.randn(dim, generator=gen)
    y = (torch.sparse.mm(X, w[:, None])[:, 0] > 0).float()

    def log_joint(W: Tensor) -> Tensor:
        logits = torch.sparse.mm(X, W.T).T  # (n_samples, n_data)
        loglik = (y * logits - torch.nn.functional.softplus(logits)).sum(-1)
        return loglik - 0.5 * W.square().sum(-1)

    return log_joint


def state_floats(fitter: Fitter) -> int:
    """Stored numbers in the fitter's state: mean, factor and both momenta."""
    s = fitter.state
    tensors = [s.loc, s.loc_momentum, *s.factor.tensors().values(),
               *s.factor_momentum.tensors().values()]
    return sum(t.numel() for t in tensors)


def time_steps(fitter: Fitter, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fitter.step(monitor=False)
    times = []
    for _ in range(reps):  # CPU time: robust to other processes on a shared machine
        t0 = time.process_time()
        fitter.step(monitor=False)
        times.append(time.process_time() - t0)
    return statistics.median(times)


def run(dims: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    for dim in dims:
        log_joint = sparse_logistic(dim)
        for name, opts in STRUCTURES:
            q0 = StructuredGaussian.standard(dim, name, dtype=torch.float32, **opts)
            fitter = Fitter(log_joint, q0, TwoStage(1.0, 10, 0.05), estimator="stein",
                            num_samples=8, generator=torch.Generator().manual_seed(0))
            seconds = time_steps(fitter, warmup=3, reps=reps)
            finite = bool(torch.isfinite(fitter.state.loc).all())
            rows.append({"structure": name, "options": opts, "dim": dim, "seconds": seconds,
                         "state_floats": state_floats(fitter), "finite": finite})
            print(f"d={dim:>6} {name:<18} {1e3 * seconds:8.2f} ms/step "
                  f"{rows[-1]['state_floats']:>10} floats", flush=True)
    return rows


def exponents(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Growth exponent of the step time between the smallest and largest d, per structure."""
    out = {}
    for name, _ in STRUCTURES:
        r = sorted((x for x in rows if x["structure"] == name), key=lambda x: x["dim"])
        ratio = r[-1]["seconds"] / r[0]["seconds"]
        out[name] = math.log(ratio) / math.log(r[-1]["dim"] / r[0]["dim"])
    return out


def markdown(rows: list[dict[str, Any]], slopes: dict[str, float], meta: dict[str, Any]) -> str:
    dims = sorted({r["dim"] for r in rows})
    head = ("| structure | " + " | ".join(f"d={d}: CPU ms/step (floats)" for d in dims)
            + " | exponent |")
    lines = [f"# Structured VI scaling ({meta['machine']}, torch {meta['torch']}, "
             f"{meta['threads']} thread(s))", "", head, "|---|" + "---:|" * (len(dims) + 1)]
    for name, _ in STRUCTURES:
        cells = []
        for d in dims:
            r = next(x for x in rows if x["structure"] == name and x["dim"] == d)
            cells.append(f"{1e3 * r['seconds']:.2f} ({r['state_floats']})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {slopes[name]:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, _ in STRUCTURES:
        r = sorted((x for x in rows if x["structure"] == name), key=lambda x: x["dim"])
        a.loglog([x["dim"] for x in r], [1e3 * x["seconds"] for x in r], "o-", label=name)
        b.loglog([x["dim"] for x in r], [x["state_floats"] for x in r], "o-", label=name)
    a.set(xlabel="d", ylabel="CPU ms per step (stein, 8 samples)")
    b.set(xlabel="d", ylabel="stored floats in the state")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="structured VI: step time and state vs d")
    parser.add_argument("--quick", action="store_true", help="d up to 10⁴ and fewer repeats")
    parser.add_argument("--out", default=None,
                        help="output directory (default benchmarks/results, quick: .../quick)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dims = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    rows = run(dims, reps=5 if args.quick else 9)
    slopes = exponents(rows)
    meta = {"quick": args.quick, "threads": args.threads, "torch": torch.__version__,
            "machine": platform.machine()}
    out = Path(args.out or ("benchmarks/results/quick" if args.quick else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vi_scaling.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                     "exponents": slopes}))
    text = markdown(rows, slopes, meta)
    (out / "vi_scaling.md").write_text(text + "\n")
    plot(rows, out / "vi_scaling.png")
    print(text)
    return rows


if __name__ == "__main__":
    main()
