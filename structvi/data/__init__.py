"""Small datasets shipped with structvi (no scikit-learn needed at run time).

The arrays are scikit-learn's ``load_breast_cancer`` and ``load_digits`` exported once by
``scripts/export_datasets.py``; the loaders return torch tensors ready for the demos.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_breast_cancer", "load_digits", "split"]


def _arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    with resources.files(__name__).joinpath(f"{name}.npz").open("rb") as f:
        data = np.load(f)
        return data["X"], data["y"]


def load_breast_cancer(
    dtype: torch.dtype = torch.float64, standardize: bool = True, bias: bool = True
) -> tuple[Tensor, Tensor]:
    """Wisconsin breast-cancer data: features ``(569, 30)`` (+ a bias column) and 0/1 labels.

    Args:
        dtype: dtype of both tensors.
        standardize: centre and scale every feature to unit standard deviation.
        bias: append a column of ones (``d = 31``).

    Returns:
        ``(X, y)``; ``y`` holds 0.0/1.0 in ``dtype``.
    """
    X_np, y_np = _arrays("breast_cancer")
    X = torch.as_tensor(X_np, dtype=dtype)
    if standardize:
        X = (X - X.mean(0)) / X.std(0)
    if bias:
        X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=dtype)], dim=1)
    return X, torch.as_tensor(y_np, dtype=dtype)


def load_digits(dtype: torch.dtype = torch.float32, images: bool = False) -> tuple[Tensor, Tensor]:
    """The 1797 8×8 handwritten digits, pixels scaled to [0, 1], labels 0…9 (int64).

    Args:
        dtype: dtype of the pixels.
        images: return ``(1797, 1, 8, 8)`` images instead of ``(1797, 64)`` rows.
    """
    X_np, y_np = _arrays("digits")
    X = torch.as_tensor(X_np.astype(np.float64) / 16.0, dtype=dtype)
    if images:
        X = X.reshape(-1, 1, 8, 8)
    return X, torch.as_tensor(y_np, dtype=torch.int64)


def split(
    X: Tensor, y: Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A seeded random train/test split ``(X_train, y_train, X_test, y_test)``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be in (0, 1), got test_fraction={test_fraction!r}"
        )
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * len(y))))
    test, train = perm[:n_test], perm[n_test:]
    return X[train], y[train], X[test], y[test]
