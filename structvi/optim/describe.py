"""What :class:`~structvi.optim.StructuredNGD` does with each parameter, and its diagnostics.

* :func:`rules` — one record per trained parameter: its name, shape, group, rule
  (``"kronecker"`` with the layer, the structures and sizes of ``K`` and ``C``, or
  ``"diagonal"`` with its step size ``lr · diagonal_lr_ratio`` and, where it applies, why a
  parameter of a known layer kind is not preconditioned).
* :func:`describe` — the same as a text table (``StructuredNGD.describe()``).
* :func:`log_summary` — the one-time message at construction: logged at ``INFO`` level on the
  ``"structvi.optim"`` logger (silent unless logging is configured, e.g.
  ``logging.basicConfig(level=logging.INFO)``), saying how many parameters each rule covers.
* :func:`diagnostics` — per preconditioned layer, how far the preconditioner is from the
  identity it starts at, and the ratio of the preconditioned step to the raw gradient
  (``StructuredNGD.diagnostics()``; see docs/optimizer_tuning.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from structvi.optim import functional as F
from structvi.optim import kfac

__all__ = ["describe", "diagnostics", "log_summary", "rules"]

LOGGER = logging.getLogger("structvi.optim")


def _structure_text(spec: dict[str, Any]) -> str:
    options = ", ".join(f"{k}={v}" for k, v in spec["options"].items())
    return f"{spec['name']}({spec['dim']}{', ' + options if options else ''})"


def _why_diagonal(opt: Any, p: Tensor) -> str:
    """Why a parameter follows the diagonal rule (empty: no layer kind claims it)."""
    owners = opt._owners.get(p, [])
    if len(owners) == 1:  # a layer's bias whose weight is frozen or in no group
        return f"bias of {owners[0][0]!r} whose weight is not trained by this optimizer"
    return opt._notes.get(p, "")


def rules(opt: Any) -> list[dict[str, Any]]:
    """One record per parameter of the optimizer's groups, in group order."""
    records = []
    for index, group in enumerate(opt.param_groups):
        for p in group["params"]:
            record = {"name": opt._names.get(p, f"<unnamed {tuple(p.shape)}>"),
                      "shape": tuple(p.shape), "numel": p.numel(), "group": index}
            layer = opt._layers.get(p) or opt._biases.get(p)
            if layer is not None:
                spec_K, spec_C = opt._specs(layer, group)
                record.update(rule="kronecker", layer=layer.name,
                              role="weight" if layer.weight is p else "bias",
                              K=_structure_text(spec_K), C=_structure_text(spec_C))
            else:
                record.update(rule="diagonal", lr=group["lr"] * group["diagonal_lr_ratio"],
                              note=_why_diagonal(opt, p))
            records.append(record)
    return records


def describe(opt: Any) -> str:
    """A text table of :func:`rules` and the parameter counts per rule."""
    lines = []
    for r in rules(opt):
        head = f"{r['name']:<32s} {str(list(r['shape'])):<14s} group {r['group']}  "
        if r["rule"] == "kronecker":
            lines.append(head + f"kronecker  layer {r['layer']!r} ({r['role']}), "
                         f"K = {r['K']}, C = {r['C']}")
        else:
            note = f"  ({r['note']})" if r["note"] else ""
            lines.append(head + f"diagonal   AdamW-style, lr = {r['lr']:.3g}{note}")
    return "\n".join([summary(opt), *lines])


def summary(opt: Any) -> str:
    """``"StructuredNGD: Kronecker rule on … ; diagonal rule on …"``."""
    counts = {"kronecker": [0, 0], "diagonal": [0, 0]}
    for r in rules(opt):
        counts[r["rule"]][0] += 1
        counts[r["rule"]][1] += r["numel"]
    layers = len(opt._layers)
    return (f"StructuredNGD: Kronecker rule on {layers} layer(s), {counts['kronecker'][0]} "
            f"tensor(s), {counts['kronecker'][1]} parameters; diagonal (AdamW-style) rule on "
            f"{counts['diagonal'][0]} tensor(s), {counts['diagonal'][1]} parameters "
            "(opt.describe() lists them)")


def log_summary(opt: Any) -> None:
    """Log :func:`summary` once at ``INFO`` on the ``structvi.optim`` logger."""
    if LOGGER.isEnabledFor(logging.INFO):
        LOGGER.info(summary(opt))


@torch.no_grad()
def diagnostics(opt: Any) -> dict[str, dict[str, float]]:
    r"""Per preconditioned layer: is the preconditioner doing something?

    * ``K_deviation``, ``C_deviation``: :math:`\|S S^\top / \overline{\mathrm{tr}}(S S^\top) -
      I\|_F / \sqrt d` for ``S = K, C`` — 0 for the identity the factors start at (and for a
      frozen preconditioner, ``lr_cov = 0``); it grows as the factors learn the curvature's
      shape (a scale change alone leaves it at 0).
    * ``cosine``: the cosine between the current gradient ``G`` (``.grad``, present after a
      backward pass) and the preconditioned gradient ``C Cᵀ G K Kᵀ``: 1 at the identity; the
      further below 1, the more the preconditioner turns the step away from the gradient.
    * ``step``: the layer's step count.
    """
    report = {}
    for layer in opt._layers.values():
        factors = opt._factors(layer)
        entry = {"K_deviation": _deviation(factors.K), "C_deviation": _deviation(factors.C),
                 "step": int(opt.state[layer.weight]["step"])}
        if layer.weight.grad is not None:
            G = kfac.gradient_matrix(layer, 1.0).double()
            direction = F.precondition(G, factors.K.to(torch.float64), factors.C.to(torch.float64))
            norms = G.norm() * direction.norm()
            entry["cosine"] = float((G * direction).sum() / norms) if norms > 0 else float("nan")
        report[layer.name] = entry
    return report


def _deviation(S: Any) -> float:
    dense = S.to_dense().double()
    gram = dense @ dense.T
    gram = gram / (gram.diagonal().mean())
    eye = torch.eye(S.dim, dtype=gram.dtype, device=gram.device)
    return float((gram - eye).norm() / S.dim**0.5)
