"""Hooks and ``step()`` use matrix products only (DESIGN decision 2, STYLE §3.4)."""

from __future__ import annotations

import pytest
import torch

from structvi._forbid import ForbidDecompositions
from structvi.optim import StructuredNGD
from tests.optim.helpers import OPTIMIZER_STRUCTURES, batches, cnn, mlp, seq_loss, spec


def test_the_guard_raises():
    with ForbidDecompositions(), pytest.raises(RuntimeError, match="inverse/decomposition"):
        torch.eye(2).inverse()


@pytest.mark.parametrize("retraction", ["quadratic", "first_order", "expm"])
@pytest.mark.parametrize("name", OPTIMIZER_STRUCTURES)
def test_training_is_inverse_free(name, retraction):
    net = mlp()
    opt = StructuredNGD(net, structures=spec(name), retraction=retraction, T=2,
                        normalize_lr_cov=True)
    with ForbidDecompositions():
        for x, y in batches((4, 3, 5), 6, 3):
            opt.zero_grad()
            seq_loss(net, x, y).backward()
            opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_conv_ikfac_is_inverse_free(kfac_approx):
    net = cnn()
    opt = StructuredNGD(net, kfac_like=True, alpha1=0.0, kfac_approx=kfac_approx)
    with ForbidDecompositions():
        for x, y in batches((3, 4, 7, 7), 3, 2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
