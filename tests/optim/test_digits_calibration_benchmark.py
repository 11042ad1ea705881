"""``benchmarks/digits_calibration.py``: its predictives against ``predict`` and closed forms,
the sampled-label step, a quick end-to-end run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("ivon")

from benchmarks import digits_calibration as dc  # noqa: E402
from structvi.optim import VariationalNGD, predict  # noqa: E402


def _trained(model: nn.Module, steps: int = 6) -> VariationalNGD:
    torch.manual_seed(0)
    opt = VariationalNGD(model, data_size=50, lr=0.05, temperature=1.0, prior_precision=1.0,
                         T=2)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    for _ in range(steps):
        dc.train_step(model, opt, x, y)
    return opt


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def test_shrunk_draws_at_one_are_predict_and_at_zero_the_mean_network():
    model = _mlp()
    opt = _trained(model)
    x = torch.randn(20, 5)
    before = [p.detach().clone() for p in model.parameters()]
    shrunk = dc.shrunk_predictive(model, opt, x, 6, seed=3, scales=(0.0, 0.5, 1.0))
    expected = predict(model, opt, x, samples=6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(shrunk[1.0], expected)
    torch.testing.assert_close(shrunk[0.0], predict(model, opt, x, samples=0))
    assert not torch.allclose(shrunk[0.5], shrunk[1.0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_linearized_predictive_is_exact_for_a_model_linear_in_its_weights():
    model = nn.Linear(5, 3)
    opt = _trained(model)
    x = torch.randn(20, 5)
    exact = dc.shrunk_predictive(model, opt, x, 5, seed=4, scales=(1.0,))[1.0]
    torch.testing.assert_close(dc.linearized_predictive(model, opt, x, 5, seed=4), exact,
                               atol=1e-6, rtol=1e-5)
    mlp = _mlp()  # and not the sampled network's average for a nonlinear one
    opt = _trained(mlp)
    assert not torch.allclose(dc.linearized_predictive(mlp, opt, x, 5, seed=4),
                              dc.shrunk_predictive(mlp, opt, x, 5, seed=4, scales=(1.0,))[1.0],
                              atol=1e-6)


def _one_step(step, take_step: bool):
    """One step of ``step`` (the draw seeded alike) on a fresh MLP: ``(model, optimizer,
    collection switches before)``; without ``take_step`` the draw's gradient is kept."""
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    model = _mlp()
    torch.manual_seed(0)
    opt = VariationalNGD(model, data_size=50, lr=0.05, T=1)
    switches = dict(opt._collecting)
    if not take_step:
        opt.step = lambda: None
    torch.manual_seed(7)
    step(model, opt, x, y)
    return model, opt, switches


def test_sampled_label_step_keeps_the_gradient_and_changes_the_statistics():
    (m_emp, opt_emp, _), (m_smp, opt_smp, switches) = (
        _one_step(step, take_step=False) for step in (dc.train_step, dc.sampled_label_step))
    assert any(switches.values())  # step 0 collects, and the switches are restored
    assert opt_smp._collecting == switches
    for a, b in zip(m_emp.parameters(), m_smp.parameters()):
        torch.testing.assert_close(a.grad, b.grad)  # the gradient of the true labels
    covariances = [_one_step(step, take_step=True) for step in (dc.train_step,
                                                                dc.sampled_label_step)]
    assert not torch.allclose(*(opt.posterior_covariance(model[2])
                                for model, opt, _ in covariances))


def test_quick_run_writes_the_three_probes(tmp_path):
    out = tmp_path / "digits_calibration.json"
    result = dc.main(["--quick", "--out", str(out)])
    text = out.with_suffix(".md").read_text()
    for heading in ("Damping", "Damping, IVON", "Curvature", "Predictive",
                    "Where the posterior sits"):
        assert heading in text
    assert {r["statistics"] for r in result["fisher"]} == {"empirical", "sampled labels"}
    assert {r["predictive"] for r in result["predictive"]} >= {"mean network",
                                                               "linearized, s = 1"}


def test_cap_fractions_against_the_dense_posterior_covariance():
    model = _mlp()
    torch.manual_seed(0)
    opt = VariationalNGD(model, data_size=50, lr=0.05, T=1, extra_damping=0.1)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    for _ in range(4):
        dc.train_step(model, opt, x, y)
    fractions = dc.cap_fractions(model, opt)
    assert set(fractions) == {"0", "2"}
    group = opt.param_groups[0]
    cap = opt.rho(group) ** 2 / (opt._damping(group) + 0.1)
    for name in ("0", "2"):
        variances = torch.linalg.eigvalsh(opt.posterior_covariance(model[int(name)]).double())
        ratio = variances / cap
        assert fractions[name]["median"] == pytest.approx(ratio.median().item(), rel=1e-4)
        assert fractions[name]["min"] == pytest.approx(ratio.min().item(), rel=1e-4)
        assert fractions[name]["below_half"] == pytest.approx((ratio < 0.5).double().mean()
                                                              .item())


def test_a_diverged_run_is_reported_not_raised():
    probs = torch.full((4, 3), float("nan"))
    row = dc._metrics(probs, torch.zeros(4, dtype=torch.long))
    assert row["nll"] == float("inf") and all(row[k] != row[k] for k in ("ece", "acc"))
    assert dc._cells(row) == "| diverged | | | | |"
