r"""Kronecker statistics of ``nn.MultiheadAttention``'s projections.

``nn.MultiheadAttention`` calls its projections functionally
(``F.multi_head_attention_forward`` applies ``F.linear`` to the bare ``in_proj_weight`` and
``out_proj.weight``), so module hooks on ``out_proj`` never run and the input projection has no
module at all. Two Kronecker layers per attention module are preconditioned instead:

* ``<name>.in_proj``: ``in_proj_weight`` (``3E × E``) with ``in_proj_bias``, one layer with
  ``d_K = E (+1)`` and ``d_C = 3E``. For self-attention (``query is key is value``) PyTorch
  applies it in one product, and the statistics are those of a ``Linear(E, 3E)``. When the
  query, key and value differ it applies row blocks of the weight to different inputs; each
  block's rows ``a`` then come with output gradients that are zero outside the block's rows,
  which is the Kronecker approximation of a layer applied to every input once.
* ``<name>.out_proj``: an ``E × E`` ``Linear``.

Attention modules with separate ``q/k/v_proj_weight`` (``kdim`` or ``vdim`` different from
``embed_dim``) keep those three on the diagonal rule (:meth:`StructuredNGD.describe` says so);
their ``out_proj`` is preconditioned.

How the rows are found: a forward hook on the attention module (on steps that collect
statistics) walks the autograd graph of the attention output back to the module's inputs and
puts a pre-hook on each matrix-product node whose second operand is (a row block of) a
projection weight: the node's saved first operand is the layer input ``a``, the gradient the
pre-hook receives is ``∂ℓ/∂(a Wᵀ)``. The graph walk relies on PyTorch's autograd node names
(``AddmmBackward0``, ``MmBackward0``, ``TBackward0``, ``Split*Backward0``, and autocast's
``ToCopyBackward0``); a node layout it
does not recognise records nothing, and the optimizer's "no statistics were recorded" warning
says so.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ATTENTION_MODULES", "install", "owners", "parent", "unsupported"]

ATTENTION_MODULES = (nn.MultiheadAttention,)
_PARENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # out_proj → attention
_PRODUCTS = {"AddmmBackward0": ("_saved_mat1", 2), "MmBackward0": ("_saved_self", 1)}
_SPLITS = {"SplitBackward0", "SplitWithSizesBackward0", "UnsafeSplitBackward0",
           "UnsafeSplitWithSizesBackward0"}


def owners(name: str, module: nn.Module) -> Iterator[tuple[Tensor, tuple[str, nn.Module, str]]]:
    """``(parameter, (layer name, module, role))`` of the projections of an attention module."""
    if not isinstance(module, ATTENTION_MODULES):
        return
    prefix = f"{name}." if name else ""
    if module.in_proj_weight is not None:
        for role, p in (("weight", module.in_proj_weight), ("bias", module.in_proj_bias)):
            if isinstance(p, nn.Parameter):
                yield p, (prefix + "in_proj", module, role)
    out = module.out_proj
    _PARENTS[out] = module
    for role in ("weight", "bias"):
        p = getattr(out, role, None)
        if isinstance(p, nn.Parameter):
            yield p, (prefix + "out_proj", out, role)


def unsupported(module: nn.Module) -> dict[str, str]:
    """Parameter name (in ``module``) → why an attention parameter is on the diagonal rule."""
    if not isinstance(module, ATTENTION_MODULES) or module.in_proj_weight is not None:
        return {}
    why = "separate q/k/v projection weights (kdim/vdim != embed_dim) are not preconditioned"
    return {n: why for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")}


def parent(module: nn.Module) -> nn.Module | None:
    """The attention module a preconditioned layer belongs to (``None``: not attention)."""
    if isinstance(module, ATTENTION_MODULES):
        return module
    return _PARENTS.get(module)


def install(optimizer: Any, layer: Any) -> None:
    """Put the statistics hook on the attention module of ``layer`` (once per module)."""
    from structvi.optim.kfac import WeakHook

    module = parent(layer.module)
    if module in optimizer._attention_hooked:
        return
    optimizer._attention_hooked.add(module)
    hook = WeakHook(optimizer, "_attention_hook")
    optimizer._handles.append(module.register_forward_hook(hook, with_kwargs=True))


def forward_hook(optimizer: Any, module: nn.Module, args: tuple, kwargs: dict,
                 output: Any) -> None:
    """On steps that collect statistics, hook the projection products of this forward pass."""
    out = output[0] if isinstance(output, tuple) else output
    if not torch.is_grad_enabled() or not isinstance(out, Tensor) or out.grad_fn is None:
        return
    layers = {}
    for weight in (module.in_proj_weight, module.out_proj.weight):
        layer = optimizer._layers.get(weight)
        if layer is not None and optimizer._collects(layer):
            layers[weight] = layer
    if not layers:
        return
    inputs = [kwargs.get(k, args[i] if i < len(args) else None)
              for i, k in enumerate(("query", "key", "value"))]
    n_loss = _loss_terms(inputs[0], module.batch_first)
    optimizer._layer_calls += 1
    forward_id = optimizer._forward_count or -optimizer._layer_calls
    stop = {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}
    for node, weight, rows in _products(out.grad_fn, layers, stop):
        hook = functools.partial(_record, weakref.ref(optimizer), layers[weight], node, rows,
                                 n_loss, forward_id)
        node.register_prehook(hook)


def _loss_terms(query: Any, batch_first: bool) -> dict[str, int]:
    """Batch size and tokens per sequence of the attention input (unbatched: one sequence)."""
    if not isinstance(query, Tensor) or query.dim() < 3:
        length = query.shape[0] if isinstance(query, Tensor) else 1
        return {"batch": 1, "sequence": length}
    batch, length = (query.shape[0], query.shape[1]) if batch_first else (
        query.shape[1], query.shape[0])
    return {"batch": batch, "sequence": length}


def _products(root: Any, layers: dict[Tensor, Any], stop: set
              ) -> Iterator[tuple[Any, Tensor, slice]]:
    """``(node, weight, output rows)`` of every matrix product with a projection weight."""
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        found = _weight_operand(node, layers)
        if found is not None:
            yield (node, *found)
        todo.extend(n for n, _ in node.next_functions)


def _weight_operand(node: Any, layers: dict[Tensor, Any]) -> tuple[Tensor, slice] | None:
    """``(weight, rows)`` when ``node`` is ``x @ W[rows]ᵀ`` for a hooked projection weight."""
    kind = _PRODUCTS.get(type(node).__name__)
    if kind is None or len(node.next_functions) < kind[1] + 1:
        return None
    transpose = node.next_functions[kind[1]][0]
    if transpose is None or type(transpose).__name__ != "TBackward0":
        return None
    source, index = _skip_casts(transpose.next_functions[0])
    variable = getattr(source, "variable", None)
    if variable is not None:
        return (variable, slice(0, variable.shape[0])) if variable in layers else None
    if source is None or type(source).__name__ not in _SPLITS:
        return None
    leaf = _skip_casts(source.next_functions[0])[0]
    variable = getattr(leaf, "variable", None)
    if variable is None or variable not in layers:
        return None
    sizes = _split_sizes(source, variable.shape[0])
    start = sum(sizes[:index])
    return variable, slice(start, start + sizes[index])


def _skip_casts(edge: tuple[Any, int]) -> tuple[Any, int]:
    """Follow ``(node, output index)`` past dtype casts (autocast copies the weight)."""
    while edge[0] is not None and type(edge[0]).__name__ == "ToCopyBackward0":
        edge = edge[0].next_functions[0]
    return edge


def _split_sizes(node: Any, total: int) -> list[int]:
    sizes = getattr(node, "_saved_split_sizes", None)
    if sizes is not None:
        return list(sizes)
    size = int(node._saved_split_size)
    return [min(size, total - s) for s in range(0, total, size)]


def _record(ref: weakref.ref, layer: Any, node: Any, rows: slice, n_loss: dict[str, int],
            forward_id: int, grad_outputs: tuple[Tensor, ...]) -> None:
    """Node pre-hook: the product's input and output gradient as Kronecker rows."""
    optimizer = ref()
    grad = grad_outputs[0] if grad_outputs else None
    if optimizer is None or grad is None:
        return
    x = getattr(node, _PRODUCTS[type(node).__name__][0])
    _add_rows(optimizer, layer, x.detach(), grad.detach(), rows, n_loss, forward_id)


def _add_rows(optimizer: Any, layer: Any, x: Tensor, grad: Tensor, rows: slice,
              terms: dict[str, int], forward_id: int) -> None:
    """Kronecker rows of one product: ``x`` its 2-D input (rows ordered (position, sequence)),
    ``grad`` the gradient of its output, the rows ``rows`` of the layer's weight."""
    group = optimizer.param_groups[optimizer._group_index[layer.weight]]
    factors = optimizer._factors(layer)
    with torch.autocast(x.device.type, enabled=False):
        a, g = x.to(factors.K.dtype), grad.to(factors.C.dtype)
        d_out = layer.weight.shape[0]
        if g.shape[1] != d_out:  # a row block of the weight: zero gradient in the other rows
            index = torch.arange(rows.start, rows.stop, device=g.device)
            g = g.new_zeros(g.shape[0], d_out).index_copy_(1, index, g)
        if group["kfac_approx"] == "reduce":  # average inputs, sum gradients over positions
            a = a.unflatten(0, (-1, terms["batch"])).mean(0)
            g = g.unflatten(0, (-1, terms["batch"])).sum(0)
        if layer.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        previous_scale = float(optimizer.state[layer.weight]["grad_scale"])
        if previous_scale != 1.0:
            g = g / math.sqrt(previous_scale)
        n_loss = {None: 1, "batch": terms["batch"],
                  "batch+sequence": terms["batch"] * terms["sequence"]}[group["loss_average"]]
        optimizer._accumulate(layer, a, g, n_loss, forward_id)
