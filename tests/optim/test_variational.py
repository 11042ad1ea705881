"""VariationalNGD: the Kronecker-structured stationary point, exact restore, draw moments, seeds.

Bayesian linear regression with one ``Linear`` layer (``d_o = 2`` outputs, Gaussian likelihood
with noise precision ``Λ⁻¹``) has the exact curvature ``Ē = A ⊗ Λ⁻¹`` (``A = X̃ᵀX̃/n``, ``X̃``
with a ones column). The stationary point of the per-datum tempered ELBO over the family
``N(μ, ρ² P_K ⊗ P_C)`` (``ρ² = τ/N``, prior ``N(0, δ⁻¹I)``, ``λ = τδ/N``) is, by setting the
derivatives with respect to ``μ``, ``P_K`` and ``P_C`` to zero:

    (A ⊗ Λ⁻¹ + λI) vec μ = vec(Λ⁻¹ Yᵀ X̃ / n)
    P_K⁻¹ = tr̄(Λ⁻¹ P_C) A + λ tr̄(P_C) I,     P_C⁻¹ = tr̄(A P_K) Λ⁻¹ + λ tr̄(P_K) I

(for a diagonal family, the diagonals of these equations), i.e. ``ν_K = ν_C = 0`` of
MATH (3.2) with ``damping = λ``. The tests check these equations on the optimizer's factors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structvi.optim import VariationalNGD

N_DATA, D_IN, D_OUT = 40, 3, 2


def regression_problem(dtype: torch.dtype, seed: int = 0):
    """``X̃`` (ones column last), targets, ``Λ⁻¹``, and hook rows ``S`` (``SᵀX̃ = 0``,
    ``SᵀS/n = Λ⁻¹``) so that the Kronecker statistics are exactly ``A`` and ``Λ⁻¹``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N_DATA, D_IN, generator=gen, dtype=torch.float64)
    Xt = torch.cat([X, torch.ones(N_DATA, 1, dtype=torch.float64)], 1)
    W_true = torch.randn(D_OUT, D_IN + 1, generator=gen, dtype=torch.float64)
    Y = Xt @ W_true.T + 0.3 * torch.randn(N_DATA, D_OUT, generator=gen, dtype=torch.float64)
    Lam_inv = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.cat([Xt, torch.randn(N_DATA, D_OUT, generator=gen,
                                                        dtype=torch.float64)], 1))
    L = torch.linalg.cholesky(Lam_inv).T  # LᵀL = Λ⁻¹
    S = N_DATA**0.5 * Q[:, D_IN + 1:] @ L
    return [t.to(dtype) for t in (X, Xt, Y, Lam_inv, S)]


def regression_loss(layer: nn.Linear, X, Y, Lam_inv, S):
    """``ℓ̄ = (1/n) Σ ½ rᵢᵀΛ⁻¹rᵢ`` through ``F.linear`` (no hook) plus a zero-gradient term
    through the layer whose output gradients give the Kronecker statistic ``Λ⁻¹`` exactly
    (the empirical Fisher of the residuals would be random at a weight draw)."""
    R = nn.functional.linear(X, layer.weight, layer.bias) - Y
    fit = 0.5 * ((R @ Lam_inv) * R).sum(1).mean()
    return fit + (layer(X) * S).sum(1).mean()


def reference(A, Lam_inv, lam, diagonal: bool, iters: int = 2000):
    """``(P_K, P_C)`` solving the stationary equations above by fixed-point iteration."""
    P_K, P_C = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(Lam_inv.shape[0], dtype=A.dtype)

    def inverse(M):
        return torch.diag(1 / M.diagonal()) if diagonal else torch.linalg.inv(M)

    def tb(M):
        return M.trace() / M.shape[0]

    for _ in range(iters):
        P_K = inverse(tb(Lam_inv @ P_C) * A + lam * tb(P_C) * torch.eye(A.shape[0], dtype=A.dtype))
        P_C = inverse(tb(A @ P_K) * Lam_inv
                      + lam * tb(P_K) * torch.eye(Lam_inv.shape[0], dtype=A.dtype))
    return P_K, P_C


STEPS = 100
TOL = {torch.float64: dict(fixed=1e-10, rel=1e-9), torch.float32: dict(fixed=2e-5, rel=2e-4)}


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
@pytest.mark.parametrize("dtype, temperature", [(torch.float64, 1.0), (torch.float64, 0.5),
                                                (torch.float32, 1.0)],
                         ids=["float64-tau1", "float64-tau0.5", "float32-tau1"])
def test_converges_to_kronecker_stationary_point(structure, temperature, dtype):
    X, Xt, Y, Lam_inv, S = regression_problem(dtype)
    torch.manual_seed(0)
    layer = nn.Linear(D_IN, D_OUT).to(dtype)
    delta = 2.0
    # extra_damping=0: the variational update itself (the default γ = 1e-2 damps the factors)
    opt = VariationalNGD(layer, data_size=N_DATA, prior_precision=delta, temperature=temperature,
                         antithetic=True, structures=structure, lr=0.7, momentum=0.3, T=1,
                         lr_cov=0.5, alpha1=0.0, extra_damping=0.0)
    gen = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        for _ in range(2):  # an antithetic pair: the mean gradient is the gradient at μ exactly
            opt.zero_grad()
            with opt.sampled_params(train=True, generator=gen):
                regression_loss(layer, X, Y, Lam_inv, S).backward()
        opt.step()
    lam = temperature * delta / N_DATA
    tol = TOL[dtype]
    # Fixed-point equations ν_K = ν_C = 0 on the optimizer's factors (dense forms, projected)
    K, C = (f.to_dense().double() for f in opt.preconditioner(layer)[:2])
    A, Li = (Xt.T @ Xt / N_DATA).double(), Lam_inv.double()

    def tb(M):
        return M.trace() / M.shape[0]

    def proj(M):
        return torch.diag(M.diagonal()) if structure == "diagonal" else M

    eye_K, eye_C = torch.eye(4, dtype=A.dtype), torch.eye(2, dtype=A.dtype)
    nu_K = proj(tb(C.T @ Li @ C) * K.T @ A @ K + lam * tb(C.T @ C) * K.T @ K) - eye_K
    nu_C = proj(tb(K.T @ A @ K) * C.T @ Li @ C + lam * tb(K.T @ K) * C.T @ C) - eye_C
    assert nu_K.abs().max() < tol["fixed"] and nu_C.abs().max() < tol["fixed"]
    # Mean: (A ⊗ Λ⁻¹ + λI) vec μ = vec(Λ⁻¹ Yᵀ X̃ / n), column-major vec
    rhs = (Li @ Y.double().T @ Xt.double() / N_DATA).T.reshape(-1)
    mu = torch.linalg.solve(torch.kron(A, Li) + lam * torch.eye(8, dtype=A.dtype), rhs)
    got = torch.cat([layer.weight, layer.bias[:, None]], 1).double().T.reshape(-1)
    assert torch.allclose(got, mu, rtol=tol["rel"], atol=tol["rel"])
    # Covariance ρ² P_K ⊗ P_C against an independent solve of the stationary equations
    P_K, P_C = reference(A, Li, lam, structure == "diagonal")
    Sigma = temperature / N_DATA * torch.kron(P_K, P_C)
    got_Sigma = opt.posterior_covariance(layer).double()
    assert torch.allclose(got_Sigma, Sigma, rtol=tol["rel"] * 10, atol=0)


def trained_layer(steps: int = 5, seed: int = 0):
    X, _, Y, Lam_inv, S = regression_problem(torch.float64, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT).double(), Scale())
    opt = VariationalNGD(model, data_size=N_DATA, prior_precision=1.0, T=1, lr=0.3,
                         lr_cov=0.3)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        opt.zero_grad()
        with opt.sampled_params(train=True, generator=gen):
            (regression_loss(model[0], X, Y, Lam_inv, S) + model[1].loss()).backward()
        opt.step()
    return model, opt


class Scale(nn.Module):
    """An unsupported parameter (diagonal Gaussian) that enters the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor([0.5, -0.2, 1.0], dtype=torch.float64))

    def forward(self, x):
        return x

    def loss(self):
        return (self.s - 1.0).square().sum() * 0.7


def test_sampled_params_restores_means_exactly():
    model, opt = trained_layer()
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    with opt.sampled_params(generator=gen):
        for name, p in model.named_parameters():
            assert not torch.equal(p, before[name][1]), name  # a draw is in place
    with pytest.raises(ZeroDivisionError), opt.sampled_params(train=True, generator=gen):
        raise ZeroDivisionError  # restored on an error too
    for name, p in model.named_parameters():
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]), name


def test_nested_sampled_params_is_an_error():
    model, opt = trained_layer(steps=1)
    with opt.sampled_params(), pytest.raises(RuntimeError, match="already inside"):
        with opt.sampled_params():
            pass


def test_draws_have_the_stated_covariance():
    """10 000 draws: relative Frobenius error of the sample covariance of vec([W, b]) against
    ρ²(KKᵀ⊗CCᵀ) below 0.08 (its standard error is about √((d+1)/n) = 0.03 for d = 8); the
    diagonal parameter's variances ρ²/(h + λ) within 8 %; means within 4.5 standard errors."""
    model, opt = trained_layer()
    layer, extra = model[0], model[1].s
    n = 10_000
    gen = torch.Generator().manual_seed(7)
    layer_draws, extra_draws = [], []
    for _ in range(n):
        with opt.sampled_params(generator=gen):
            layer_draws.append(torch.cat([layer.weight, layer.bias[:, None]], 1).T.reshape(-1))
            extra_draws.append(extra.detach().clone())
    Wd, Ed = torch.stack(layer_draws), torch.stack(extra_draws)
    mean = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().T.reshape(-1)
    Sigma = opt.posterior_covariance(layer)
    rho2 = 1.0 / N_DATA  # τ/N
    K, C = (f.to_dense() for f in opt.preconditioner(layer)[:2])
    assert torch.allclose(Sigma, rho2 * torch.kron(K @ K.T, C @ C.T))
    emp = torch.cov(Wd.T)
    assert torch.linalg.norm(emp - Sigma) / torch.linalg.norm(Sigma) < 0.08
    se = (Sigma.diagonal() / n).sqrt()
    assert ((Wd.mean(0) - mean).abs() < 4.5 * se).all()
    state, group = opt.state[extra], opt.param_groups[0]
    h = state["exp_avg_sq"] + group["beta2"] ** int(state["step"])
    var = rho2 / (h + 1.0 / N_DATA)
    assert torch.allclose(Ed.var(0), var, rtol=0.08)
    assert ((Ed.mean(0) - extra.detach()).abs() < 4.5 * (var / n).sqrt()).all()


def test_seeded_draws_repeat():
    model, opt = trained_layer()

    def draw(seed):
        with opt.sampled_params(generator=torch.Generator().manual_seed(seed)):
            return [p.detach().clone() for p in model.parameters()]

    a, b, c = draw(11), draw(11), draw(12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
