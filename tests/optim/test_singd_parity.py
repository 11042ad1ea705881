"""``retraction="first_order"`` reproduces ``singd==0.0.5`` (a test-only oracle), MATH §7.5.

Run in float64: singd's hierarchical and Toeplitz classes only accept fp16/bf16/fp32 through
``lowest_precision``, which the fixture below extends to float64 for the duration of a test.
singd's block-diagonal class is excluded (its transposes are wrong, MATH §5.4).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD
from structvi.structures import STRUCTURES
from tests.optim.helpers import SINGD_RULES, batches, cnn, copies, max_rel_diff, mlp, train

singd_optim = pytest.importorskip("singd.optim.optimizer")

HP = dict(lr=0.05, momentum=0.9, damping=1e-2, alpha1=0.5, weight_decay=1e-2, T=2, lr_cov=0.1)
OURS = {"hierarchical15_15": "hierarchical", "triltoeplitz": "triangular_toeplitz"}


@pytest.fixture(autouse=True)
def _singd_float64(monkeypatch):
    order = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

    def lowest_precision(*dtypes):
        return order[min(order.index(d) for d in dtypes)]

    for module in ("hierarchical", "triltoeplitz"):
        monkeypatch.setattr(f"singd.structures.{module}.lowest_precision", lowest_precision)


def _compare(net, data, loss_fn, **options):
    theirs, ours = copies(net)
    options = {**HP, **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # singd's naive-fallback warnings
        train(theirs, singd_optim.SINGD(theirs, **options), data, loss_fn)
    train(ours, StructuredNGD(ours, retraction="first_order", trust_region=None,
                              outlier_threshold=None, **options, **SINGD_RULES),
          data, loss_fn)
    assert max_rel_diff(net, ours) > 1e-2, "training did not move the weights"
    assert max_rel_diff(theirs, ours) < 1e-9


def _seq_ce(net, x, y):
    return nn.functional.cross_entropy(net(x).mean(1), y)


def _ce(net, x, y):
    return nn.functional.cross_entropy(net(x), y)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("structure", ["dense", "diagonal", "hierarchical15_15", "triltoeplitz"])
def test_linear_matches_singd(structure, approx):
    if OURS.get(structure, structure) not in STRUCTURES:
        pytest.skip(f"structure {OURS.get(structure)!r} is not registered")
    wide = structure == "hierarchical15_15"  # k1 + k2 = 30 must fit in every factor
    net = mlp(32, 31, 31) if wide else mlp(6, 7, 5)
    data = batches((8, 3, 32 if wide else 6), 5, 30)
    _compare(net, data, _seq_ce, structures=(structure, structure), kfac_approx=approx)


@pytest.mark.parametrize("loss_average", ["batch", "batch+sequence", None])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_matches_singd(approx, loss_average):
    data = batches((4, 4, 7, 7), 3, 30)
    _compare(cnn(), data, _ce, structures=("dense", "diagonal"), kfac_approx=approx,
             loss_average=loss_average, lr=0.01)


def test_mixed_structures_match_singd():
    data = batches((8, 3, 32), 5, 30)
    _compare(mlp(32, 31, 31), data, _seq_ce, structures=("hierarchical15_15", "triltoeplitz"),
             kfac_approx="expand")
