"""Train a small CNN on scikit-learn's digits with ``StructuredNGD`` (optionally in bf16).

    python examples/train_digits.py --structure hierarchical --epochs 15 --bf16 --out examples/out

Every Conv2d/Linear layer gets a structured Kronecker preconditioner (here the same structure
for both factors); the optimizer is used exactly like any ``torch.optim`` optimizer, with an lr
scheduler and ``torch.autocast``. A structure's options go in a dict, e.g.
``{"name": "hierarchical", "k1": 4, "k2": 4}`` (``k1 + k2`` must fit the smallest layer).
The hyper-parameters are the optimizer's defaults (docs/optimizer_tuning.md): only ``lr`` is
exposed, 3e-3 by default.
The training curves (loss and test accuracy per epoch) are saved as ``--out``/train_digits.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from structvi.optim import StructuredNGD

STRUCTURES = {
    "dense": "dense",
    "diagonal": "diagonal",
    "hierarchical": {"name": "hierarchical", "k1": 4, "k2": 4},
    "block_diagonal": {"name": "block_diagonal", "block_size": 4},
}


def digits(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Train/test split (1437/360) of the 8×8 digits, pixels scaled to [0, 1]."""
    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return X[perm[:1437]], y[perm[:1437]], X[perm[1437:]], y[perm[1437:]]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )


def plot_curves(history: dict[str, list[float]], title: str, path: Path) -> None:
    """Training loss (mean over each epoch) and test accuracy against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history["loss"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, history["loss"], "o-", ms=3)
    left.set_yscale("log")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss (epoch mean)")
    right.plot(epochs, history["accuracy"], "o-", ms=3, color="C1")
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> float:
    """Train and return the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", choices=sorted(STRUCTURES), default="dense")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-3, help="StructuredNGD's lr (default 3e-3)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--out", default="examples/out",
                        help="directory for train_digits.png (created if missing)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    X, y, X_test, y_test = digits()
    net = small_cnn()
    opt = StructuredNGD(net, lr=args.lr, structures=STRUCTURES[args.structure])
    batches_per_epoch = -(-len(y) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * batches_per_epoch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    for epoch in range(args.epochs):
        total = 0.0
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            with autocast:
                loss = nn.functional.cross_entropy(net(X[idx]).float(), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        with torch.no_grad(), autocast:
            accuracy = (net(X_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.4f}  test accuracy {accuracy:.4f}")
        history["loss"].append(total / len(y))
        history["accuracy"].append(accuracy)
    opt.close()
    png = Path(args.out) / "train_digits.png"
    plot_curves(history, f"Digits CNN, StructuredNGD ({args.structure}"
                f"{', bf16' if args.bf16 else ''})", png)
    print(f"saved {png}")
    return accuracy


if __name__ == "__main__":
    main()
