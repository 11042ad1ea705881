"""``torch.compile(model)`` with the optimizer's hooks: one graph, no break, same numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD


def _cnn_with_batchnorm(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    ).to(dtype)


def _train(net: nn.Module, forward: nn.Module, steps: int, dtype: torch.dtype) -> StructuredNGD:
    opt = StructuredNGD(net, lr=0.05, T=2, lr_cov=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=gen, dtype=dtype)
        y = torch.randint(0, 5, (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
    return opt


def _compare(backend: str, dtype: torch.dtype, rtol: float) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = _cnn_with_batchnorm(dtype), _cnn_with_batchnorm(dtype)
    _train(eager, eager, 6, dtype)
    # fullgraph: any graph break in the hooks raises; T = 2 gives one recompilation at most
    # (the steps that collect statistics and those that do not)
    opt = _train(compiled, torch.compile(compiled, backend=backend, fullgraph=True), 6, dtype)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert opt.statistics(compiled[0]) is None  # statistics were consumed, not left pending
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol)
    assert not torch.equal(opt.preconditioner(compiled[0]).K.to_dense(),
                           torch.eye(3 * 9 + 1, dtype=dtype))


def test_compiled_cnn_with_batchnorm_matches_eager():
    """Before: int(state["step"]) in the forward hook broke the graph and the tensor hook body
    could not be traced (fullgraph failed; the issue saw a shape error in kfac.py)."""
    _compare("aot_eager", torch.float64, 1e-10)


@pytest.mark.slow
def test_inductor_compiled_cnn_with_batchnorm_matches_eager():
    _compare("inductor", torch.float32, 1e-4)
