"""The Pyro step's fast paths equal the paths they replaced.

``AutoStructuredNormal.constrain`` unpacks through a layout built once per set-up (offsets,
transforms, site shapes per batch shape) instead of Pyro's ``_unpack_latent`` and a
``biject_to`` per call; ``guide.factor`` rebuilds the factor without re-validating its spec; the
log-joint leaves out the zero log-Jacobians of unconstrained sites. Each against the old path,
float64, bit for bit."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch.distributions import biject_to

from structvi.pyro import AutoStructuredNormal, latent_log_joint
from structvi.structures import structure_from_spec
from tests.pyro.test_guides import CASES

F64 = torch.float64


def _guide(case: str, structure="dense") -> tuple[AutoStructuredNormal, tuple]:
    model, args = CASES[case]
    pyro.clear_param_store()
    guide = AutoStructuredNormal(model, structure=structure)
    guide.setup(*args)
    return guide, args


def _pyro_constrain(guide, latent):
    """The former ``constrain``: Pyro's ``_unpack_latent`` and a ``biject_to`` per site."""
    values, ladj = {}, {}
    for site, u in guide._unpack_latent(latent):
        transform = biject_to(site["fn"].support)
        values[site["name"]] = transform(u)
        ladj[site["name"]] = transform.log_abs_det_jacobian(u, values[site["name"]])
    return values, ladj


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch", [(), (3,), (3, 1), (2, 1, 1)])
def test_constrain_equals_pyros_unpacking(case, batch, gen):
    guide, _ = _guide(case)
    latent = torch.randn(batch + (guide.latent_dim,), generator=gen, dtype=F64)
    try:
        want_values, want_ladj = _pyro_constrain(guide, latent)
    except RuntimeError:  # a batch shape clashing with a plate: both refuse it
        with pytest.raises(RuntimeError):
            guide.constrain(latent)
        return
    for _ in range(2):  # the second call uses the cached shapes of this batch shape
        values, ladj = guide.constrain(latent)
        assert list(values) == list(want_values) and list(ladj) == list(want_ladj)
        for name in want_values:
            assert values[name].shape == want_values[name].shape
            assert torch.equal(values[name], want_values[name])
            assert torch.equal(ladj[name], want_ladj[name])


def test_skip_zero_jacobians_drops_exactly_the_identity_sites(gen):
    guide, _ = _guide("constrained")
    latent = torch.randn(guide.latent_dim, generator=gen, dtype=F64)
    values, ladj = guide.constrain(latent, skip_zero_jacobians=True)
    full = guide.constrain(latent)[1]
    assert sorted(ladj) == ["frac", "probs", "scale"]  # "loc" is unconstrained
    assert not full["loc"].any()
    assert all(torch.equal(ladj[k], full[k]) for k in ladj)


def test_constrain_rejects_a_latent_of_the_wrong_size():
    guide, _ = _guide("constrained")
    with pytest.raises(ValueError, match=r"batch \+ \(6,\)"):
        guide.constrain(torch.zeros(5, dtype=F64))


@pytest.mark.parametrize("case", sorted(CASES))
def test_log_joint_equals_the_full_trace_log_prob(case, gen):
    """``latent_log_joint`` (without the zero log-Jacobians) = Pyro's ``log_prob_sum`` of the
    conditioned model plus every site's log-Jacobian, per row, one by one and under vmap."""
    guide, args = _guide(case)
    U = torch.randn(4, guide.latent_dim, generator=gen, dtype=F64)
    loop = latent_log_joint(CASES[case][0], guide, args, vectorize="loop")
    got = loop(U)
    sub = loop.subsample()
    for i, u in enumerate(U):
        values, ladj = _pyro_constrain(guide, u)
        fn = pyro.poutine.replay(pyro.poutine.condition(CASES[case][0], data=values), trace=sub)
        trace = pyro.poutine.trace(fn).get_trace(*args)
        want = trace.log_prob_sum() + sum(
            (v * trace.nodes[k]["scale"]).sum() for k, v in ladj.items())
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)
    vmap = latent_log_joint(CASES[case][0], guide, args, subsample=sub, vectorize="vmap")
    torch.testing.assert_close(vmap(U), got, rtol=1e-12, atol=1e-12)


def test_factor_property_equals_the_validated_rebuild_and_revalidates(gen):
    guide, _ = _guide("constrained", {"loc": "dense", "probs": "diagonal"})
    first, again = guide.factor, guide.factor  # the second is built without validation
    rebuilt = structure_from_spec(again.tensors(), guide.factor_spec())
    assert again.spec() == rebuilt.spec() == first.spec()
    assert torch.equal(again.to_dense(), rebuilt.to_dense())
    assert all(a is b for a, b in zip(again.tensors().values(), first.tensors().values()))
    attr = next(iter(guide._factor_attrs.values()))  # a parameter replaced by a wrong shape
    setattr(guide, attr, torch.nn.Parameter(torch.zeros(7, 7, dtype=F64)))
    with pytest.raises(ValueError, match="must have shape"):
        guide.factor  # noqa: B018 -- validated again


def test_log_prob_skips_instance_validation_only_while_pyro_validation_is_off():
    """A prior built with ``validate_args=True`` (as a ``PyroSample`` made at module
    construction) is not checked inside a step (Pyro's validation off), and keeps its flag."""
    import pyro.distributions as dist
    import pyro.poutine as poutine

    from structvi.pyro.log_joint import _trace_log_joint

    prior = dist.Normal(torch.zeros(2, dtype=F64), 1.0, validate_args=True).to_event(1)

    def model():
        pyro.sample("x", prior)

    bad = torch.tensor([float("nan"), 0.0], dtype=F64)  # outside Normal's support (NaN)
    trace = poutine.trace(poutine.condition(model, data={"x": bad})).get_trace()
    with pytest.raises(ValueError, match="support"):
        _trace_log_joint(trace, {}, None, None)
    with pyro.validation_enabled(False):
        assert torch.isnan(_trace_log_joint(trace, {}, None, None))
    assert prior._validate_args and prior.base_dist._validate_args
    ok = torch.tensor([0.5, -1.0], dtype=F64)
    trace = poutine.trace(poutine.condition(model, data={"x": ok})).get_trace()
    with pyro.validation_enabled(False):
        quiet = _trace_log_joint(trace, {}, None, None)
    assert quiet == _trace_log_joint(trace, {}, None, None) == prior.log_prob(ok)


def test_step_reads_the_guide_back_when_it_was_changed_between_steps():
    """NaturalGradientSVI reuses its fitter's state while the guide's parameters are untouched,
    and starts from the guide's values once they were changed in place (or replaced)."""
    from structvi.pyro import NaturalGradientSVI

    model, args = CASES["plated"]
    pyro.clear_param_store()
    guide = AutoStructuredNormal(model)
    svi = NaturalGradientSVI(model, guide, num_samples=4, lr=0.1,
                             generator=torch.Generator().manual_seed(0))
    svi.step(*args)
    seen = []
    step = svi.fitter.step

    def spy(*a, **k):
        seen.append(svi.fitter.state.loc.clone())
        return step(*a, **k)

    svi.fitter.step = spy
    before = svi.fitter.state.loc.clone()
    svi.step(*args)
    assert torch.equal(seen[-1], before)  # untouched guide: the fitter's own state
    with torch.no_grad():
        guide.loc.add_(1.0)
    moved = guide.loc.detach().clone()
    svi.step(*args)
    assert torch.equal(seen[-1], moved)  # changed in place: read back
