"""Clear errors on the fit side (issue 9, bullet 5) and the atomic, dtype-strict load."""

from __future__ import annotations

import pytest
import torch

from structvi.fit import Fitter, elbo, fit
from structvi.gaussian import StructuredGaussian

F64 = torch.float64


def quad(Z):
    return -0.5 * Z.square().sum(-1)


@pytest.mark.parametrize("estimator", ["stein", "hessian", "reparam"])
@pytest.mark.parametrize(
    ("log_joint", "message"),
    [
        (lambda Z: quad(Z.detach()), "does not depend on Z"),
        (lambda Z: torch.zeros(Z.shape[0], dtype=Z.dtype), "does not depend on Z"),
        (lambda Z: (Z.detach() * 10).long().sum(-1), "floating-point"),
    ],
    ids=["detached", "constant", "int"],
)
def test_log_joint_that_ignores_z_is_named(log_joint, message, estimator):
    q0 = StructuredGaussian.standard(2, dtype=F64)
    with pytest.raises(ValueError, match=message):
        fit(log_joint, q0, 2, estimator=estimator, progress=False)


def test_dtype_clash_inside_log_joint_is_explained():
    data = torch.ones(3, dtype=F64)
    q0 = StructuredGaussian.standard(3, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"points of dtype torch.float32.*dtype=torch.float64"):
        fit(lambda Z: -(Z @ data), q0, 2, progress=False)


def test_elbo_rejects_an_n_by_d_output():
    q = StructuredGaussian.standard(3, dtype=F64)
    with pytest.raises(ValueError, match=r"to shape \(64,\), got output \(64, 3\)"):
        elbo(lambda Z: -0.5 * Z.square(), q, 64)


def fitted(q0, steps=3, seed=0):
    f = Fitter(quad, q0, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        f.step()
    return f


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda sd: sd["engine"].pop("loc"), "not a valid engine state"),
        (lambda sd: sd.update(generator=torch.zeros(3)), "not a torch.Generator state"),
        (lambda sd: sd["record"]["lists"].update(elbo=["x"]), "list of numbers"),
        (lambda sd: sd.update(iteration=-1), "iteration must be"),
        (lambda sd: sd.update(step_scale=2.0), "step_scale"),
    ],
    ids=["engine", "generator", "history", "iteration", "step_scale"],
)
def test_load_state_dict_is_atomic(corrupt, message):
    q0 = StructuredGaussian.standard(3, dtype=F64)
    target = fitted(q0, 2, seed=1)
    before = target.state_dict()
    sd = fitted(q0, 5).state_dict()
    corrupt(sd)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert torch.equal(after["engine"]["loc"], before["engine"]["loc"])
    assert torch.equal(after["generator"], before["generator"])
    assert after["history"] == before["history"] and after["iteration"] == before["iteration"]


def test_load_state_dict_does_not_switch_dtypes():
    sd = fitted(StructuredGaussian.standard(3, dtype=F64)).state_dict()
    target = Fitter(quad, StructuredGaussian.standard(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="dtype torch.float64 but this Fitter keeps torch.float32"):
        target.load_state_dict(sd)
    assert target.state.loc.dtype == torch.float32
