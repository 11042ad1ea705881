"""The small model suite of :mod:`benchmarks.optim_defaults` (data, models, one training run).

Five problems, each with a fixed budget of epochs at batch size 64 and a constant learning
rate (out-of-the-box use, no schedule):

* ``MLP``: scikit-learn's digits (8×8, 1200 train / 237 validation / 360 test), 64-128-128-10.
* ``CNN``: the same data, two 3×3 convolutions and a linear head (benchmarks/optim_digits.py).
* ``CNN-BN``: the CNN with ``BatchNorm2d`` after each convolution.
* ``Transformer``: synthetic sequences (length 12, vocabulary 6, label = the most frequent
  token, ties to the smallest); token + position ``Embedding``, one pre-norm block with
  ``nn.MultiheadAttention`` (4 heads, width 32) and a ``LayerNorm``-ed feed-forward part,
  mean pooling, a linear head.
* ``Regression``: scikit-learn's Friedman #1 (10 features, noise 0.5, 1500 train / 250 / 250,
  standardized target), MLP 10-64-64-1, mean squared error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["PROBLEMS", "Problem", "train"]

Data = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Problem:
    """A model factory, its data, its loss, its epoch budget and whether it is a classifier."""

    make_model: Callable[[], nn.Module]
    make_data: Callable[[], Data]
    epochs: int
    classification: bool = True


def _split(X: Tensor, y: Tensor, n_train: int, n_val: int) -> Data:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    parts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val],
             "test": perm[n_train + n_val:]}
    return {k: (X[i], y[i]) for k, i in parts.items()}


def digits() -> Data:
    """Scikit-learn's digits, pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16
    return _split(X, torch.tensor(data.target), 1200, 237)


def majority_tokens(n: int = 2500, length: int = 12, vocab: int = 6) -> Data:
    """Random token sequences labelled with their most frequent token."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randint(vocab, (n, length), generator=gen)
    counts = nn.functional.one_hot(X, vocab).sum(1)
    return _split(X, counts.argmax(1), 2000, 250)  # argmax: first of the ties


def friedman() -> Data:
    """Friedman #1 regression, target standardized."""
    from sklearn.datasets import make_friedman1

    X, y = make_friedman1(n_samples=2000, n_features=10, noise=0.5, random_state=0)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    return _split(X, (y - y.mean()) / y.std(), 1500, 250)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def cnn(batchnorm: bool = False) -> nn.Module:
    def norm(c: int) -> nn.Module:
        return nn.BatchNorm2d(c) if batchnorm else nn.Identity()

    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                         nn.Conv2d(1, 8, 3, padding=1), norm(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), norm(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


class TinyTransformer(nn.Module):
    """Token + position embeddings, one pre-norm attention block, mean pooling, a head."""

    def __init__(self, vocab: int = 6, length: int = 12, width: int = 32, classes: int = 6):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1], device=x.device))
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        h = h + self.ff(self.norm2(h))
        return self.head(h.mean(1))


def regression_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 1), nn.Flatten(0))


PROBLEMS: dict[str, Problem] = {
    "MLP": Problem(mlp, digits, 5),
    "CNN": Problem(cnn, digits, 5),
    "CNN-BN": Problem(lambda: cnn(batchnorm=True), digits, 5),
    "Transformer": Problem(TinyTransformer, majority_tokens, 8),
    "Regression": Problem(regression_mlp, friedman, 8, classification=False),
}


def _loss(problem: Problem, output: Tensor, y: Tensor) -> Tensor:
    if problem.classification:
        return nn.functional.cross_entropy(output, y)
    return nn.functional.mse_loss(output, y)


@torch.no_grad()
def evaluate(problem: Problem, model: nn.Module, X: Tensor, y: Tensor) -> dict[str, float]:
    """``loss`` and, for classifiers, ``acc`` on ``(X, y)`` (model in eval mode)."""
    model.eval()
    output = model(X)
    model.train()
    loss = _loss(problem, output, y).item()
    result = {"loss": loss if math.isfinite(loss) else 1e9}
    if problem.classification:
        result["acc"] = (output.argmax(1) == y).float().mean().item()
    return result


def train(problem: Problem, data: Data, make_opt: Callable[[nn.Module], torch.optim.Optimizer],
          seed: int, batch: int = 64) -> dict:
    """One run: test metrics after the budget, validation loss, time per step, loss curve.

    The curve holds ``(seconds of training, mean training loss of the epoch)`` per epoch; the
    model and batch order depend on ``seed`` only (every method sees the same batches).
    """
    torch.manual_seed(seed)
    model = problem.make_model()
    opt = make_opt(model)
    X, y = data["train"]
    gen = torch.Generator().manual_seed(1000 + seed)
    clock, steps, curve = 0.0, 0, []
    for _ in range(problem.epochs):
        total, count = 0.0, 0
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            start = time.perf_counter()
            opt.zero_grad()
            loss = _loss(problem, model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            clock += time.perf_counter() - start
            steps += 1
            total += loss.item() * len(idx)
            count += len(idx)
        curve.append((clock, total / count if math.isfinite(total) else 1e9))
    result = {f"test_{k}": v for k, v in evaluate(problem, model, *data["test"]).items()}
    result.update({f"val_{k}": v for k, v in evaluate(problem, model, *data["val"]).items()})
    result.update(step_s=clock / steps, train_loss=curve[-1][1], curve=curve)
    if hasattr(opt, "close"):
        opt.close()
    return result
