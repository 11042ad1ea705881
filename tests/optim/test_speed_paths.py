"""The fast paths of the optimizer give the results of the general paths: the dense factor
update (bit for bit the structure-API update), the fused momentum steps of a group (bit for
bit one step per parameter) and the group checks skipped for unchanged groups (a changed value
is still validated)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD
from structvi.optim import functional as F
from structvi.structures.registry import make_structure


def _dense(d: int, scale: float, seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    S = make_structure("dense", d, dtype=dtype)
    A = torch.randn(d, d, generator=g, dtype=dtype) * scale
    return S.from_dense(torch.eye(d, dtype=dtype) + A)


def _spd(d: int, seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, 2 * d, generator=g, dtype=dtype)
    return make_structure("dense", d, dtype=dtype).from_dense(X @ X.T / (2 * d))


def _general(state, H_K, H_C, *, lr, alpha, damping, unscale, kfac_like, relative, trust):
    nu_K, nu_C = F._directions(state, H_K, H_C, damping=damping, unscale=unscale,
                               kfac_like=kfac_like, half=0.5, relative_damping=relative)
    opts = dict(lr=lr, alpha=alpha, normalize=False, retraction="quadratic",
                trust_region=trust)
    K, m_K = F._factor_update(state.K, state.m_K, nu_K, **opts)
    C, m_C = F._factor_update(state.C, state.m_C, nu_C, **opts)
    return K, C, m_K, m_C


@pytest.mark.parametrize("host", [False, True], ids=["device_scalars", "host_scalars"])
@pytest.mark.parametrize("kfac_like,relative,trust",
                         list(itertools.product([False, True], [False, True], [None, 1.0])))
def test_dense_update_matches_structure_path(kfac_like, relative, trust, host, monkeypatch):
    """update_preconditioner's dense path = _directions + engine factor_step: bit for bit with
    the scalar coefficients on the device (the GPU path), to rounding with them on the host
    (the CPU path, float64: 1e-12)."""
    from structvi.optim import _dense_update

    monkeypatch.setattr(_dense_update, "HOST_SCALARS", host)
    calls = []
    real = _dense_update.dense_update
    monkeypatch.setattr(_dense_update, "dense_update", lambda *a, **k: calls.append(1) or real(
        *a, **k))
    K, C = _dense(5, 0.1, 0), _dense(3, 0.1, 1)
    m_K, m_C = (None, None) if kfac_like else (_dense(5, 0.2, 2), _dense(3, 0.2, 3))
    state = F.FactorState(K, C, m_K, m_C)
    H_K, H_C = _spd(5, 4), _spd(3, 5)
    alpha = 0.0 if kfac_like else 0.5
    kw = dict(damping=1e-2, unscale=0.7, kfac_like=kfac_like)
    new = F.update_preconditioner(state, H_K, H_C, lr_cov=3.0, alpha1=0.5, retraction="quadratic",
                                  trust_region=trust, relative_damping=relative, **kw)
    assert calls == [1]  # the dense path was taken
    ref = _general(state, H_K, H_C, lr=3.0, alpha=alpha, relative=relative, trust=trust, **kw)
    for got, want in zip(new, ref):
        if want is None:
            assert got is None
        else:
            assert got.spec() == want.spec()
            if host:
                assert torch.allclose(got.to_dense(), want.to_dense(), rtol=1e-12, atol=1e-14)
            else:
                assert torch.equal(got.to_dense(), want.to_dense())


def test_group_values_changed_after_a_checked_step_are_checked_again():
    """Group checks are skipped only while every value is the object last validated: a value
    set after earlier steps (or a list edited in place) is still validated by step()."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = StructuredNGD(net)
    x = torch.randn(8, 3)

    def step() -> None:
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    step()
    step()  # the groups are unchanged: not validated again
    opt.param_groups[0]["T"] = 0
    with pytest.raises(ValueError, match=r"T must be an integer >= 1, got T=0"):
        step()
    opt.param_groups[0]["T"] = 1
    opt.param_groups[0]["preconditioner_dtype"] = [None, None]  # a list: never cached
    step()
    opt.param_groups[0]["preconditioner_dtype"][0] = "float32"
    with pytest.raises(ValueError, match=r"preconditioner_dtype must be a pair"):
        step()


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.0), (0.9, 1e-2), (0.0, 0.0),
                                                    (0.0, 1e-2)])
def test_fused_momentum_steps_are_the_per_parameter_steps_bit_for_bit(momentum, weight_decay):
    g = torch.Generator().manual_seed(0)
    # float32 batch, float64 batch, a bf16 parameter with float32 buffer (per-parameter path)
    dtypes = [(torch.float32,) * 3, (torch.float32,) * 3, (torch.float64,) * 3,
              (torch.bfloat16, torch.bfloat16, torch.float32)]
    made = []
    for (p_dtype, d_dtype, b_dtype), shape in zip(dtypes, [(5, 3), (4,), (3, 3), (6,)]):
        param = torch.randn(shape, generator=g).to(p_dtype)
        direction = torch.randn(shape, generator=g).to(d_dtype)
        buffer = torch.randn(shape, generator=g).to(b_dtype) if momentum else None
        made.append((param, direction, buffer))
    ref = [(p.clone(), d.clone(), None if b is None else b.clone()) for p, d, b in made]
    kw = dict(lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for p, d, b in ref:
        F.momentum_step(p, d, b, **kw)
    F.momentum_steps(*map(list, zip(*made)), **kw)
    for (p, _, b), (p_ref, _, b_ref) in zip(made, ref):
        assert torch.equal(p, p_ref)
        assert b is None or torch.equal(b, b_ref)


@pytest.mark.parametrize("fill", [0.0, 0.5, float("nan"), float("inf")])
def test_host_trust_region_cap_handles_zero_nan_and_inf_like_the_device_path(fill):
    """β = lr·min(1, c/(lr‖m‖_∞)): no cap for a zero or NaN norm (0/0 → 1), a zero step for an
    infinite one, as the tensor formula gives on the device."""
    from structvi.optim import _dense_update

    factor = torch.eye(3, dtype=torch.float64)
    nu = torch.full((3, 3), fill, dtype=torch.float64)
    m = torch.zeros(3, 3, dtype=torch.float64)
    kw = dict(lr=3.0, alpha=0.5, trust_region=1.0)
    host, host_m = _dense_update._host_factor_step(factor, m, nu, **kw)
    device, device_m = _dense_update._dense_factor_step(factor, m, nu, **kw)
    assert torch.allclose(host_m, device_m, equal_nan=True)
    assert torch.allclose(host, device, rtol=1e-12, equal_nan=True)
    if fill == 0.0:
        assert torch.equal(host, factor)  # no direction: the factor is unchanged


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                        (torch.bfloat16, 1e-5)])
def test_precondition_parts_is_the_assembled_preconditioning(bias, dtype, tol):
    """``precondition_parts`` (no ``[∇W, ∇b]`` formed) = ``precondition`` of the assembled
    gradient matrix, with the GradScaler scale and a clip factor; bf16 gradients with float32
    products come back in bf16, or float32 with ``keep_dtype``."""
    g = torch.Generator().manual_seed(0)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    K, C = _dense(4 + bias, 0.2, 1, wide), _dense(3, 0.2, 2, wide)
    KKt, CCt = F.dense_product(K), F.dense_product(C)
    grad_W = torch.randn(3, 4, generator=g, dtype=torch.float64).to(dtype)
    grad_b = torch.randn(3, generator=g, dtype=torch.float64).to(dtype) if bias else None
    G = torch.cat([grad_W, grad_b[:, None]], 1) if bias else grad_W
    want = F.precondition(G.to(wide) * (0.5 / 4.0), K, C, KKt, CCt)
    got = F.precondition_parts(grad_W, grad_b, KKt, CCt, scale=4.0, factor=0.5)
    assert got.dtype == dtype
    assert torch.allclose(got.to(wide), want.to(dtype).to(wide), rtol=tol, atol=tol)
    kept = F.precondition_parts(grad_W, grad_b, KKt, CCt, scale=4.0, factor=0.5,
                                keep_dtype=True)
    assert kept.dtype == wide
    assert torch.allclose(kept, want, rtol=tol, atol=tol)
