"""Low precision: dtypes of parameters, factors and momenta are independent; bf16 trains.

The maths is checked in float64 elsewhere (STYLE §3.3); here: dtypes kept, everything finite,
and a small CNN on scikit-learn's digits reaches the fp32 accuracy in bf16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD
from tests.optim.helpers import SINGD_RULES, batches, cnn, mlp, seq_loss

pytestmark = pytest.mark.lowprec
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("momentum_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factor_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dtypes_are_independent_and_kept(param_dtype, factor_dtype, momentum_dtype):
    net = mlp(dtype=param_dtype)
    opt = StructuredNGD(net, structures=("dense", "diagonal"), T=2, lr=0.05,
                        preconditioner_dtype=(factor_dtype, factor_dtype),
                        momentum_dtype=momentum_dtype)
    for x, y in batches((4, 3, 5), 6, 5, dtype=param_dtype):
        opt.zero_grad()
        seq_loss(net, x, y).backward()
        opt.step()
    for p in net.parameters():
        assert p.dtype == param_dtype and torch.isfinite(p).all()
        assert opt.state[p]["momentum_buffer"].dtype == momentum_dtype
    factors = opt.preconditioner(net[0])
    for f in factors:
        assert f.dtype == factor_dtype
        assert all(torch.isfinite(t).all() for t in f.tensors().values())
    assert not torch.equal(factors.K.to_dense().float(), torch.eye(6))


def test_pure_bf16_conv_net_stays_finite():
    net = cnn(dtype=torch.bfloat16)
    opt = StructuredNGD(net, lr=0.05, T=1, lr_cov=0.1, kfac_approx="reduce")
    for x, y in batches((8, 4, 7, 7), 3, 20, dtype=torch.bfloat16):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_fp16_autocast_with_a_dynamic_grad_scaler():
    """Overflowing first steps are skipped, the scale backs off, training proceeds."""
    net = mlp(dtype=torch.float32)
    opt = StructuredNGD(net, T=1, lr=0.1, init_grad_scale=2.0**20,
                        damping=1e-3, lr_cov=1e-2, **SINGD_RULES)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=10)
    teacher = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    data = [(x, (x.mean(1) @ teacher).argmax(1)) for x, _ in batches((16, 3, 5), 6, 60,
                                                                     dtype=torch.float32)]
    losses = []
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(net(x).float().mean(1), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert scaler.get_scale() < 2.0**20  # some steps overflowed and were skipped
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])


# ---------------------------------------------------------------------------------- digits
def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    X = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return X[perm[:1437]], y[perm[:1437]], X[perm[1437:]], y[perm[1437:]]


def _digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )


def _digits_accuracy(mode: str, epochs: int = 15) -> float:
    """Test accuracy after training in ``mode``: fp32, bf16 autocast, or pure bf16."""
    Xtr, ytr, Xte, yte = _digits()
    dtype = torch.bfloat16 if mode == "pure_bf16" else torch.float32
    net = _digits_cnn().to(dtype)
    opt = StructuredNGD(net)  # the defaults
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * 23)
    gen = torch.Generator().manual_seed(1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast_bf16")
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            opt.zero_grad()
            with autocast:
                loss = nn.functional.cross_entropy(net(Xtr[idx].to(dtype)).float(), ytr[idx])
            loss.backward()
            opt.step()
            sched.step()
            assert torch.isfinite(loss)
    with torch.no_grad(), autocast:
        return (net(Xte.to(dtype)).argmax(1) == yte).float().mean().item()


def test_bf16_digits_cnn_matches_fp32_accuracy():
    reference = _digits_accuracy("fp32")
    assert reference > 0.95
    for mode in ("autocast_bf16", "pure_bf16"):  # no worse than fp32 (better is not a failure:
        accuracy = _digits_accuracy(mode)          # 1 test image is 0.28%)
        assert accuracy >= reference - 0.01 - 1e-6, (mode, accuracy, reference)
