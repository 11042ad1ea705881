"""VariationalNGD's fast paths against their plain definitions.

* a training draw is ``[W, b] = [μ_W, μ_b] + ρ C E Kᵀ`` with ``E`` the generator's next
  ``d_o × d_K`` standard normals, for every optimizer structure and layer kind;
* the float32 master mean of a bf16 parameter is re-checked by version and storage (not by a
  copy and a comparison per draw, which is a host synchronization per parameter on a GPU) and
  still follows every change of the parameter from outside;
* the first draw's gradients are kept without a copy, and averaging over draws is unchanged
  however the gradients are zeroed in between (or fails loudly where it cannot be done).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD, VariationalNGD
from tests.optim.helpers import OPTIMIZER_STRUCTURES, spec

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _model(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Flatten(), nn.Linear(80, 5))
    else:
        net = nn.Sequential(nn.Linear(5, 6, bias=kind == "linear"), nn.Tanh(), nn.Linear(6, 5))
    return net.to(dtype)


def _input(kind: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    shape = (16, 2, 4, 4) if kind == "conv" else (16, 5)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _train(model, opt, kind, dtype, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = _input(kind, dtype, gen), torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        with opt.sampled_params(train=True, generator=gen):
            nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv"])
@pytest.mark.parametrize("structure", OPTIMIZER_STRUCTURES)
def test_draw_is_mean_plus_rho_C_E_Kt(structure, kind, dtype):
    model = _model(kind, dtype)
    opt = VariationalNGD(model, data_size=20, temperature=1.0, prior_precision=1.0,
                         structures=spec(structure), T=1, lr_cov=0.3, lr=0.05)
    _train(model, opt, kind, dtype)  # factors away from the identity
    layer = model[0]
    factors = opt.preconditioner(layer)
    K, C = factors.K.to_dense(), factors.C.to_dense()
    assert not torch.allclose(K, torch.eye(K.shape[0], dtype=K.dtype))
    bias = layer.bias is not None
    mean = layer.weight.detach().flatten(1)
    if bias:
        mean = torch.cat([mean, layer.bias.detach()[:, None]], 1)
    gen = torch.Generator().manual_seed(7)
    with opt.sampled_params(generator=gen):
        drawn = layer.weight.detach().flatten(1)
        if bias:
            drawn = torch.cat([drawn, layer.bias.detach()[:, None]], 1)
    E = torch.randn((C.shape[0], K.shape[0]), generator=torch.Generator().manual_seed(7),
                    dtype=factors.C.dtype)
    rho = VariationalNGD.rho(opt.param_groups[0])
    expected = mean + rho * (C @ E @ K.T).to(dtype)
    tol = TOL[dtype]
    assert torch.allclose(drawn, expected, rtol=tol, atol=tol)


@pytest.mark.lowprec
def test_bf16_draw_is_master_plus_rho_C_E_Kt_rounded_once():
    model = _model("linear", torch.bfloat16)
    opt = VariationalNGD(model, data_size=20, T=1, lr_cov=0.3, lr=1e-3)
    _train(model, opt, "linear", torch.bfloat16)
    layer = model[0]
    factors = opt.preconditioner(layer)
    K, C = factors.K.to_dense(), factors.C.to_dense()
    assert K.dtype == C.dtype == torch.float32
    master = torch.cat([opt.state[layer.weight]["mean"], opt.state[layer.bias]["mean"][:, None]],
                       1)
    with opt.sampled_params(generator=torch.Generator().manual_seed(3)):
        drawn = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    E = torch.randn((C.shape[0], K.shape[0]), generator=torch.Generator().manual_seed(3))
    expected = master + VariationalNGD.rho(opt.param_groups[0]) * (C @ E @ K.T)
    # the draw rounds once to bf16: within half a bf16 ulp of the float32 value (plus the
    # float32 association error of the two products)
    assert torch.allclose(drawn.float(), expected, rtol=2**-8, atol=1e-6)


def _count_equal(monkeypatch) -> list[int]:
    calls = [0]
    real = torch.equal

    def counting(a, b):
        calls[0] += 1
        return real(a, b)

    monkeypatch.setattr(torch, "equal", counting)
    return calls


@pytest.mark.lowprec
def test_bf16_master_means_are_not_compared_every_draw(monkeypatch):
    """Before: every draw and every step compared each bf16 parameter with its float32 master
    (a copy, and on a GPU a host synchronization per parameter)."""
    model = _model("linear", torch.bfloat16)
    opt = VariationalNGD(model, data_size=20, T=2, lr_cov=0.1)
    _train(model, opt, "linear", torch.bfloat16, steps=2)
    calls = _count_equal(monkeypatch)
    _train(model, opt, "linear", torch.bfloat16, steps=3)
    with opt.sampled_params():
        pass
    assert calls[0] == 0


@pytest.mark.lowprec
@pytest.mark.parametrize("change", ["copy_", "assign", "load_state_dict", "init"])
def test_bf16_master_follows_changes_of_the_parameter_from_outside(change):
    model = _model("linear", torch.bfloat16)
    opt = VariationalNGD(model, data_size=20, T=2, lr_cov=0.1, temperature=0.0)
    _train(model, opt, "linear", torch.bfloat16, steps=2)
    w = model[0].weight
    new = torch.randn(w.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    if change == "copy_":
        with torch.no_grad():
            w.copy_(new)
    elif change == "assign":
        w.data = new.clone()
    elif change == "load_state_dict":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["0.weight"] = new.clone()
        model.load_state_dict(state)
    else:
        with torch.no_grad():
            nn.init.constant_(w, 0.25)
        new = torch.full_like(new, 0.25)
    with opt.sampled_params():  # temperature 0: the draw is the mean
        assert torch.equal(w.detach(), new)
    assert torch.equal(opt.state[w]["mean"], new.float())


@pytest.mark.lowprec
def test_bf16_master_is_rechecked_after_the_optimizer_state_is_loaded():
    model = _model("linear", torch.bfloat16)
    opt = VariationalNGD(model, data_size=20, T=2, lr_cov=0.1, temperature=0.0)
    _train(model, opt, "linear", torch.bfloat16, steps=2)
    saved = opt.state_dict()
    w = model[0].weight
    saved["state"][0]["mean"] = saved["state"][0]["mean"] + 1.0  # disagrees with w
    opt.load_state_dict(saved)
    with opt.sampled_params():
        pass
    assert torch.equal(opt.state[w]["mean"], w.detach().float())


def _step_params(opt_kwargs, zero, draws: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = VariationalNGD(model, data_size=30, temperature=0.0, T=1, lr=0.05, **opt_kwargs)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    for _ in range(2):
        for _ in range(draws):
            zero(model, opt)
            with opt.sampled_params(train=True):
                nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_draws_average_the_same_however_gradients_are_set_to_none():
    """τ = 0: every draw is the mean, so three draws average to one draw's gradient."""
    one = _step_params({}, lambda m, o: o.zero_grad(), draws=1)
    for zero in (lambda m, o: o.zero_grad(), lambda m, o: o.zero_grad(set_to_none=False),
                 lambda m, o: m.zero_grad()):
        for a, b in zip(one, _step_params({}, zero)):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_one_draw_keeps_its_gradient_without_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = VariationalNGD(model, data_size=30)
    with opt.sampled_params(train=True):
        model(torch.randn(5, 4)).sum().backward()
    for p in model.parameters():
        assert opt._grad_sum[p].data_ptr() == p.grad.data_ptr()


def test_zeroing_a_kept_gradient_in_place_outside_the_optimizer_is_an_error():
    """With ``mc_samples=1`` the draw's gradient is kept uncopied: several draws with
    ``model.zero_grad(set_to_none=False)`` in between would erase it; a clear error, not a
    silently wrong average. With ``mc_samples`` set to the draws, copies are kept as before."""
    with pytest.raises(RuntimeError, match="optimizer.zero_grad"):
        _step_params({}, lambda m, o: m.zero_grad(set_to_none=False))
    one = _step_params({}, lambda m, o: o.zero_grad(), draws=1)
    three = _step_params({"mc_samples": 3}, lambda m, o: m.zero_grad(set_to_none=False))
    for a, b in zip(one, three):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_structured_ngd_screening_transfers_once_per_step(monkeypatch):
    """The acceptance rule reads every gradient norm and statistic in one transfer (the
    factor update's CPU path reads its scalars on the host, where that is no transfer: the
    device path is checked)."""
    from structvi.optim import _dense_update

    monkeypatch.setattr(_dense_update, "HOST_SCALARS", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LayerNorm(3))
    opt = StructuredNGD(model, T=1)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    calls = [0]
    real = torch.Tensor.tolist

    def counting(self):
        calls[0] += 1
        return real(self)

    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        monkeypatch.setattr(torch.Tensor, "tolist", counting)
        calls[0] = 0
        opt.step()
        monkeypatch.setattr(torch.Tensor, "tolist", real)
    # one transfer of the gathered values; the others read the CPU running means
    running = sum(1 for s in opt.state.values() if "outlier_mean" in s)
    assert calls[0] == 1 + running


@pytest.mark.lowprec
def test_bf16_deepcopy_continues_in_lock_step():
    """A copy does not carry the original's master sync records (they name the original's
    tensors); it re-checks its masters once and then steps exactly like the original."""
    import copy

    model = _model("linear", torch.bfloat16)
    opt = VariationalNGD(model, data_size=20, T=2, lr_cov=0.1)
    _train(model, opt, "linear", torch.bfloat16, steps=2)
    other = copy.deepcopy(opt)
    assert other._synced == {}
    _train(model, opt, "linear", torch.bfloat16, steps=2)
    _train(other._model, other, "linear", torch.bfloat16, steps=2)
    for a, b in zip(model.parameters(), other._model.parameters()):
        assert torch.equal(a, b)
