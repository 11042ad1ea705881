"""VariationalNGD ``extra_damping``: ``γ`` damps the Kronecker factor update, not the prior.

With ``extra_damping = γ`` the factors solve the stationary equations of
``tests/optim/test_variational.py`` with the damping ``λ + γ``, while the mean still solves
``(A ⊗ Λ⁻¹ + λI) vec μ = vec(Λ⁻¹ Yᵀ X̃ / n)`` (the prior gradient stays ``λμ``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structvi.optim import VariationalNGD
from tests.optim.test_variational import (
    D_IN,
    D_OUT,
    N_DATA,
    Scale,
    reference,
    regression_loss,
    regression_problem,
)

GAMMA = 0.2  # much larger than λ = τδ/N = 0.05, so that a wrong split of λ and γ shows


def _fit(structure: str, extra_damping: float, steps: int = 100):
    X, Xt, Y, Lam_inv, S = regression_problem(torch.float64)
    torch.manual_seed(0)
    layer = nn.Linear(D_IN, D_OUT).double()
    opt = VariationalNGD(layer, data_size=N_DATA, prior_precision=2.0, temperature=1.0,
                         extra_damping=extra_damping, antithetic=True, structures=structure,
                         lr=0.7, momentum=0.3, T=1, lr_cov=0.5, alpha1=0.0)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for _ in range(2):  # antithetic pair: the mean gradient is the gradient at μ exactly
            opt.zero_grad()
            with opt.sampled_params(train=True, generator=gen):
                regression_loss(layer, X, Y, Lam_inv, S).backward()
        opt.step()
    return layer, opt, Xt, Y, Lam_inv


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_extra_damping_damps_the_factors_and_not_the_mean(structure):
    layer, opt, Xt, Y, Li = _fit(structure, GAMMA)
    lam = 1.0 * 2.0 / N_DATA
    A = Xt.T @ Xt / N_DATA
    # covariance: the stationary factors of the damping λ + γ
    P_K, P_C = reference(A, Li, lam + GAMMA, structure == "diagonal")
    Sigma = 1.0 / N_DATA * torch.kron(P_K, P_C)
    assert torch.allclose(opt.posterior_covariance(layer), Sigma, rtol=1e-8, atol=0)
    P_K0, P_C0 = reference(A, Li, lam, structure == "diagonal")
    assert not torch.allclose(Sigma, 1.0 / N_DATA * torch.kron(P_K0, P_C0), rtol=1e-2)
    # mean: the prior gradient is λμ, without γ
    rhs = (Li @ Y.T @ Xt / N_DATA).T.reshape(-1)
    mu = torch.linalg.solve(torch.kron(A, Li) + lam * torch.eye(8, dtype=A.dtype), rhs)
    got = torch.cat([layer.weight, layer.bias[:, None]], 1).T.reshape(-1)
    assert torch.allclose(got, mu, rtol=1e-9, atol=1e-9)
    assert opt.param_groups[0]["damping"] == pytest.approx(lam)  # the group keeps λ


def test_extra_damping_per_group_and_in_the_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT).double(), Scale())

    def groups():
        return [dict(params=model[0].parameters(), extra_damping=0.5),
                dict(params=model[1].parameters())]

    opt = VariationalNGD(model, groups(), data_size=N_DATA, extra_damping=0.1)
    assert [g["extra_damping"] for g in opt.param_groups] == [0.5, 0.1]
    saved = opt.state_dict()
    assert [g["extra_damping"] for g in saved["param_groups"]] == [0.5, 0.1]
    other = VariationalNGD(model, groups(), data_size=N_DATA)
    other.param_groups[1]["extra_damping"] = 0.0
    other.load_state_dict(saved)
    assert [g["extra_damping"] for g in other.param_groups] == [0.5, 0.1]


@pytest.mark.parametrize("value", [-1e-3, float("inf"), "0.1", True])
def test_bad_extra_damping_is_named(value):
    with pytest.raises(ValueError, match="extra_damping"):
        VariationalNGD(nn.Linear(3, 2), data_size=10, extra_damping=value)
    model = nn.Sequential(nn.Linear(3, 2), Scale())
    groups = [dict(params=model[0].parameters()),
              dict(params=model[1].parameters(), extra_damping=value)]
    with pytest.raises(ValueError, match=r"extra_damping \(param group 1\)"):
        VariationalNGD(model, groups, data_size=10)
