r"""Bayesian model averaging and calibration metrics for variationally trained networks.

* :func:`predict` — :math:`p(y \mid x) \approx \frac1S \sum_s \mathrm{softmax}(f(x; W_s))` with
  ``W_s`` drawn by ``optimizer.sampled_params()`` (:class:`~structvi.optim.VariationalNGD`, or
  IVON's ``ivon.IVON``), batched over ``x``.
* :func:`calibration` — accuracy, negative log-likelihood, expected calibration error (ECE) and
  the reliability-diagram bins of predictive probabilities.
* :func:`ece_floor` — the ECE a perfectly calibrated predictor with the same probabilities
  would show on as many points: binned ECE is biased upwards at finite sample size, the more
  so the more points sit at middling confidence (Kumar et al., 2019; Roelofs et al., 2022).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["calibration", "ece_floor", "predict"]


def _softmax(logits: Tensor) -> Tensor:
    wide = logits.dtype in (torch.float32, torch.float64)
    return torch.softmax(logits if wide else logits.float(), dim=-1)


def _sampler(optimizer: Any, generator: torch.Generator | None) -> Callable[[], Any]:
    """A callable returning a prediction draw's context manager for ``optimizer``."""
    sampled = getattr(optimizer, "sampled_params", None)
    if sampled is None:
        raise TypeError(f"optimizer: {type(optimizer).__name__} has no sampled_params(); pass a "
                        "VariationalNGD (or ivon.IVON), or samples=0 for a point prediction")
    if generator is None:
        return lambda: sampled(train=False)
    if "generator" not in inspect.signature(sampled).parameters:
        raise TypeError(f"generator: {type(optimizer).__name__}.sampled_params() takes no "
                        "generator; pass generator=None (torch's global generator is used)")
    return lambda: sampled(train=False, generator=generator)


@torch.no_grad()
def predict(
    model: nn.Module, optimizer: Any, x: Tensor, samples: int = 32, *,
    generator: torch.Generator | None = None, batch_size: int | None = None,
    link: Callable[[Tensor], Tensor] | None = _softmax,
) -> Tensor:
    """Bayesian model average of predictive probabilities, ``(1/S) Σ_s link(model(x; W_s))``.

    Each of the ``samples`` weight draws is used for every batch of ``x``, so the result does
    not depend on ``batch_size``; with a ``generator`` it is reproducible. The model's mode
    (``train``/``eval``) is left as it is: call ``model.eval()`` first for dropout or batch norm.

    Args:
        model: the network the optimizer trains.
        optimizer: a :class:`~structvi.optim.VariationalNGD` (or anything with a
            ``sampled_params(train=False)`` context manager, e.g. ``ivon.IVON``); ignored when
            ``samples == 0``.
        x: inputs, batched along the first dimension.
        samples: number of posterior draws ``S``; ``0`` predicts at the mean weights.
        generator: source of the draws (needs ``sampled_params(generator=...)``).
        batch_size: rows of ``x`` per forward pass (``None``: all at once).
        link: maps the model output to probabilities (default: softmax over the last
            dimension, in float32 or wider); ``None`` averages the raw outputs.

    Returns:
        The averaged probabilities, shape of ``link(model(x))``, float32 or wider.

    Raises:
        ValueError: ``samples`` < 0 or ``batch_size`` < 1.
        TypeError: ``x`` is not a tensor, or ``optimizer`` cannot draw weights.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an integer >= 0, got samples={samples!r}")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got "
                         f"batch_size={batch_size!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    link = link or (lambda out: out)
    chunks = x.split(batch_size or max(len(x), 1))

    def once() -> Tensor:
        out = torch.cat([link(model(chunk)) for chunk in chunks])
        return out if out.dtype in (torch.float32, torch.float64) else out.float()

    if samples == 0:
        return once()
    draw = _sampler(optimizer, generator)
    total = None
    for _ in range(samples):
        with draw():
            probs = once()
        total = probs if total is None else total.add_(probs)
    return total.div_(samples)


def calibration(probs: Tensor, y: Tensor, bins: int = 15) -> dict[str, Any]:
    """Accuracy, NLL, expected calibration error and reliability bins of class probabilities.

    ECE uses ``bins`` equal-width confidence bins on the top-class probability:
    ``Σ_b (n_b/n) |acc_b − conf_b|``.

    Args:
        probs: predictive probabilities, shape ``(n, classes)``.
        y: integer labels, shape ``(n,)``.
        bins: number of confidence bins (≥ 1).

    Returns:
        ``{"acc", "nll", "ece"}`` (floats) and ``"bins"``: a list of
        ``{"lower", "upper", "count", "acc", "conf"}`` (``acc``/``conf`` ``None`` when empty).

    Raises:
        ValueError: shapes that do not match, or ``bins`` < 1.
    """
    if probs.dim() != 2 or y.shape != probs.shape[:1]:
        raise ValueError(f"probs must be (n, classes) and y (n,), got {tuple(probs.shape)} and "
                         f"{tuple(y.shape)}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got bins={bins!r}")
    probs = probs.double()
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    true_prob = probs.gather(1, y[:, None]).squeeze(1)
    nll = -true_prob.clamp_min(1e-12).log().mean().item()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(conf, edges[1:-1], right=True)
    table, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        n_b = int(mask.sum())
        acc_b = correct[mask].mean().item() if n_b else None
        conf_b = conf[mask].mean().item() if n_b else None
        if n_b:
            ece += n_b / len(y) * abs(acc_b - conf_b)
        table.append(dict(lower=edges[b].item(), upper=edges[b + 1].item(), count=n_b,
                          acc=acc_b, conf=conf_b))
    acc = correct.mean().item()
    return dict(acc=acc, nll=nll if math.isfinite(nll) else float("inf"), ece=ece, bins=table)


def ece_floor(probs: Tensor, bins: int = 15, draws: int = 200,
              generator: torch.Generator | None = None) -> float:
    """Expected ECE of a *calibrated* predictor with these probabilities, on as many points.

    Labels are drawn from ``probs`` itself (so the predictor is calibrated by construction) and
    the ECE of :func:`calibration` against them is averaged over ``draws`` label sets. An ECE
    near this floor cannot be told from perfect calibration at this sample size; a predictor
    with many middling confidences has a higher floor than a confident one, so compare
    ``ece − ece_floor`` between predictors whose confidences differ.

    Args:
        probs: predictive probabilities, shape ``(n, classes)``, rows summing to 1.
        bins: confidence bins, as in :func:`calibration`.
        draws: label sets averaged (≥ 1).
        generator: source of the labels (``None``: torch's global generator).

    Returns:
        The mean ECE over the label sets.

    Raises:
        ValueError: ``probs`` not ``(n, classes)`` with non-negative finite entries and a
            positive sum per row, or ``draws`` < 1.
    """
    if probs.dim() != 2 or len(probs) == 0:
        raise ValueError(f"probs must be (n, classes) with n >= 1, got {tuple(probs.shape)}")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ValueError("probs must be finite and non-negative")
    if bool((probs.sum(-1) <= 0).any()):
        raise ValueError("probs must have a positive sum in every row")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got draws={draws!r}")
    probs = probs.double()
    total = 0.0
    for _ in range(draws):
        labels = torch.multinomial(probs, 1, generator=generator)[:, 0]
        total += calibration(probs, labels, bins)["ece"]
    return total / draws
