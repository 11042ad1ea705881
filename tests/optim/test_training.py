"""``torch.optim`` conventions: groups, accumulation, GradScaler, schedulers, closures, hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD
from tests.optim.helpers import batches, copies, mlp, seq_loss

DT = torch.float64
KW = dict(lr=0.05, lr_cov=0.1, T=2, weight_decay=1e-2)


def _assert_same_params(a: nn.Module, b: nn.Module, rtol: float = 1e-12) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-2)


def _three_part_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 6)).to(DT)


def test_param_groups_equal_separate_optimizers():
    net = _three_part_net()
    grouped, separate = copies(net)
    g0 = dict(structures="dense", lr=0.05)
    g1 = dict(structures=({"name": "block_diagonal", "block_size": 3}, "diagonal"), T=3,
              lr_cov=0.02, momentum=0.5, kfac_like=True, alpha1=0.0)
    g2 = dict(lr=0.01, weight_decay=0.1)  # LayerNorm: diagonal rule
    def parts(n):
        return list(n[0].parameters()), list(n[3].parameters()), list(n[1].parameters())

    groups = [dict(params=p, **g) for p, g in zip(parts(grouped), (g0, g1, g2))]
    opt = StructuredNGD(grouped, groups, **KW)
    opts = [StructuredNGD(separate, p, **{**KW, **g})
            for p, g in zip(parts(separate), (g0, g1, g2))]
    for x, y in batches((4, 3, 5), 6, 10):
        opt.zero_grad()
        seq_loss(grouped, x, y).backward()
        opt.step()
        separate.zero_grad()
        seq_loss(separate, x, y).backward()
        for o in opts:
            o.step()
    _assert_same_params(grouped, separate)


@pytest.mark.parametrize("kfac_like", [False, True], ids=["ingd", "ikfac"])
@pytest.mark.parametrize("loss_average", ["batch", None], ids=["mean_loss", "sum_loss"])
def test_accumulating_micro_batches_equals_one_batch(loss_average, kfac_like):
    """MATH §7.8; with ``loss_average=None`` this is singd issue #43 (MATH §5.3)."""
    reduction = "mean" if loss_average else "sum"
    kw = dict(KW, loss_average=loss_average, kfac_like=kfac_like, T=1)
    whole, micro = copies(mlp())
    opt_whole, opt_micro = StructuredNGD(whole, **kw), StructuredNGD(micro, **kw)
    for x, y in batches((8, 3, 5), 6, 5):
        opt_whole.zero_grad()
        nn.functional.cross_entropy(whole(x).mean(1), y, reduction=reduction).backward()
        opt_whole.step()
        opt_micro.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4)):  # loss · micro/mini for averaged losses
            loss = nn.functional.cross_entropy(micro(xs).mean(1), ys, reduction=reduction)
            (loss / 4 if loss_average else loss).backward()
        opt_micro.step()
    _assert_same_params(whole, micro, rtol=1e-10)


def test_accumulation_when_the_model_itself_is_never_called():
    """Loss terms are still counted per micro-batch when only the layers are called."""
    kw = dict(KW, T=1)
    whole, micro = copies(mlp())
    opt_whole, opt_micro = StructuredNGD(whole, **kw), StructuredNGD(micro, **kw)

    def forward(net, x):
        for layer in net:  # bypasses net.__call__
            x = layer(x)
        return x.mean(1)

    for x, y in batches((8, 3, 5), 6, 3):
        opt_whole.zero_grad()
        nn.functional.cross_entropy(forward(whole, x), y).backward()
        opt_whole.step()
        opt_micro.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (nn.functional.cross_entropy(forward(micro, xs), ys) / 2).backward()
        opt_micro.step()
    _assert_same_params(whole, micro, rtol=1e-10)


def test_grad_scaler_with_cyclic_scale_equals_unscaled_training():
    scales = [2.0**16, 3.0e3, 1.0, 7.5e2, 2.0**10]
    plain, scaled = copies(mlp())
    opt_plain = StructuredNGD(plain, **KW)
    opt_scaled = StructuredNGD(scaled, init_grad_scale=scales[0], **KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=scales[0])
    for t, (x, y) in enumerate(batches((4, 3, 5), 6, 12)):
        opt_plain.zero_grad()
        seq_loss(plain, x, y).backward()
        opt_plain.step()
        opt_scaled.zero_grad()
        scaler.scale(seq_loss(scaled, x, y)).backward()
        scaler.step(opt_scaled)
        scaler.update(new_scale=scales[(t + 1) % len(scales)])
    _assert_same_params(plain, scaled, rtol=1e-10)


def test_grad_scaler_skips_steps_with_inf():
    net = mlp()
    opt = StructuredNGD(net, **KW)
    before = copy.deepcopy(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = batches((4, 3, 5), 6, 1)[0]
    scaler.scale(seq_loss(net, x, y) * float("inf")).backward()
    scaler.step(opt)
    _assert_same_params(before, net, rtol=0.0)
    assert int(opt.state[net[0].weight]["step"]) == 1 and opt.statistics(net[0]) is None


def test_lr_scheduler_drives_lr():
    net = mlp()
    opt = StructuredNGD(net, **KW)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.0)
    for t, (x, y) in enumerate(batches((4, 3, 5), 6, 6)):
        if t == 3:
            frozen = copy.deepcopy(net)
        opt.zero_grad()
        seq_loss(net, x, y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    _assert_same_params(frozen, net, rtol=0.0)
    assert not torch.equal(frozen[0].weight, mlp()[0].weight)


def test_closure_returns_loss_and_steps():
    a, b = copies(mlp())
    opt_a, opt_b = StructuredNGD(a, **KW), StructuredNGD(b, **KW)
    for x, y in batches((4, 3, 5), 6, 4):
        def closure(x=x, y=y):
            opt_a.zero_grad()
            loss = seq_loss(a, x, y)
            loss.backward()
            return loss
        loss = opt_a.step(closure)
        opt_b.zero_grad()
        expected = seq_loss(b, x, y)
        expected.backward()
        opt_b.step()
        assert torch.equal(loss, expected)
    _assert_same_params(a, b, rtol=0.0)
