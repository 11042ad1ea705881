"""Regression tests of the VI step rule (issue 9): every case converges or stops with a reason.

Each test failed on the code before the step rule (checked by running it there): accepted
catastrophic steps, NaN lock, silent divergences, lost progress on exceptions.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from structvi.engine import NGDConfig
from structvi.fit import Fitter, fit
from structvi.gaussian import StructuredGaussian
from tests.vi import models

F64 = torch.float64
GOOD = {"plateau", "steps"}
STOPPED = {"non_finite", "rejected", "diverged"}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def run(log_joint, q0, steps, seed=0, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fit(log_joint, q0, steps, generator=seeded(seed), progress=False, **kwargs)


def tail_elbo(res, n=20):
    e = res.history["elbo"]
    return sum(e[-n:]) / min(n, len(e))


def test_poisson_regression_from_a_bad_start_converges_for_every_seed():
    """From (−3, −3) with K = I the local quadratic model jumps to exp(f) ≈ 1e99 (old code:
    ELBO −1e21 … −1e200 reported as "steps"/"plateau"/"non_finite" in 5 of 10 seeds). Now all 10
    reach the optimum: tail ELBO within 1 nat of the reference −183.6 (a 2000-step hessian fit)."""
    log_joint, d = models.poisson_regression()
    q0 = StructuredGaussian(torch.full((d,), -3.0, dtype=F64),
                            StructuredGaussian.standard(d, dtype=F64).factor)
    for seed in range(10):
        res = run(log_joint, q0, 300, seed)
        assert res.stopped_reason in GOOD, (seed, res.stopped_reason, res.message)
        assert abs(tail_elbo(res) - (-183.6)) < 1.0, (seed, tail_elbo(res))


def test_garch_with_a_nan_region_does_not_lock():
    """α + β > 1 makes the GARCH likelihood NaN; old code skipped every step with one such
    sample and stopped "non_finite" (2 of 3 seeds). Now the samples are dropped with their
    partners (counted in history["dropped"]) and the fit reaches the reference ELBO −256.7."""
    log_joint, d = models.garch(T=150)
    q0 = StructuredGaussian(torch.tensor([-2.3, -2.0, 1.0], dtype=F64),
                            StructuredGaussian.standard(d, dtype=F64, init_scale=0.3).factor)
    res = run(log_joint, q0, 200, seed=1, num_samples=64)
    assert res.stopped_reason in GOOD, res.message
    assert sum(res.history["dropped"]) > 0
    assert abs(tail_elbo(res) - (-256.7)) < 1.0, tail_elbo(res)


def test_latent_gp_poisson_reaches_the_reference():
    """Old code: the mean jumped to exp(f) ≈ 1e52 and stopped "non_finite" with ELBO −8e52 (3 of
    3 seeds). Now 64 samples per step reach the reference tail ELBO (GP_REFERENCE) within 2 nats."""
    log_joint, d = models.latent_gp_poisson()
    res = run(log_joint, StructuredGaussian.standard(d, dtype=F64), 150, seed=0, num_samples=64)
    assert res.stopped_reason in GOOD, res.message
    assert abs(tail_elbo(res) - GP_REFERENCE) < 2.0, tail_elbo(res)


GP_REFERENCE = -28.9  # tail ELBO of 200-step, 64-sample fits (3 seeds: −29.05, −28.87, −28.88)


@pytest.mark.parametrize("seed", [1, 2])
def test_reparam_with_two_samples_does_not_blow_up(seed):
    """Old code: |mean| → 1e160 and ELBO −1e300 in seeds 1 and 2. Now: within 2 nats of the
    family optimum's ELBO (−1.5 ± noise for this d = 6 target: log Z = 0 up to the constant)."""
    log_joint, m, _ = models.stiff_gaussian(cond=1e2)
    res = run(log_joint, StructuredGaussian.standard(6, dtype=F64), 300, seed,
              estimator="reparam", num_samples=2)
    assert res.stopped_reason in GOOD | STOPPED, res.message
    assert torch.isfinite(res.q.loc).all() and (res.q.loc.double() - m).abs().max() < 2.0


def test_hessian_on_a_cauchy_target_stops_with_a_reason_and_the_best_q():
    """Old code: variance 1e148 reported as "plateau". The expected curvature is negative far
    out, so the factor keeps growing; now the fit stops "diverged" and returns the best q."""
    log_joint, d = models.cauchy()
    res = run(log_joint, StructuredGaussian.standard(d, dtype=F64), 300, estimator="hessian")
    assert res.stopped_reason == "diverged" or res.stopped_reason in GOOD
    assert float(res.q.variance.max()) < 1e3, float(res.q.variance.max())
    assert "diverged" != res.stopped_reason or "best" in res.message


def test_hessian_with_lr_10_converges():
    log_joint, m, _ = models.stiff_gaussian(cond=1e2)
    res = run(log_joint, StructuredGaussian.standard(6, dtype=F64), 300, estimator="hessian",
              config=NGDConfig(lr=10.0))
    assert res.stopped_reason in GOOD | STOPPED
    assert (res.q.loc.double() - m).abs().max() < 0.5


# ---------------------------------------------------------------------- nothing lost
class RaiseAt:
    """Raises ``ValueError`` on the ``k``-th gradient evaluation at the samples (one per step; the
    default CG mean step's Hessian-vector products at the mean, one point, are not counted)."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def __call__(self, Z):
        if Z.requires_grad and Z.shape[0] > 1:
            self.calls += 1
            if self.calls == self.k:
                raise ValueError("model exploded")
        return -0.5 * (Z - 1).square().sum(-1)


def test_exception_from_the_target_keeps_the_progress():
    q0 = StructuredGaussian.standard(3, dtype=F64)
    good = run(RaiseAt(10**9), q0, 6, early_stopping=None)
    with pytest.raises(ValueError, match="model exploded") as info:
        run(RaiseAt(7), q0, 50, early_stopping=None)
    res = info.value.fit_result
    assert res.stopped_reason == "error" and "model exploded" in res.message
    assert torch.equal(res.q.loc, good.q.loc) and res.history["elbo"] == good.history["elbo"]
    fitter = Fitter(RaiseAt(10**9), q0, generator=seeded(5))
    fitter.load_state_dict(res.state)  # resumable
    assert fitter.iteration == 7


@pytest.mark.parametrize("where", ["callback", "schedule"])
def test_exception_from_a_callback_or_schedule_keeps_the_progress(where):
    q0 = StructuredGaussian.standard(3, dtype=F64)

    def schedule(step):
        if step == 4:
            raise RuntimeError("schedule broke")
        return NGDConfig(lr=0.5)

    def callback(fitter, record):
        if record.iteration == 4:
            raise RuntimeError("callback broke")

    kwargs = {"callback": callback} if where == "callback" else {"config": schedule}
    with pytest.raises(RuntimeError, match=f"{where} broke") as info:
        run(lambda Z: -0.5 * Z.square().sum(-1), q0, 20, early_stopping=None, **kwargs)
    res = info.value.fit_result
    assert res.stopped_reason == "error" and len(res.history["elbo"]) == 4
