"""CUDA low-precision checks: bf16/fp16 VI runs per structure, bf16/fp16 optimizer training.

The contracts the CPU suite checks in bf16 (tests/), run on a GPU where bf16/fp16 matmuls take
other kernels (tensor cores, reduced-precision accumulation):

* **VI, long runs.** ``fit`` on a stiff Gaussian target (condition 1e3, d = 16) for every VI
  structure, with the factor in float32, bfloat16 and float16 (``hessian`` estimator, exact
  curvature): the KL to the target (the family's gap included: compare dtypes within a
  structure) after 100 steps and at the end (`--steps`, default 2,000); a low-precision run must stay finite and must
  not drift (KL at the end no worse than after 100 steps).
* **Optimizer.** The digits MLP and CNN trained with ``StructuredNGD`` (defaults) in float32,
  with bf16 parameters (fp32 factors), and under fp16 autocast with ``GradScaler``; the same
  with ``VariationalNGD`` in bf16 (factors must move, no NaN). Test accuracy per run.

Run: ``python -m benchmarks.gpu_checks [--quick] [--device cuda]`` →
``benchmarks/results/gpu_checks.{json,md}`` (``--quick``: ``benchmarks/results/quick/``). On a
machine without CUDA, ``--device cpu --quick`` checks the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import structvi as sv
from structvi.optim import StructuredNGD, VariationalNGD

VI_STRUCTURES = {
    "dense": {}, "diagonal": {}, "block_diagonal": {"block_size": 4},
    "lower_triangular": {}, "low_rank_diagonal": {"rank": 3},
    "hierarchical": {"k1": 3, "k2": 3}, "triangular_toeplitz": {},
    "kronecker": {"dims": (4, 4)},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stiff_target(d: int, condition: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian ``N(m, S⁻¹)`` with eigenvalues of ``S`` log-spaced over ``condition``."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    S = Q @ torch.diag(torch.logspace(0, math.log10(condition), d, dtype=torch.float64)) @ Q.T
    m = torch.randn(d, generator=gen, dtype=torch.float64)
    return S.to(device), m.to(device)


def kl_to_target(q: sv.StructuredGaussian, S: torch.Tensor, m: torch.Tensor) -> float:
    """KL(q ‖ N(m, S⁻¹)) in float64 on the CPU (diagnostic only)."""
    cov = q.factor.to_dense().double().cpu()
    cov = cov @ cov.T
    mu = q.loc.double().cpu()
    S, m = S.cpu(), m.cpu()
    d = S.shape[0]
    diff = mu - m
    logdet_cov = torch.linalg.slogdet(cov)[1]
    logdet_S = torch.linalg.slogdet(S)[1]
    return float(0.5 * (torch.trace(S @ cov) + diff @ S @ diff - d - logdet_cov - logdet_S))


def vi_run(structure: str, options: dict, dtype: torch.dtype, steps: int, device: str
           ) -> dict[str, Any]:
    """One ``fit`` with a ``dtype`` factor and mean on the stiff target: KL at 100 and at end."""
    S, m = stiff_target(16, 1e3, device)
    Sf, mf = S.float(), m.float()

    def log_joint(z):
        diff = z.float() - mf
        return -0.5 * ((diff @ Sf) * diff).sum(-1)

    q = sv.StructuredGaussian.standard(16, structure=structure, dtype=dtype, device=device,
                                       **options)
    gen = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    first = sv.fit(log_joint, q, steps=100, estimator="hessian", num_samples=2, generator=gen,
                   progress=False)
    kl_100 = kl_to_target(first.q, S, m)
    rest = sv.fit(log_joint, first.q, steps=max(steps - 100, 1), estimator="hessian",
                  num_samples=2, generator=gen, progress=False)
    seconds = time.perf_counter() - start
    kl_end = kl_to_target(rest.q, S, m)
    return {"structure": structure, "dtype": str(dtype).removeprefix("torch."),
            "kl_100": kl_100, "kl_end": kl_end, "finite": math.isfinite(kl_end),
            "stopped": str(rest.stopped_reason), "seconds": seconds}


def digits(device: str) -> tuple[torch.Tensor, ...]:
    """The bundled digits set, standardized, as (train x, train y, test x, test y)."""
    from structvi.data import load_digits, split

    X, y = load_digits()
    Xtr, ytr, Xte, yte = split(X, y, test_fraction=0.3, seed=0)
    return Xtr.to(device), ytr.to(device), Xte.to(device), yte.to(device)


def model(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def train_run(kind: str, mode: str, epochs: int, device: str) -> dict[str, Any]:
    """Train ``kind`` with ``mode`` in {fp32, bf16, fp16-amp, variational-bf16}: accuracy."""
    torch.manual_seed(0)
    Xtr, ytr, Xte, yte = digits(device)
    net = model(kind).to(device)
    if mode in ("bf16", "variational-bf16"):
        net = net.to(torch.bfloat16)
    if mode == "variational-bf16":
        opt = VariationalNGD(net, data_size=len(ytr), prior_precision=1.0, lr=0.05, T=5,
                             lr_cov=0.05, momentum=0.9)
    else:
        opt = StructuredNGD(net)
    scaler = torch.amp.GradScaler(device) if mode == "fp16-amp" else None
    gen = torch.Generator(device="cpu").manual_seed(1)
    factors_before = _factor_norms(opt)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=gen).to(device)
        for idx in order.split(64):
            x = Xtr[idx].to(next(net.parameters()).dtype)
            opt.zero_grad()
            if mode == "fp16-amp":
                with torch.autocast(device, dtype=torch.float16):
                    loss = nn.functional.cross_entropy(net(x).float(), ytr[idx])
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            elif mode == "variational-bf16":
                with opt.sampled_params(train=True):
                    loss = nn.functional.cross_entropy(net(x).float(), ytr[idx])
                    loss.backward()
                opt.step()
            else:
                loss = nn.functional.cross_entropy(net(x).float(), ytr[idx])
                loss.backward()
                opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = net(Xte.to(next(net.parameters()).dtype)).float()
    finite = all(torch.isfinite(p).all().item() for p in net.parameters())
    moved = _factor_norms(opt) != factors_before
    return {"model": kind, "mode": mode, "accuracy": float((logits.argmax(1) == yte).float()
                                                           .mean()),
            "finite": finite, "factors_moved": bool(moved), "seconds": seconds,
            "skipped_steps": getattr(opt, "skipped_steps", 0)}


def _factor_norms(opt: StructuredNGD) -> tuple[float, ...]:
    """A fingerprint of the Kronecker factors (to tell whether they moved)."""
    out = []
    for p, st in opt.state.items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and key.startswith(("K.", "C.")):
                out.append(round(float(value.float().norm()), 6))
    return tuple(out)


def markdown(vi: list[dict], train: list[dict], device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [f"# CUDA low-precision checks ({name}, torch {torch.__version__})", "",
             "## VI on a stiff Gaussian (d = 16, condition 1e3, hessian estimator)", "",
             "| structure | dtype | KL after 100 steps | KL at the end | finite | stopped |",
             "|---|---|---|---|---|---|"]
    for r in vi:
        lines.append(f"| {r['structure']} | {r['dtype']} | {r['kl_100']:.3g} | "
                     f"{r['kl_end']:.3g} | {r['finite']} | {r['stopped']} |")
    lines += ["", "## Optimizer on digits (StructuredNGD defaults; VariationalNGD bf16)", "",
              "| model | mode | test accuracy | finite | factors moved | skipped steps |",
              "|---|---|---|---|---|---|"]
    for r in train:
        lines.append(f"| {r['model']} | {r['mode']} | {r['accuracy']:.3f} | {r['finite']} | "
                     f"{r['factors_moved']} | {r['skipped_steps']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps and epochs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="directory (default benchmarks/results)")
    parser.add_argument("--steps", type=int, default=None, help="VI steps (default 2000)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_checks: CUDA is not available (use --device cpu --quick to check "
                         "the script)")
    steps, epochs = (300, 1) if args.quick else (2_000, 5)
    steps = args.steps or steps
    out = Path(args.out or ("benchmarks/results/quick" if args.quick else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    vi = []
    for structure, options in VI_STRUCTURES.items():
        for dtype in DTYPES.values():
            try:
                vi.append(vi_run(structure, options, dtype, steps, args.device))
            except Exception as err:  # report, never hide
                vi.append({"structure": structure, "dtype": str(dtype), "kl_100": float("nan"),
                           "kl_end": float("nan"), "finite": False,
                           "stopped": f"error: {type(err).__name__}: {err}"[:120],
                           "seconds": 0.0})
            print(vi[-1], flush=True)
            write(out, vi, [], args.device)
    train = []
    for kind in ("mlp", "cnn"):
        for mode in ("fp32", "bf16", "fp16-amp", "variational-bf16"):
            train.append(train_run(kind, mode, epochs, args.device))
            print(train[-1], flush=True)
            write(out, vi, train, args.device)
    print(markdown(vi, train, args.device))


def write(out: Path, vi: list[dict], train: list[dict], device: str) -> None:
    """Results so far (rewritten after every run: a run cut short keeps what it measured)."""
    (out / "gpu_checks.json").write_text(json.dumps({"vi": vi, "train": train}, indent=1))
    (out / "gpu_checks.md").write_text(markdown(vi, train, device))


if __name__ == "__main__":
    main()
