"""singd-style structure names on layers smaller than their blocks (Structure.fit_options)."""

from __future__ import annotations

import torch


def test_optimizer_accepts_singd_names_on_small_layers():
    from structvi.optim import StructuredNGD

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    opt = StructuredNGD(net, structures=("hierarchical15_15", "block30diagonal"))
    x = torch.randn(8, 4)
    net(x).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
