"""The deferred step rule (``StepRule(accept="deferred")``, :mod:`structvi._fit_deferred`)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from structvi._fit_deferred import MIN_HISTORY, DeferredCheck, Reference
from structvi.engine import NGDConfig
from structvi.fit import Fitter, StepRule
from structvi.gaussian import StructuredGaussian
from tests.vi import models
from tests.vi.test_step_rules import run as quiet_fit
from tests.vi.test_step_rules import seeded

F64 = torch.float64
DEFERRED = StepRule(accept="deferred")


@pytest.mark.parametrize("accept", ["crn", 1, 0.5, None])
def test_accept_must_be_true_false_or_deferred(accept):
    with pytest.raises(ValueError, match=r"accept must be True, False or 'deferred', got "):
        StepRule(accept=accept)


class Counting:
    """A Gaussian log-joint that counts its calls."""

    def __init__(self, d=3):
        self.calls, self.d = 0, d

    def __call__(self, Z):
        self.calls += 1
        return -0.5 * (Z - 1.0).square().sum(-1)


@pytest.mark.parametrize("estimator", ["stein", "reparam"])
def test_deferred_rule_runs_the_model_once_per_step(estimator):
    """The point of the rule: the common-random-number test's second model run is gone."""
    config = NGDConfig(lr=0.5, mean_cg_iters=0)  # no Hessian-vector products of the mean step
    counts = {}
    for rule in (StepRule(), DEFERRED):
        lj = Counting()
        fitter = Fitter(lj, StructuredGaussian.standard(3, dtype=F64), config,
                        estimator=estimator, num_samples=4, generator=seeded(), step_rule=rule)
        for _ in range(10):
            fitter.step()
        counts[rule.accept] = lj.calls
    assert counts["deferred"] == 10 < counts[True]


def test_poisson_regression_from_a_bad_start_converges_with_the_deferred_rule():
    """The bad start of tests/vi/test_step_rules.py (from (−3, −3) a plain step overshoots to
    exp(f) ≈ 1e99) with the deferred rule: the optimum (tail ELBO within 1 nat of −183.6) for
    every seed."""
    log_joint, d = models.poisson_regression()
    q0 = StructuredGaussian(torch.full((d,), -3.0, dtype=F64),
                            StructuredGaussian.standard(d, dtype=F64).factor)
    for seed in range(6):
        res = quiet_fit(log_joint, q0, 300, seed, step_rule=DEFERRED)
        assert res.stopped_reason in {"plateau", "steps"}, (seed, res.stopped_reason, res.message)
        tail = sum(res.history["elbo"][-20:]) / 20
        assert abs(tail - (-183.6)) < 1.0, (seed, tail)


def test_a_clear_loss_is_undone_and_the_scale_halved():
    """A factor step of lr = 40 (no trust region) blows the variance up: the next estimate
    shows the loss, the step is undone (state as before it) and the scale halved."""
    lj = Counting(2)
    config = NGDConfig(lr=40.0, trust_region=None, mean_cg_iters=0)
    fitter = Fitter(lj, StructuredGaussian.standard(2, dtype=F64).__class__(
        torch.ones(2, dtype=F64), StructuredGaussian.standard(2, dtype=F64).factor.scale(0.1)),
        config, num_samples=8, generator=seeded(1), step_rule=DEFERRED)
    fitter.step()
    start = fitter.deferred.reference.state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rec = fitter.step()
    assert rec.skipped and fitter.state is start and fitter.step_scale == 0.5
    assert fitter.record.num_backtracked == 1 and fitter.deferred.reference is None


def test_minibatch_log_joint_with_a_new_batch_per_call():
    """Bayesian linear regression whose log_joint draws a new minibatch on every call: the
    deferred rule (one call per step) fits it — mean within 0.05 of the exact posterior mean —
    and undoes few steps (minibatch noise is part of the allowance)."""
    gen = seeded(7)
    N, B = 2000, 100
    X = torch.randn(N, 2, generator=gen, dtype=F64)
    y = X @ torch.tensor([1.0, -2.0], dtype=F64) + torch.randn(N, generator=gen, dtype=F64)
    batches = seeded(8)

    def log_joint(Z):
        idx = torch.randint(0, N, (B,), generator=batches)
        r = y[idx] - Z @ X[idx].T  # (n, B)
        return -0.5 * (N / B) * r.square().sum(-1) - 0.5 * Z.square().sum(-1)

    precision = X.T @ X + torch.eye(2, dtype=F64)
    exact = torch.linalg.solve(precision, X.T @ y)
    q0 = StructuredGaussian.standard(2, dtype=F64)
    fitter = Fitter(log_joint, q0, num_samples=8, generator=seeded(), step_rule=DEFERRED,
                    config=lambda t: NGDConfig(lr=min(1.0, 10.0 / (t + 1)), mean_cg_iters=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(300):
            fitter.step()
    assert float((fitter.state.loc - exact).abs().max()) < 0.05
    assert fitter.num_skipped <= 15  # ≤ 5 % of the steps


def test_state_dict_with_a_pending_step_resumes_in_lock_step():
    log_joint, d = models.poisson_regression()
    q0 = StructuredGaussian(torch.full((d,), -3.0, dtype=F64),
                            StructuredGaussian.standard(d, dtype=F64).factor)
    kw = dict(num_samples=4, step_rule=DEFERRED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = Fitter(log_joint, q0, generator=seeded(3), **kw)
        for _ in range(30):
            full.step()
        first = Fitter(log_joint, q0, generator=seeded(3), **kw)
        for _ in range(12):
            first.step()
        assert first.deferred.reference is not None
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        resumed = Fitter(log_joint, q0, generator=seeded(99), **kw)
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        for _ in range(18):
            resumed.step()
    assert torch.equal(full.state.loc, resumed.state.loc)
    assert full.num_skipped == resumed.num_skipped
    assert full.history["elbo"] == resumed.history["elbo"]


def test_bad_deferred_state_is_refused_atomically():
    fitter = Fitter(Counting(), StructuredGaussian.standard(3, dtype=F64), num_samples=4,
                    generator=seeded(), step_rule=DEFERRED)
    fitter.step()
    sd = fitter.state_dict()
    sd["deferred"]["reference"]["scale"] = 2.0
    before = fitter.state
    with pytest.raises(ValueError, match="deferred reference scale must be in"):
        fitter.load_state_dict(sd)
    assert fitter.state is before


def test_noise_scale_uses_past_losses_of_steps_that_stood():
    check = DeferredCheck()
    assert check.noise_scale() == 0.0
    for d in (50.0, -3.0, 80.0, -4.0):  # progress (d > 0) is not noise
        check.history.append(d)
    assert check.noise_scale() == 0.0  # fewer than MIN_HISTORY losses
    check.history.extend([-5.0] * (MIN_HISTORY - 2))
    assert check.noise_scale() == pytest.approx(1.4826 * 4.0 if MIN_HISTORY == 3 else
                                                1.4826 * 5.0)
    sigma = check.noise_scale()
    check.arm(Reference(None, 0.0, value=0.0, se=0.1, spread=1.0, scale=1.0))
    n = len(check.history)
    assert check.judge(-1.0 - 3 * sigma + 0.01, 0.1, tolerance=1.0)  # within tol + 3σ̂: stands
    assert len(check.history) == n + 1
    sigma = check.noise_scale()
    check.arm(Reference(None, 0.0, value=0.0, se=0.1, spread=1.0, scale=1.0))  # the next step
    assert not check.judge(-1.0 - 3 * sigma - 0.5, 0.1, tolerance=1.0)
    assert len(check.history) == n + 1  # an undone step does not enter the noise scale
    assert not check.judge(-math.inf, 0.1, tolerance=1.0)


def test_an_undone_step_teaches_the_noise_scale():
    """Regression: with minibatch noise far above the Monte-Carlo standard error, losses that
    stood never came (every one was undone) and the noise scale stayed 0 — 104 of 300 steps
    undone in test_minibatch_log_joint_with_a_new_batch_per_call. The estimate at the restored
    q against the reference estimate at the same q is a pure noise sample."""
    check = DeferredCheck()
    check.arm(Reference(None, 0.0, value=-100.0, se=0.1, spread=1.0, scale=1.0))
    assert not check.judge(-150.0, 0.1, tolerance=1.0)  # a minibatch-noise "loss": undone
    ref = check.undo()
    assert ref.value == -100.0 and check.reference is None
    assert check.judge(-130.0, 0.1, tolerance=1.0)  # estimate at the restored q
    assert list(check.history) == [-30.0]


def test_natural_gradient_svi_takes_the_deferred_rule():
    """NaturalGradientSVI(step_rule=...) reaches its Fitter; the deferred rule runs the model
    once per step (the minibatch BNN setting of examples/pyro_bnn.py), the default twice."""
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist

    from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI

    y = torch.linspace(-1.0, 3.0, 40, dtype=F64)
    calls = {"n": 0}

    def model(y, batch):
        calls["n"] += 1
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
        with pyro.plate("data", y.shape[0], subsample_size=batch) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])

    runs = {}
    for rule in (None, DEFERRED):
        pyro.clear_param_store()
        svi = NaturalGradientSVI(model, AutoStructuredNormal(model), step_rule=rule,
                                 generator=seeded(), lr=0.5, mean_cg_iters=0)
        svi.step(y, 10)  # set-up
        assert svi.fitter.step_rule == (rule or StepRule())
        calls["n"] = 0
        for _ in range(20):
            svi.step(y, 10)
        runs[rule is None] = calls["n"]
    assert runs[False] == 20 < runs[True]
    with pytest.raises(TypeError, match="step_rule must be a structvi.fit.StepRule or None"):
        NaturalGradientSVI(model, AutoStructuredNormal(model), step_rule="deferred")


def test_a_judged_step_is_not_judged_again():
    """Regression: a step that stood kept its reference; when the next proposal then failed
    (no new reference armed), the step after compared against the old reference and could undo
    a step that had already stood."""
    check = DeferredCheck()
    check.arm(Reference(None, 0.0, value=-10.0, se=0.1, spread=1.0, scale=1.0))
    assert check.judge(-9.0, 0.1, tolerance=1.0)
    assert check.reference is None
    assert check.judge(-1e9, 0.1, tolerance=1.0)  # nothing pending: nothing to undo
