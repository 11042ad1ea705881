"""Draw the documentation's figures into ``docs/assets/`` (committed; re-run after changes).

    python docs/make_figures.py            # structure patterns and the concepts figure
    python docs/make_figures.py --examples # also run the examples (a few minutes) for their PNGs

* ``assets/structures/<name>.png``: a generic element ``K = h(M)`` of each structure (``M`` a
  random coordinate element) with ``Σ = K Kᵀ`` and the precision ``S = Σ⁻¹`` (d = 12); non-zero
  entries are blue, zeros white: the panels show the sparsity patterns.
* ``assets/concepts_normal_coordinates.png``: the retraction map ``M ↦ K h(M)`` draws every
  coordinate to a valid covariance, and the natural-gradient VI iterates on a 2-D Gaussian.
* ``assets/examples/*.png`` (``--examples``): the figures the examples save.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import structvi as sv  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
ROOT = Path(__file__).resolve().parents[1]
DIM = 12
OPTIONS = {
    "block_diagonal": {"block_size": 4},
    "low_rank_diagonal": {"rank": 3},
    "hierarchical": {"k1": 2, "k2": 3},
    "kronecker": {"dims": (3, 4), "factors": ("dense", "dense")},
    "block_sites": {"blocks": [{"name": "dense", "dim": 4},
                               {"name": "low_rank_diagonal", "dim": 8, "options": {"rank": 2}}]},
}


def generic_factor(name: str, seed: int = 0) -> torch.Tensor:
    """``K = I·h(M)`` for a random coordinate element ``M`` of the structure (dense, float64)."""
    gen = torch.Generator().manual_seed(seed)
    s = sv.make_structure(name, DIM, dtype=torch.float64, **OPTIONS.get(name, {}))
    Y = torch.randn(DIM, DIM, dtype=torch.float64, generator=gen)
    M = s.project(Y + Y.T)
    M = M.scale(0.35 / float(M.max_abs()))
    return s.retract(M).to_dense()


def _panel(ax, A: np.ndarray, title: str) -> None:
    nonzero = np.abs(A) > 1e-10 * np.abs(A).max()
    ax.imshow(nonzero, cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, A.shape[1], 1), minor=True)
    ax.set_yticks(np.arange(-0.5, A.shape[0], 1), minor=True)
    ax.grid(which="minor", color="white", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("white")


def structure_figure(name: str) -> Path:
    """Three panels: K, Σ = K Kᵀ, S = Σ⁻¹ (coloured entries are non-zero)."""
    K = generic_factor(name).numpy()
    Sigma = K @ K.T
    S = np.linalg.inv(Sigma)  # drawing only
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    for ax, A, title in zip(axes, (K, Sigma, S), ("factor K", "covariance Σ = K Kᵀ",
                                                  "precision S = Σ⁻¹")):
        _panel(ax, A, title)
    fig.suptitle(f"{name} (d = {DIM})", fontsize=11)
    fig.tight_layout()
    path = ASSETS / "structures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _ellipse(ax, mean, cov, **kw) -> None:
    vals, vecs = np.linalg.eigh(cov)  # drawing only
    t = np.linspace(0, 2 * np.pi, 100)
    pts = vecs @ (np.sqrt(vals)[:, None] * np.stack([np.cos(t), np.sin(t)]))
    ax.plot(mean[0] + pts[0], mean[1] + pts[1], **kw)


def concepts_figure() -> Path:
    """Left: Σ(M) = K h(M) h(M)ᵀ Kᵀ over a grid of normal coordinates; right: VI iterates."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2))
    K = np.array([[1.0, 0.0], [0.5, 0.8]])
    for a in np.linspace(-1.2, 1.2, 5):
        for b in np.linspace(-1.2, 1.2, 5):
            M = np.array([[a, 0.4 * b], [0.4 * b, -0.5 * a]])
            h = np.eye(2) + M + 0.5 * M @ M
            Kh = K @ h
            _ellipse(left, np.array([3 * a, 3 * b]), 0.25 * Kh @ Kh.T, color="C0", lw=1)
    _ellipse(left, np.zeros(2), 0.25 * K @ K.T, color="C3", lw=2.5)
    left.set_title("K h(M) for M on a grid of normal coordinates:\n"
                   "every point is a valid covariance (red: M = 0)", fontsize=9)
    left.set_xlabel("coordinate M₁₁ (scaled)")
    left.set_ylabel("coordinate M₁₂ (scaled)")
    left.set_aspect("equal")

    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    mean = torch.tensor([2.0, 1.0], dtype=torch.float64)
    P = torch.linalg.inv(cov)

    def log_joint(z: torch.Tensor) -> torch.Tensor:
        r = z - mean
        return -0.5 * ((r @ P) * r).sum(-1)

    for name, color in (("dense", "C0"), ("diagonal", "C1")):
        q = sv.StructuredGaussian.standard(2, name, dtype=torch.float64)
        fitter = sv.Fitter(log_joint, q, sv.NGDConfig(lr=0.5), estimator="hessian",
                           generator=torch.Generator().manual_seed(0))
        for step in range(8):
            _ellipse(right, fitter.q.mean.numpy(), fitter.q.covariance_matrix.numpy(),
                     color=color, lw=0.8 + 0.2 * step, alpha=0.3 + 0.09 * step,
                     label=f"{name} q, steps 0–7" if step == 0 else None)
            fitter.step()
    _ellipse(right, mean.numpy(), cov.numpy(), color="k", lw=2, ls="--", label="target")
    right.set_title("natural-gradient VI (lr 0.5) on a correlated 2-D Gaussian:\n"
                    "dense reaches the target, diagonal its best mean-field fit", fontsize=9)
    right.legend(fontsize=8, loc="lower right")
    right.set_aspect("equal")
    fig.tight_layout()
    path = ASSETS / "concepts_normal_coordinates.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def example_figures() -> None:
    """Run each example with its --out pointing at ``assets/examples``."""
    out = ASSETS / "examples"
    for script, args in (("logistic_regression.py", ["--no-progress"]),
                         ("eight_schools.py", []), ("train_digits.py", ["--epochs", "8"])):
        cmd = [sys.executable, str(ROOT / "examples" / script), "--out", str(out), *args]
        print("running", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", action="store_true", help="also run the examples")
    args = parser.parse_args(argv)
    for name in sorted(sv.STRUCTURES):
        print("wrote", structure_figure(name))
    print("wrote", concepts_figure())
    if args.examples:
        example_figures()


if __name__ == "__main__":
    main()
