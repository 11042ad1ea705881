"""Demo 3: the StructuredNGD optimizer against AdamW on a small CNN on the digits.

The bundled 8×8 digits (80 % train / 20 % test), a CNN ``conv(8) → pool → conv(16) → pool →
linear``, batch 64, cosine learning-rate decay. ``StructuredNGD`` preconditions every Conv2d and
Linear layer with a dense Kronecker factor pair (``T = 10``: factors refreshed every 10 steps);
AdamW is the baseline. Both use ``lr = 1e-2`` (the ``optim_digits`` benchmark tunes each on
a validation grid). The figure shows test accuracy against wall time and the training loss per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from structvi.data import load_digits, split
from structvi.demos._common import Clock, markdown_table, progress, pyplot, save

NGD_SETTINGS = dict(structures="dense", lr=3e-3)  # the defaults (docs/optimizer_tuning.md)
ADAMW_LR = 1e-3  # AdamW's default


def small_cnn() -> nn.Module:
    """``conv(1→8) → ReLU → pool → conv(8→16) → ReLU → pool → linear(64→10)``."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )


def make_optimizer(name: str, net: nn.Module) -> torch.optim.Optimizer:
    """``"StructuredNGD"`` or ``"AdamW"`` for ``net``."""
    if name == "AdamW":
        return torch.optim.AdamW(net.parameters(), lr=ADAMW_LR)
    from structvi.optim import StructuredNGD

    return StructuredNGD(net, **NGD_SETTINGS)


def train(name: str, data: tuple, epochs: int, show: bool) -> dict[str, Any]:
    """Train one CNN; per-epoch test accuracy, training loss and cumulative train seconds."""
    X, y, X_te, y_te = data
    torch.manual_seed(0)
    net = small_cnn()
    opt = make_optimizer(name, net)
    batches = -(-len(y) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * batches)
    clock, history = Clock(), {"seconds": [], "accuracy": [], "loss": []}
    gen = torch.Generator().manual_seed(0)
    for _ in progress(range(epochs), name, enabled=show):
        total = 0.0
        with clock:
            for idx in torch.randperm(len(y), generator=gen).split(64):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(X[idx]), y[idx])
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            history["accuracy"].append(float((net(X_te).argmax(1) == y_te).double().mean()))
        history["seconds"].append(clock.seconds)
        history["loss"].append(total / len(y))
    if hasattr(opt, "close"):
        opt.close()
    return history


def plot(histories: dict[str, dict[str, list[float]]], out_dir: Path) -> Path:
    """Test accuracy against wall time, training loss against epoch."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, h in histories.items():
        left.plot(h["seconds"], h["accuracy"], "o-", ms=3, label=name)
        right.plot(range(1, len(h["loss"]) + 1), h["loss"], "o-", ms=3, label=name)
    left.set_xlabel("training wall time (s)")
    left.set_ylabel("test accuracy")
    left.set_ylim(0.8, 1.0)
    right.set_xlabel("epoch")
    right.set_ylabel("training loss")
    right.set_yscale("log")
    left.legend()
    fig.suptitle("Digits CNN: StructuredNGD (dense Kronecker factors) vs AdamW")
    return save(fig, out_dir, "optimizer_digits.png")


def run(out_dir: Path, quick: bool = False, show: bool = True) -> dict[str, Any]:
    """Train with both optimizers, print the table, save ``optimizer_digits.png``."""
    X, y = load_digits(images=True)
    data = split(X, y, 0.2, seed=0)
    epochs = 2 if quick else 15
    histories = {name: train(name, data, epochs, show) for name in ("StructuredNGD", "AdamW")}
    table = markdown_table(
        ["optimizer", "lr", "final test accuracy", "best test accuracy", "train seconds"],
        [(name, NGD_SETTINGS["lr"] if name == "StructuredNGD" else ADAMW_LR,
          f"{h['accuracy'][-1]:.4f}", f"{max(h['accuracy']):.4f}", f"{h['seconds'][-1]:.1f}")
         for name, h in histories.items()])
    print(f"digits CNN, {epochs} epochs, batch 64\n{table}")
    return {"histories": histories, "table": table, "png": plot(histories, out_dir)}
