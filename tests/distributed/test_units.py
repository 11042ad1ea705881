"""Single-process pieces of the data-parallel code: assignment rule, argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structvi.distributed import DataParallelVI, resolve
from structvi.fit import Fitter
from structvi.gaussian import StructuredGaussian
from structvi.optim import StructuredNGD
from structvi.optim.distributed import assign_layers, layer_cost, loss_terms
from structvi.optim.functional import LOCAL
from structvi.structures import make_structure


def test_assign_layers_balances_by_cost():
    # LPT: 9 → r0, 7 → r1, 5 → r1 (7 < 9), 4 → r0, 1 → r1 (12 < 13)
    assert assign_layers([4.0, 9.0, 1.0, 7.0, 5.0], 2) == [0, 0, 1, 1, 1]
    assert assign_layers([1.0, 1.0, 1.0], 1) == [0, 0, 0]
    assert assign_layers([2.0, 2.0], 3) == [0, 1]  # ties: lower index → lower rank


def test_layer_cost_grows_like_dense_updates():
    opt = StructuredNGD(nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 30)))
    small, large = (opt.preconditioner(m) for m in opt._module_layer)
    assert layer_cost(large) > layer_cost(small)
    assert layer_cost(small) == pytest.approx((8 ** 2) ** 1.5 + (5 ** 2) ** 1.5)


def test_loss_terms_follow_loss_average():
    out = torch.zeros(4, 3, 10)
    assert loss_terms(out, "batch") == 4
    assert loss_terms(out, "batch+sequence") == 12
    assert loss_terms(out, None) == 1
    assert loss_terms(torch.zeros(10), "batch") == 1


def test_single_process_keeps_the_local_reducer():
    opt = StructuredNGD(nn.Linear(3, 2))
    assert opt.reducer is LOCAL


def test_data_parallel_rejected_without_process_group():
    assert resolve(None) is None and resolve(False) is None
    with pytest.raises(RuntimeError, match="init_process_group"):
        DataParallelVI()
    with pytest.raises(TypeError, match="process_group must be"):
        resolve("world")
    q = StructuredGaussian(torch.zeros(2), make_structure("dense", 2))
    with pytest.raises(TypeError, match="process_group must be"):
        Fitter(lambda Z: -Z.square().sum(1), q, process_group=3)
