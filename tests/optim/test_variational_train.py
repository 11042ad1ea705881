"""VariationalNGD in training: draws averaged, bf16, state_dict, predict, calibration, errors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD, VariationalNGD, calibration, predict


def classifier(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(n=48, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    y = (X[:, :3] @ torch.randn(3, 3, generator=gen, dtype=torch.float64)).argmax(1)
    return X.to(dtype), y


def train(model, opt, X, y, steps, gen, draws=1, batch=16, set_to_none=True):
    for t in range(steps):
        idx = torch.arange(t * batch, (t + 1) * batch) % len(y)
        for _ in range(draws):
            opt.zero_grad(set_to_none=set_to_none)
            with opt.sampled_params(train=True, generator=gen):
                nn.functional.cross_entropy(model(X[idx]).float(), y[idx]).backward()
        opt.step()


KW = dict(data_size=48, lr=0.05, T=2, lr_cov=0.1)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("mc_samples", [1, 3])
def test_repeated_draws_average_gradients_and_statistics(set_to_none, mc_samples):
    """At temperature 0 every draw is the mean: three training draws per step must give the
    step of one draw (gradient and Kronecker statistics averaged over the draws), however the
    gradients are zeroed between draws."""
    X, y = data()
    runs = []
    for draws in (1, 3):
        model = classifier()
        opt = VariationalNGD(model, temperature=0.0, mc_samples=mc_samples, **KW)
        train(model, opt, X, y, 4, torch.Generator().manual_seed(0), draws=draws,
              set_to_none=set_to_none)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_temperature_zero_is_structured_ngd_with_no_prior():
    """τ = 0: no noise and λ = 0, so the steps are StructuredNGD's with damping 0."""
    X, y = data()
    models = [classifier(), classifier()]
    var = VariationalNGD(models[0], temperature=0.0, extra_damping=0.0, **KW)
    base = StructuredNGD(models[1], damping=0.0, lr=0.05, T=2, lr_cov=0.1, relative_damping=False,
                         normalize_preconditioner=False, diagonal_lr_ratio=1.0)
    train(models[0], var, X, y, 4, torch.Generator().manual_seed(0))
    for t in range(4):
        idx = torch.arange(t * 16, (t + 1) * 16) % len(y)
        base.zero_grad()
        nn.functional.cross_entropy(models[1](X[idx]).float(), y[idx]).backward()
        base.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_step_closure_runs_mc_samples_draws():
    X, y = data()
    losses = []
    for use_closure in (True, False):
        model = classifier()
        opt = VariationalNGD(model, mc_samples=2, **KW)
        torch.manual_seed(5)
        if use_closure:
            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(X).float(), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure))
        else:
            train(model, opt, X, y, 1, None, draws=2, batch=48)
        losses.append([p.detach().clone() for p in model.parameters()])
    assert torch.is_tensor(losses[0]) and torch.isfinite(losses[0])
    for a, b in zip(losses[1], losses[2]):
        assert torch.equal(a, b)


def test_step_without_draws_warns_and_uses_the_mean_gradient():
    X, y = data()
    model = classifier()
    opt = VariationalNGD(model, **KW)
    nn.functional.cross_entropy(model(X), y).backward()
    with pytest.warns(UserWarning, match="no sampled_params"):
        opt.step()


@pytest.mark.lowprec
def test_bf16_trains_and_factors_move():
    """bf16 parameters, float32 factors (the default for half parameters): finite, the loss
    goes down, and K, C leave the identity."""
    X, y = data(n=96, dtype=torch.bfloat16)
    model = classifier(torch.bfloat16)
    opt = VariationalNGD(model, data_size=96, lr=0.05, T=2, lr_cov=0.1)
    K0 = opt.preconditioner(model[0]).K.to_dense().clone()
    gen = torch.Generator().manual_seed(0)

    def loss():
        return nn.functional.cross_entropy(model(X).float(), y).item()

    first = loss()
    train(model, opt, X, y, 30, gen)
    factors = opt.preconditioner(model[0])
    assert factors.K.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (factors.K.to_dense() - K0).abs().max() > 1e-2
    assert loss() < first


@pytest.mark.lowprec
def test_bf16_ivon_hessian_is_frozen_ours_moves():
    """The contrast: IVON's bf16 Hessian never changes (β₂ = 0.99999 rounds to 1 in bf16)."""
    ivon = pytest.importorskip("ivon")
    X, y = data(n=96, dtype=torch.bfloat16)
    model = classifier(torch.bfloat16)
    opt = ivon.IVON(model.parameters(), lr=0.1, ess=96)
    hess0 = opt.param_groups[0]["hess"].clone()
    _train_ivon(model, opt, X, y, 30)
    assert torch.equal(opt.param_groups[0]["hess"], hess0)


def _train_ivon(model, opt, X, y, steps):
    torch.manual_seed(0)
    for t in range(steps):
        idx = torch.arange(t * 16, (t + 1) * 16) % len(y)
        opt.zero_grad()
        with opt.sampled_params(train=True):
            nn.functional.cross_entropy(model(X[idx]).float(), y[idx]).backward()
        opt.step()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_continues_in_lock_step():
    X, y = data()
    model = classifier()
    opt = VariationalNGD(model, prior_precision=3.0, antithetic=True, **KW)
    gen = torch.Generator().manual_seed(0)
    train(model, opt, X, y, 3, gen, draws=2)
    saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    gen_state = gen.get_state()
    train(model, opt, X, y, 3, gen, draws=2)

    other = classifier(seed=9)
    other.load_state_dict(saved_model)
    other_opt = VariationalNGD(other, antithetic=True, **KW)
    other_opt.load_state_dict(saved_opt)
    assert other_opt.param_groups[0]["prior_precision"] == 3.0
    train(other, other_opt, X, y, 3, torch.Generator().set_state(gen_state), draws=2)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_predict_is_a_reproducible_batched_model_average():
    X, y = data()
    model = classifier()
    opt = VariationalNGD(model, **KW)
    train(model, opt, X, y, 3, torch.Generator().manual_seed(0))
    probs = predict(model, opt, X, samples=5, generator=torch.Generator().manual_seed(1))
    again = predict(model, opt, X, samples=5, generator=torch.Generator().manual_seed(1),
                    batch_size=7)
    assert torch.allclose(probs, again, rtol=1e-12, atol=1e-14)
    gen, manual = torch.Generator().manual_seed(1), torch.zeros_like(probs)
    for _ in range(5):
        with torch.no_grad(), opt.sampled_params(generator=gen):
            manual += torch.softmax(model(X), -1)
    assert torch.allclose(probs, manual / 5, rtol=1e-12)
    assert torch.allclose(probs.sum(1), torch.ones(len(X), dtype=probs.dtype))
    with torch.no_grad():
        assert torch.equal(predict(model, opt, X, samples=0), torch.softmax(model(X), -1))
    assert not torch.allclose(probs, predict(model, opt, X, samples=0))


def test_predict_accepts_ivon_without_generator():
    ivon = pytest.importorskip("ivon")
    X, y = data()
    model = classifier(torch.float32)
    opt = ivon.IVON(model.parameters(), lr=0.1, ess=48)
    probs = predict(model, opt, X.float(), samples=3)
    assert probs.shape == (48, 3)
    with pytest.raises(TypeError, match="generator"):
        predict(model, opt, X.float(), samples=3, generator=torch.Generator())


def test_calibration_metrics():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = torch.tensor([0, 1, 1, 0])
    out = calibration(probs, y, bins=2)
    assert out["acc"] == pytest.approx(0.75)
    nll = -torch.log(torch.tensor([0.9, 0.2, 0.7, 0.6])).mean().item()
    assert out["nll"] == pytest.approx(nll)
    # bin [0.5, 1]: all four, confidence 0.75, accuracy 0.75 → ECE 0
    assert out["ece"] == pytest.approx(0.0, abs=1e-12)
    assert [b["count"] for b in out["bins"]] == [0, 4]
    out = calibration(torch.tensor([[0.9, 0.1], [0.95, 0.05]]), torch.tensor([1, 0]), bins=10)
    assert out["ece"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.05)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(data_size=0), ValueError, "data_size"),
    (dict(data_size=10, prior_precision=-1.0), ValueError, "prior_precision"),
    (dict(data_size=10, temperature=float("nan")), ValueError, "temperature"),
    (dict(data_size=10, mc_samples=0), ValueError, "mc_samples"),
    (dict(data_size=10, damping=1e-3), TypeError, "prior_precision instead of damping"),
    (dict(data_size=10, loss_average=None), ValueError, "loss_average"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        VariationalNGD(classifier(), **kwargs)


def test_predict_bad_arguments():
    model = classifier()
    opt = VariationalNGD(model, data_size=10)
    X = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="samples"):
        predict(model, opt, X, samples=-1)
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, opt, X, batch_size=0)
    with pytest.raises(TypeError, match="sampled_params"):
        predict(model, torch.optim.SGD(model.parameters(), lr=0.1), X, samples=2)


@pytest.mark.lowprec
def test_bf16_master_means_hold_what_bf16_rounds_away():
    """bf16 parameters keep a float32 mean in the state; the parameter is that mean rounded,
    and steps far below bf16's resolution still move it (they would be lost in bf16)."""
    X, y = data(n=96, dtype=torch.bfloat16)
    model = classifier(torch.bfloat16)
    opt = VariationalNGD(model, data_size=96, lr=1e-4, T=2, lr_cov=0.1, temperature=0.0)
    start = [p.detach().float().clone() for p in model.parameters()]
    train(model, opt, X, y, 3, torch.Generator().manual_seed(0))
    for p, p0 in zip(model.parameters(), start):
        mean = opt.state[p]["mean"]
        assert mean.dtype == torch.float32 and torch.equal(mean.to(torch.bfloat16), p.detach())
        assert (mean != p0).any()
    for p, p0 in zip((model[0].weight, model[3].weight), (start[0], start[4])):
        mean, ulp = opt.state[p]["mean"], p0.abs() * 2**-8  # bf16 spacing near each weight
        below = ((mean - p0).abs() < ulp / 2) & (mean != p0)
        assert below.float().mean() > 0.5  # most moves are below bf16's resolution
    off = classifier(torch.bfloat16)
    opt_off = VariationalNGD(off, data_size=96, lr=1e-4, T=2, lr_cov=0.1, temperature=0.0,
                             master_means=False)
    train(off, opt_off, X, y, 3, torch.Generator().manual_seed(0))
    assert "mean" not in opt_off.state[off[0].weight]


@pytest.mark.lowprec
def test_bf16_state_dict_round_trip_continues_in_lock_step():
    X, y = data(dtype=torch.bfloat16)
    model = classifier(torch.bfloat16)
    opt = VariationalNGD(model, **KW)
    gen = torch.Generator().manual_seed(0)
    train(model, opt, X, y, 3, gen)
    saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    gen_state = gen.get_state()
    train(model, opt, X, y, 3, gen)
    other = classifier(torch.bfloat16, seed=9)
    other.load_state_dict(saved_model)
    other_opt = VariationalNGD(other, **KW)
    other_opt.load_state_dict(saved_opt)
    assert other_opt.state[other[0].weight]["mean"].dtype == torch.float32
    assert other_opt.preconditioner(other[0]).K.dtype == torch.float32
    train(other, other_opt, X, y, 3, torch.Generator().set_state(gen_state))
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
