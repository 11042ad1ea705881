r"""Kronecker statistics of ``Linear`` and ``Conv2d`` layers (MATH §3.4).

A layer with weight :math:`W \in \mathbb{R}^{d_o \times d_i}` (a convolution's weight flattened to
``C_out × (C_in/groups·k₁·k₂)``, the bias appended as a last input column) gets two matrices of
rows: the processed inputs ``a`` (``n_a × d_K``, ``d_K = d_i (+1)``) and the processed output
gradients ``g`` (``n_g × d_o``). With the scalings of MATH §3.4,

.. math:: \bar A = \frac{1}{n_a} \sum_r a_r a_r^\top, \qquad
          \bar G = n_{\text{loss}} \sum_r g_r g_r^\top \ \ (\text{mean losses}), \quad
          \bar G = \sum_r g_r g_r^\top \ \ (\text{sum losses}),

so that :math:`\bar A \otimes \bar G` is the KFAC (empirical Fisher) block of the loss. The
optimizer never forms :math:`\bar A`: :class:`KroneckerStatistics` accumulates
:math:`H_K = \hat\Pi(K^\top \bar A K)` and :math:`H_C = \hat\Pi(C^\top \bar G C)` directly.

``kfac_approx="expand"`` keeps every weight-shared position (sequence element, output pixel) as a
row; ``"reduce"`` averages inputs and sums output gradients over them (Eschenhagen et al., 2023).
A convolution's input channel groups are averaged before unfolding (as in INGD/SINGD).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from structvi.optim.attention import owners as attention_owners
from structvi.structures.base import Structure

__all__ = [
    "KFAC_APPROXIMATIONS",
    "LOSS_AVERAGES",
    "SUPPORTED_MODULES",
    "KroneckerStatistics",
    "Layer",
    "WeakHook",
    "grad_rows",
    "gradient_matrix",
    "hookable",
    "input_rows",
    "is_supported",
    "layer_dims",
    "supported_owners",
    "weight_dims",
]

SUPPORTED_MODULES = (nn.Linear, nn.Conv2d)
KFAC_APPROXIMATIONS = ("expand", "reduce")
LOSS_AVERAGES = (None, "batch", "batch+sequence")


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` gets Kronecker factors.

    ``nn.MultiheadAttention``'s ``out_proj`` is a ``Linear`` that attention calls through
    ``F.linear`` on its bare weight: its forward hook never runs, so it is not a layer of its
    own here; :mod:`structvi.optim.attention` preconditions it with the input projection.
    """
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    return isinstance(module, SUPPORTED_MODULES)


def layer_dims(module: nn.Module, has_bias: bool) -> tuple[int, int]:
    """``(d_K, d_C)``: input-side dimension (bias column included) and output dimension."""
    return weight_dims(module.weight, has_bias)


def weight_dims(weight: Tensor, has_bias: bool) -> tuple[int, int]:
    """``(d_K, d_C)`` of a layer with this weight (conv weights flattened)."""
    return weight[0].numel() + int(has_bias), weight.shape[0]


@dataclass(frozen=True)
class Layer:
    """A preconditioned layer: its name, module, weight and bias (``None``: no bias column)."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None


def supported_owners(model: nn.Module) -> dict[Tensor, list[tuple[str, nn.Module, str]]]:
    """Parameter → ``[(layer name, layer, "weight" | "bias")]`` over supported layers.

    ``nn.MultiheadAttention`` contributes its input and output projections
    (:func:`structvi.optim.attention.owners`).
    """
    owners: dict[Tensor, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules():
        for p, owner in attention_owners(name, module):
            owners.setdefault(p, []).append(owner)
        if not is_supported(module):
            continue
        for role in ("weight", "bias"):
            p = getattr(module, role, None)
            if isinstance(p, nn.Parameter):
                owners.setdefault(p, []).append((name, module, role))
    return owners


def gradient_matrix(layer: Layer, scale: float, out: Tensor | None = None) -> Tensor:
    """``[∇W, ∇b] / s`` as a ``(d_C, d_K)`` matrix (conv weights flattened).

    ``out``: a contiguous ``(d_C, d_K)`` tensor of the weight gradient's dtype to write it into
    (the result is then always a copy); otherwise the gradient itself when ``s = 1`` without bias.
    """
    G = layer.weight.grad.flatten(1)
    if out is not None:
        if layer.bias is None:
            out.copy_(G)
        else:
            out[:, :-1].copy_(G)
            bias_grad = layer.bias.grad
            out[:, -1].copy_(0 if bias_grad is None else bias_grad)
        return out if scale == 1.0 else out.div_(scale)
    if layer.bias is not None:
        bias_grad = layer.bias.grad
        bias_grad = torch.zeros_like(layer.bias) if bias_grad is None else bias_grad
        G = torch.cat([G, bias_grad.to(G.dtype)[:, None]], dim=1)
    return G if scale == 1.0 else G / scale


# ---------------------------------------------------------------------------------- hooks
class WeakHook:
    """A module hook calling a method of its owner (the optimizer) through a weak reference.

    The model does not keep the optimizer alive, and a copy of the model (``copy.deepcopy``,
    pickling) gets inert hooks instead of a copy of the optimizer.
    """

    def __init__(self, owner: object | None, method: str) -> None:
        self._ref = None if owner is None else weakref.ref(owner)
        self._method = method

    def __call__(self, *args: Any) -> Any:
        """Call the owner's method (nothing once the owner is gone or for a copy)."""
        owner = None if self._ref is None else self._ref()
        return None if owner is None else getattr(owner, self._method)(*args)

    @property
    def inert(self) -> bool:
        """Whether this hook can never call anything (a copy, or its owner is gone)."""
        return self._ref is None or self._ref() is None

    def __deepcopy__(self, memo: dict) -> WeakHook:
        return WeakHook(None, self._method)

    def __reduce__(self) -> tuple:
        return (WeakHook, (None, self._method))


def hookable(output: Tensor) -> Tensor:
    """The tensor whose gradient hook sees ``∂ℓ/∂output`` even after an in-place activation.

    ``Linear`` on inputs with leading dimensions returns a reshaped view of a 2-D result; an
    in-place op on that view replaces its autograd node, so a hook on the view never runs. The
    base (same elements, same order) keeps its node: hook it and reshape the gradient.
    """
    base = output._base
    if (base is not None and base.numel() == output.numel() and base.is_contiguous()
            and output.is_contiguous() and base.storage_offset() == output.storage_offset()):
        return base
    return output


# ---------------------------------------------------------------------------------- inputs
def input_rows(x: Tensor, module: nn.Module, kfac_approx: str, has_bias: bool) -> Tensor:
    """Unscaled rows ``a`` of shape ``(n_a, d_K)`` for a layer input ``x`` (MATH §3.4 table)."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        x = _group_mean(_pad(x, module), module.groups)
        rows = _patches(x, module) if kfac_approx == "expand" else _mean_patches(x, module)
    else:
        x = x.reshape(1, -1) if x.dim() == 1 else x
        if kfac_approx == "expand" or x.dim() == 2:
            rows = x.reshape(-1, x.shape[-1])
        else:
            rows = x.flatten(1, -2).mean(1)
    if has_bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def _padding(module: nn.Conv2d) -> list[int]:
    """``F.pad`` amounts ``[left_W, right_W, left_H, right_H]`` of a convolution."""
    pads: list[int] = []
    for j in (1, 0):
        k, d = module.kernel_size[j], module.dilation[j]
        if module.padding == "same":
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        elif module.padding == "valid":
            pads += [0, 0]
        else:
            pads += [module.padding[j]] * 2
    return pads


def _pad(x: Tensor, module: nn.Conv2d) -> Tensor:
    """Apply the convolution's padding explicitly (any ``padding_mode``, unequal sides)."""
    pads = _padding(module)
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def _group_mean(x: Tensor, groups: int) -> Tensor:
    """Average the input channel groups: ``(B, C_in, H, W) → (B, C_in/groups, H, W)``."""
    if groups == 1:
        return x
    return x.unflatten(1, (groups, -1)).mean(1)


def _patches(x: Tensor, module: nn.Conv2d) -> Tensor:
    """Every patch as a row: ``(B·O₁·O₂, C_in/groups·k₁·k₂)`` (expand)."""
    unfolded = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])


def _mean_patches(x: Tensor, module: nn.Conv2d) -> Tensor:
    """Patches averaged over output locations: ``(B, C_in/groups·k₁·k₂)`` (reduce).

    ``mean_o x[o·s + k·d] = Σ_i x[i] P[k, i]`` with ``P[k, i] = #{o : o·s + k·d = i} / O`` per
    spatial dimension, so no ``B·O₁·O₂`` patch matrix is formed.
    """
    p1, p2 = (
        _location_average(x.shape[2 + j], module.kernel_size[j], module.stride[j],
                          module.dilation[j], x)
        for j in (0, 1)
    )
    return torch.einsum("bcij,ki,lj->bckl", x, p1, p2).flatten(1)


def _location_average(size: int, kernel: int, stride: int, dilation: int, like: Tensor) -> Tensor:
    """``P`` of :func:`_mean_patches` for one spatial dimension: shape ``(kernel, size)``."""
    out = (size - dilation * (kernel - 1) - 1) // stride + 1
    index = (torch.arange(out, device=like.device)[None, :] * stride
             + torch.arange(kernel, device=like.device)[:, None] * dilation)
    weights = torch.full(index.shape, 1.0 / out, dtype=like.dtype, device=like.device)
    return torch.zeros(kernel, size, dtype=like.dtype, device=like.device).scatter_add_(
        1, index, weights
    )


# ---------------------------------------------------------------------------------- gradients
def grad_rows(
    g: Tensor, module: nn.Module, kfac_approx: str, loss_average: str | None
) -> tuple[Tensor, int]:
    """Unscaled rows of the output gradient, shape ``(n_g, d_o)``, and the number of loss terms.

    The number of loss terms is the batch size (``"batch"``), batch size times the weight-sharing
    size (``"batch+sequence"``) or 1 (``None``, a summed loss: no rescaling).
    """
    if isinstance(module, nn.Conv2d):
        g = g.unsqueeze(0) if g.dim() == 3 else g
        shared = g.shape[2:].numel()
        g = g.flatten(2).transpose(1, 2)  # (B, O₁O₂, C_out)
    else:
        g = g.reshape(1, -1) if g.dim() == 1 else g
        shared = g.shape[1:-1].numel()
        g = g.reshape(g.shape[0], -1, g.shape[-1])  # (B, R, d_o)
    rows = g.reshape(-1, g.shape[-1]) if kfac_approx == "expand" else g.sum(1)
    if loss_average is None:
        return rows, 1
    return rows, g.shape[0] * (shared if loss_average == "batch+sequence" else 1)


# ---------------------------------------------------------------------------------- accumulation
@dataclass
class _Side:
    """One factor's running sum ``Σ Π̂(Fᵀ xᵀ x F)·w`` and its normalizer ``count``.

    The weight ``w`` is ``1/first`` (input side) or ``first`` (gradient side of an averaged
    loss), where ``first`` is the count of the first contribution of the period.
    """

    total: Structure | None = None
    first: int = 0
    count: int = 0  # rows (input side) or loss terms (gradient side)

    def add(self, factor: Structure, rows: Tensor, count: int, inverse: bool | None) -> None:
        """Add ``Π̂(Fᵀ rowsᵀ rows F)`` scaled by ``1/first`` (``inverse``), ``first`` or 1."""
        if self.total is None:
            self.first = max(count, 1)
        x = rows.T
        if inverse is not None and self.first != 1:
            x = x / math.sqrt(self.first) if inverse else x * math.sqrt(self.first)
        term = factor.inner_project(x)
        self.total = term if self.total is None else self.total.add(term)
        self.count += count


@dataclass
class KroneckerStatistics:
    r"""Accumulates :math:`H_K, H_C` of one layer over backward passes until the next update.

    Each contribution is pre-scaled like SINGD's (``a/√n_a``, ``g·√n_loss``, with the sizes of
    the *first* contribution) so that magnitudes stay O(1) in low precision; :meth:`finalize`
    then applies the exact normalization with the totals: ``H_K`` is divided by the total number
    of rows and, for averaged losses, ``H_C`` multiplied by the total number of loss terms.
    Hence M micro-batches give the statistics of one batch for averaged *and* summed losses
    (the latter is singd issue #43, MATH §5.3), and a single batch reproduces SINGD exactly.

    Args:
        mean_loss: whether the loss is an average (``loss_average`` is not ``None``).
    """

    mean_loss: bool
    input_side: _Side = field(default_factory=_Side)
    grad_side: _Side = field(default_factory=_Side)
    last_forward: int | None = None

    def add(self, K: Structure, C: Structure, a: Tensor, g: Tensor, n_loss: int) -> None:
        """Add one backward pass: rows ``a`` (``n_a × d_K``) and ``g`` (``n_g × d_C``).

        ``n_loss`` is the number of loss terms this pass adds (0 for a second call of the layer
        within one forward pass, which shares that forward's loss terms).
        """
        self.input_side.add(K, a, a.shape[0], inverse=True)
        self.grad_side.add(C, g, n_loss, inverse=False if self.mean_loss else None)

    def finalize(self) -> tuple[Structure, Structure]:
        """``(H_K, H_C)``: the normalized statistics of everything added so far."""
        inputs, grads = self.input_side, self.grad_side
        H_K = _rescale(inputs.total, inputs.first / inputs.count)
        if not self.mean_loss:
            return H_K, grads.total
        return H_K, _rescale(grads.total, grads.count / grads.first)


def _rescale(s: Structure, c: float) -> Structure:
    return s if c == 1.0 else s.scale(c)
