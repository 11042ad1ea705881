"""The CG mean step's curvature (structvi._fit_curvature, engine.target_hessian): the explicit
Hessian equals the matrix-free products, is reused while the mean stays close, falls back when
the graph cannot be batched, and resumes exactly."""

from __future__ import annotations

import io

import pytest
import torch

from structvi._fit_curvature import MeanCurvature
from structvi.engine.mean_solver import target_hessian, target_hvp
from structvi.fit import Fitter
from structvi.gaussian import StructuredGaussian

F64 = torch.float64


def garch_like(T: int = 40):
    """A GARCH(1,1)-shaped log-joint: a sequential loop of scalar operations, (n, 4) → (n,)."""
    gen = torch.Generator().manual_seed(0)
    y = 0.5 * torch.randn(T, generator=gen, dtype=F64)

    def log_joint(Z):
        mu, log_w, a, b = (Z[:, k] for k in range(4))
        w, al, be = log_w.exp(), torch.sigmoid(a), torch.sigmoid(b)
        e = y - mu[:, None]
        s2 = [torch.full_like(mu, float(y.var()))]
        for t in range(1, T):
            s2.append(w + al * e[:, t - 1] ** 2 + be * s2[-1])
        s2 = torch.stack(s2, -1)
        lik = -0.5 * (e**2 / s2 + s2.log()).sum(-1)
        return lik - 0.5 * (mu**2 + (log_w + 2) ** 2 + a**2 + b**2)

    return log_joint


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-4)])
def test_explicit_hessian_equals_the_matrix_free_products(dtype, tol):
    lj = garch_like()
    points = torch.tensor([[0.1, -1.5, 0.2, 0.4], [0.0, -2.0, -0.3, 0.8]], dtype=dtype)
    H, hvp = target_hessian(lj, points)
    ref = target_hvp(lj, points)
    cols = torch.stack([ref(e) for e in torch.eye(4, dtype=dtype)])
    torch.testing.assert_close(H, cols, rtol=tol, atol=tol)
    v = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=dtype)
    torch.testing.assert_close(v @ H, ref(v), rtol=tol, atol=tol)
    torch.testing.assert_close(hvp(v), ref(v), rtol=tol, atol=tol)


def test_explicit_hessian_of_an_affine_target_is_zero():
    H, hvp = target_hessian(lambda Z: Z.sum(-1), torch.zeros(1, 3, dtype=F64))
    assert torch.equal(H, torch.zeros(3, 3, dtype=F64))


class _NoVmapSquare(torch.autograd.Function):
    """``x²`` whose second derivative reads a Python float (cannot be batched)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _NoVmapTwice.apply(g, x)


class _NoVmapTwice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, x):
        ctx.save_for_backward(g, x)
        return 2 * g * x

    @staticmethod
    def backward(ctx, gg):
        g, x = ctx.saved_tensors
        scale = float(gg.sum())  # a Python number: fails under vmap
        return 2 * gg * x, 2 * g * scale / max(float(gg.sum()), 1e-300) * gg


def _unbatchable(Z):
    return -0.5 * _NoVmapSquare.apply(Z).sum(-1)


def test_unbatchable_graph_falls_back_to_matrix_free_products():
    point = torch.tensor([[0.3, -0.2]], dtype=F64)
    H, hvp = target_hessian(_unbatchable, point)
    assert H is None
    torch.testing.assert_close(hvp(torch.tensor([1.0, 2.0], dtype=F64)),
                               target_hvp(_unbatchable, point)(torch.tensor([1.0, 2.0], dtype=F64)))
    curv = MeanCurvature()
    op = curv.operator(_unbatchable, point[0], F64)
    assert not curv.batchable and curv.matrix is None
    torch.testing.assert_close(op(torch.tensor([1.0, 0.0], dtype=F64)),
                               torch.tensor([1.0, 0.0], dtype=F64))


def test_hessian_is_reused_while_the_mean_stays_close():
    lj = garch_like()
    curv = MeanCurvature(reuse_radius=0.5, max_age=3)
    mu = torch.tensor([0.1, -1.5, 0.2, 0.4], dtype=F64)
    curv.operator(lj, mu, F64)
    curv.operator(lj, mu + 1e-6, F64)
    assert curv.formed == 1 and curv.age == 2
    curv.operator(lj, mu + 1e-6, F64)
    curv.operator(lj, mu, F64)  # max_age reached: formed again
    assert curv.formed == 2 and curv.age == 1
    curv.operator(lj, mu + torch.tensor([10.0, 0, 0, 0], dtype=F64), F64)  # moved far
    assert curv.formed == 3
    never = MeanCurvature(max_dim=0)
    never.operator(lj, mu, F64)
    assert never.formed == 0 and never.matrix is None


def _count_graphs(lj):
    """``lj`` that counts its calls at a single point with gradients (the mean's Hessian)."""
    calls = {"graph": 0}

    def counted(Z):
        if Z.shape[0] == 1 and Z.requires_grad:
            calls["graph"] += 1
        return lj(Z)

    return counted, calls


def test_default_fit_forms_the_hessian_far_less_than_once_per_step():
    """Regression: the CG mean step built a double-backward graph at the mean at every step
    and ran one backward pass per CG iteration (80 % of a GARCH step); now the Hessian is
    formed once per step only while the mean is moving."""
    lj, calls = _count_graphs(garch_like())
    q0 = StructuredGaussian(torch.tensor([0.0, -2.0, 0.0, 0.0], dtype=F64),
                            StructuredGaussian.standard(4, "diagonal", dtype=F64).factor)
    fitter = Fitter(lj, q0, generator=torch.Generator().manual_seed(0))
    for _ in range(60):
        fitter.step()
    assert calls["graph"] <= 30, calls
    assert fitter.curvature.formed == calls["graph"]


@pytest.mark.parametrize("structure", ["diagonal", "low_rank_diagonal", "dense"])
def test_gaussian_target_same_fit_as_matrix_free(structure):
    """On a Gaussian target the Hessian is constant: reusing it changes nothing."""
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(5, 5, generator=gen, dtype=F64)
    Lam = A @ A.T + 0.5 * torch.eye(5, dtype=F64)
    m = torch.randn(5, generator=gen, dtype=F64)

    def lj(Z):
        D = Z - m
        return -0.5 * ((D @ Lam) * D).sum(-1)

    options = {"rank": 2} if structure == "low_rank_diagonal" else {}
    q0 = StructuredGaussian.standard(5, structure, dtype=F64, **options)
    fits = []
    for max_dim in (0, 64):
        f = Fitter(lj, q0, generator=torch.Generator().manual_seed(2))
        f.curvature = MeanCurvature(max_dim=max_dim)
        for _ in range(40):
            f.step()
        fits.append(f)
    torch.testing.assert_close(fits[0].state.loc, fits[1].state.loc, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fits[0].state.factor.to_dense(), fits[1].state.factor.to_dense(),
                               rtol=1e-9, atol=1e-9)
    assert fits[1].curvature.formed < 40


def test_cached_hessian_resumes_exactly():
    lj = garch_like()
    q0 = StructuredGaussian(torch.tensor([0.0, -2.0, 0.0, 0.0], dtype=F64),
                            StructuredGaussian.standard(4, "diagonal", dtype=F64).factor)
    full = Fitter(lj, q0, generator=torch.Generator().manual_seed(3))
    for _ in range(40):
        full.step()
    first = Fitter(lj, q0, generator=torch.Generator().manual_seed(3))
    for _ in range(25):
        first.step()
    assert first.state_dict()["mean_curvature"] is not None
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = Fitter(lj, q0, generator=torch.Generator().manual_seed(9))
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(15):
        resumed.step()
    assert torch.equal(full.state.loc, resumed.state.loc)
    assert torch.equal(full.state.factor.to_dense(), resumed.state.factor.to_dense())


def test_bad_cached_hessian_in_state_dict_is_refused():
    lj = garch_like()
    q0 = StructuredGaussian.standard(4, "diagonal", dtype=F64)
    f = Fitter(lj, q0, generator=torch.Generator().manual_seed(0))
    f.step()
    sd = f.state_dict()
    sd["mean_curvature"] = {"matrix": torch.zeros(3, 3, dtype=F64),
                            "loc": torch.zeros(4, dtype=F64), "age": 1}
    with pytest.raises(ValueError, match="mean_curvature"):
        Fitter(lj, q0).load_state_dict(sd)
