"""Robust steps: non-finite batches, loss spikes, zero-gradient stretches, user clipping, AMP."""

from __future__ import annotations

import copy
import functools
import math
import re
import warnings

import pytest
import torch
from torch import Tensor, nn

from structvi.optim import StructuredNGD
from tests.optim.faults import adamw, ngd, ngd_default, regression, regression_net, run
from tests.optim.helpers import batches, mlp, seq_loss


def _snapshot(opt: StructuredNGD) -> list[dict]:
    return [{k: v.clone() if isinstance(v, Tensor) else v for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"]]


def _assert_snapshot(opt: StructuredNGD, snapshot: list[dict]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, saved in zip(params, snapshot):
        assert opt.state[p].keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(opt.state[p][key], value) if isinstance(value, Tensor) \
                else opt.state[p][key] == value, key


def _nan_loss(net, x, y):
    return seq_loss(net, x, y) * float("nan")


def _nan_feature(net, x, y):
    x = x.clone()
    x[0, 0, 2] = float("nan")
    return seq_loss(net, x, y)


@pytest.mark.parametrize("bad_loss", [_nan_loss, _nan_feature], ids=["nan_loss", "nan_input"])
def test_a_non_finite_batch_is_skipped_with_state_intact(bad_loss):
    """Before: one NaN batch on an update step made K, C, momenta and AdamW moments NaN."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 6)).double()
    opt = StructuredNGD(net, lr=0.05, T=2, lr_cov=0.1)
    data = batches((4, 3, 5), 6, 6)
    for x, y in data[:4]:  # the next step (4) updates the preconditioner
        opt.zero_grad()
        seq_loss(net, x, y).backward()
        opt.step()
    params, state = copy.deepcopy(list(net.parameters())), _snapshot(opt)
    with pytest.warns(RuntimeWarning, match="step skipped.*not finite.*unchanged"):
        for _ in range(2):  # warned once, counted twice
            opt.zero_grad()
            bad_loss(net, *data[4]).backward()
            opt.step()
    assert opt.skipped_steps == 2
    _assert_snapshot(opt, state)
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters()))
    opt.zero_grad()
    seq_loss(net, *data[5]).backward()
    opt.step()  # training goes on
    assert all(torch.isfinite(p).all() for p in net.parameters())


@functools.cache
def _final(optimizer: str, spike: float | None, clip: float | None) -> float:
    make = {"ngd": ngd, "ngd_default": ngd_default, "adamw": adamw}[optimizer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return run(make, spike=spike, clip=clip)[-1]


@pytest.mark.parametrize("rules", ["ngd", "ngd_default"], ids=["singd_rules", "defaults"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clip", "clip_grad_norm"])
@pytest.mark.parametrize("spike", [1e3, 1e6, 1e10, 1e20], ids=lambda s: f"x{s:.0e}")
def test_a_loss_spike_leaves_training_recoverable(spike, clip, rules):
    """Before: ×1e3 at step 40 took the MSE from 0.50 to 70 (AdamW: recovered); ×1e20 made
    parameters and factors NaN even with clip_grad_norm_ (statistics were taken before it).
    Checked with the published (unnormalized) update at lr 0.05 and with the defaults."""
    ours, base = _final(rules, spike, clip), _final(rules, None, clip)
    theirs, theirs_base = _final("adamw", spike, clip), _final("adamw", None, clip)
    assert math.isfinite(ours) and ours < 2 * base, (
        f"MSE 40 steps after a x{spike:g} spike: {ours:.3g} vs {base:.3g} without; "
        f"AdamW {theirs:.3g} vs {theirs_base:.3g}")


def test_a_zero_gradient_stretch_does_not_inflate_the_preconditioner():
    """Before: after 300 zero-gradient steps the first real step was 12× a normal one."""
    X, y = regression()
    net = regression_net()
    opt = ngd(net, T=1, lr_cov=0.05)
    gen = torch.Generator().manual_seed(1)

    def step(weight: float = 1.0) -> float:
        idx = torch.randint(0, X.shape[0], (32,), generator=gen)
        opt.zero_grad()
        (nn.functional.mse_loss(net(X[idx]), y[idx]) * weight).backward()
        before = [p.detach().clone() for p in net.parameters()]
        opt.step()
        return math.sqrt(sum(((p - b) ** 2).sum().item()
                             for p, b in zip(net.parameters(), before)))

    normal = sum(step() for _ in range(40)) / 40
    for _ in range(300):
        step(0.0)
    assert step() < 3 * normal


def test_statistics_follow_clip_grad_norm():
    """Clipping the gradient by c scales the statistics by c² (as if the loss were c·loss).

    Before: the statistics were those of the unclipped gradient.
    """
    c = 1e-2
    kw = dict(lr=0.05, T=1, lr_cov=0.1, outlier_threshold=None)
    clipped, scaled = mlp(), mlp()
    opt_clipped, opt_scaled = StructuredNGD(clipped, **kw), StructuredNGD(scaled, **kw)
    for x, y in batches((4, 3, 5), 6, 6):
        opt_clipped.zero_grad()
        seq_loss(clipped, x, y).backward()
        norm = torch.cat([p.grad.flatten() for p in clipped.parameters()]).norm()
        nn.utils.clip_grad_norm_(clipped.parameters(), (c * norm).item())
        opt_clipped.step()
        opt_scaled.zero_grad()
        (seq_loss(scaled, x, y) * c).backward()
        opt_scaled.step()
    for p, q in zip(clipped.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_grad_scaler_unscale_and_clip_equals_plain_clipping():
    """The AMP recipe ``scaler.unscale_(opt); clip_grad_norm_(...)``. Before: RuntimeError."""
    kw = dict(lr=0.05, T=2, lr_cov=0.1)
    plain, amp = mlp(), mlp()
    opt_plain = StructuredNGD(plain, **kw)
    opt_amp = StructuredNGD(amp, init_grad_scale=2.0**10, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for x, y in batches((4, 3, 5), 6, 8):
        opt_plain.zero_grad()
        seq_loss(plain, x, y).backward()
        nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        opt_plain.step()
        opt_amp.zero_grad()
        scaler.scale(seq_loss(amp, x, y)).backward()
        scaler.unscale_(opt_amp)
        nn.utils.clip_grad_norm_(amp.parameters(), 0.5)
        scaler.step(opt_amp)
        scaler.update()
    for p, q in zip(plain.parameters(), amp.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_group_values_are_checked_when_step_reads_them():
    """Before: T = 0 set after construction raised ZeroDivisionError inside step()."""
    net = mlp()
    opt = StructuredNGD(net)
    seq_loss(net, *batches((4, 3, 5), 6, 1)[0]).backward()
    opt.param_groups[0]["T"] = 0
    with pytest.raises(ValueError, match=re.escape("T must be an integer >= 1, got T=0; step() "
                                                   "read it from param_groups[0]")):
        opt.step()


@pytest.mark.parametrize("value", [-0.1, float("nan"), "fast"], ids=["negative", "nan", "str"])
def test_a_bad_lr_cov_schedule_value_is_an_error(value):
    """Before: a callable lr_cov returning a negative or NaN value was used silently."""
    net = mlp()
    opt = StructuredNGD(net, lr_cov=lambda step: value)
    seq_loss(net, *batches((4, 3, 5), 6, 1)[0]).backward()
    params, state = copy.deepcopy(list(net.parameters())), _snapshot(opt)
    with pytest.raises(ValueError, match=r"lr_cov: the callable lr_cov returned .* at step 0; "
                                         r"expected a finite number >= 0"):
        opt.step()
    _assert_snapshot(opt, state)  # raised before any layer changed
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters()))


def test_params_of_another_model_are_an_error():
    """Before: StructuredNGD(model_a, params=model_b.parameters()) preconditioned nothing."""
    a, b = mlp(), mlp()
    with pytest.raises(ValueError, match=r"params: none of the 4 parameters .* is a parameter of "
                                         r"model \(Sequential\); pass the model"):
        StructuredNGD(a, params=b.parameters())
    assert not a._forward_pre_hooks and not a[0]._forward_hooks  # nothing left behind
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.warns(UserWarning, match="1 of the 5 parameters .* not parameters of model"):
        StructuredNGD(a, params=[*a.parameters(), extra])


def test_outlier_threshold_is_validated():
    with pytest.raises(ValueError, match=r"outlier_threshold must be a finite number > 1 or None"):
        StructuredNGD(mlp(), outlier_threshold=0.5)


def test_the_skip_warning_names_the_parameter():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 6)).double()
    opt = StructuredNGD(net)
    seq_loss(net, *batches((4, 3, 5), 6, 1)[0]).backward()
    net[1].weight.grad[2] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"step skipped, the gradient or the curvature "
                                            r"statistics of parameter '1.weight' are not finite"):
        opt.step()
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_float32_norm_overflow_is_clipped_not_skipped(dtype):
    """The screen takes gradient norms in float32; a finite gradient whose ``‖g‖²`` overflows
    float32 (entries of 1e20) must still be told from a non-finite one (recomputed in float64)
    and clipped like any spike: the step runs, the parameters stay finite."""
    net = mlp(dtype=dtype)
    opt = StructuredNGD(net, lr=0.01, T=1, lr_cov=0.05)
    for x, y in batches((4, 3, 5), 4, 5, dtype=dtype):
        opt.zero_grad()
        seq_loss(net, x, y).backward()
        opt.step()
    opt.zero_grad()
    seq_loss(net, x, y).backward()
    for p in net.parameters():
        p.grad.fill_(1e20)  # finite in float32 and bf16; ‖g‖ = 1e20·√n overflows float32
    opt.step()
    assert opt.skipped_steps == 0 and opt.clipped_steps == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())
