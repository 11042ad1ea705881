"""Errors name the argument, the value received and the expectation."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD
from tests.optim.helpers import mlp


@pytest.mark.parametrize("structures, pattern", [
    ("nonsense", r"structures: unknown structure 'nonsense'; expected one of \[.*'dense'"),
    (("dense", "kronecker"), r"structures: 'kronecker' cannot be an optimizer factor .*VI only"),
    (("dense",), r"structures must be a structure or a pair \(K, C\).*got structures=\('dense',\)"),
    ({"block_size": 3}, r"structures: each entry must be a structure name or a dict"),
    ({"name": "block_diagonal", "block_size": 2.5}, r"option block_size=2.5 .* integer"),
    ({"name": "block_diagonal", "block_size": 0}, r"'block_diagonal' for K of layer '0' \(dim=6\)"),
    ({"name": "hierarchical", "k1": -1, "k2": 4},
     r"'hierarchical' for K of layer '0' \(dim=6\).*k1 must be"),
], ids=["unknown", "kronecker", "not_a_pair", "no_name", "float_option", "bad_option",
        "negative_option"])
def test_bad_structures(structures, pattern):
    with pytest.raises(ValueError, match=pattern):
        StructuredNGD(mlp(), structures=structures)


@pytest.mark.parametrize("name, value, expectation", [
    ("lr", -1e-3, ">= 0"), ("momentum", -0.1, ">= 0"), ("momentum", 1.0, "< 1.0"),
    ("damping", -1.0, ">= 0"), ("alpha1", -0.5, ">= 0"), ("weight_decay", -1e-2, ">= 0"),
    ("lr_cov", -1e-2, ">= 0"), ("init_grad_scale", 0.0, "> 0"), ("eps", -1e-8, "> 0"),
    ("beta2", 1.5, "< 1.0"), ("lr", float("nan"), "finite"), ("T", 0, "integer >= 1"),
    ("T", 2.5, "integer >= 1"), ("kfac_approx", "full", "('expand', 'reduce')"),
    ("loss_average", "mean", "(None, 'batch', 'batch+sequence')"),
    ("retraction", "cayley", "('quadratic', 'first_order', 'expm')"),
    ("preconditioner_dtype", (torch.int32, None), "pair (dtype_K, dtype_C) of floating"),
    ("momentum_dtype", "bf16", "floating torch.dtype or None"),
    ("kfac_like", 1, "bool"),
])
def test_bad_hyper_parameters(name, value, expectation):
    with pytest.raises(ValueError) as info:
        StructuredNGD(mlp(), **{name: value})
    message = str(info.value)
    assert message.startswith(name) and f"{name}={value!r}" in message
    assert expectation in message


def test_bad_value_in_a_param_group_names_the_group():
    net = mlp()
    groups = [{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": -1.0}]
    with pytest.raises(ValueError, match=re.escape("lr (param group 1) must be a finite number "
                                                   ">= 0.0, got lr=-1.0")):
        StructuredNGD(net, groups)


def test_weight_and_bias_in_different_groups():
    net = mlp()
    groups = [{"params": [net[0].weight, net[2].weight, net[2].bias]}, {"params": [net[0].bias]}]
    with pytest.raises(ValueError, match=re.escape(
            "params: 0.weight and 0.bias must be in the same param group, got groups 0 and 1")):
        StructuredNGD(net, groups)
    assert not net._forward_pre_hooks and not net[2]._forward_hooks  # nothing left behind


def test_shared_weight_between_layers():
    net = mlp(5, 5, 5)
    net[2].weight = net[0].weight
    with pytest.raises(ValueError, match=r"shared by the layers \['0.weight', '2.weight'\]"):
        StructuredNGD(net)


def test_wrapped_or_non_module_models():
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        StructuredNGD([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="must not be wrapped in DataParallel"):
        StructuredNGD(nn.DataParallel(mlp()))
