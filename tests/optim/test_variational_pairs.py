"""``VariationalNGD(antithetic="steps")``: training draws paired across steps.

* the second draw of a pair is ``μ' − ρN`` around the current mean with the first draw's noise
  product ``N = C E Kᵀ`` (layers) or ``−ε`` (diagonal-rule parameters), for every structure;
* it takes no random numbers; a factor update (or factors replaced from outside) in between
  starts a new pair, and prediction draws do not touch the pairs;
* the kept noise is state: a ``state_dict`` round trip continues the pairs in lock-step;
* the first draw of a pair is the ordinary draw.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from structvi.optim import VariationalNGD
from structvi.optim._sampling import PAIRED
from tests.optim.helpers import OPTIMIZER_STRUCTURES, spec
from tests.optim.test_variational_train import KW, _roundtrip, classifier, data, train


def _noise(model: nn.Module, opt: VariationalNGD) -> list[torch.Tensor]:
    """Every trained parameter's draw minus its mean (inside ``sampled_params``)."""
    return [p.detach() - opt._means[p] for p in model.parameters()]


def _step_with_noise(model, opt, X, y, gen=None) -> list[torch.Tensor]:
    opt.zero_grad()
    with opt.sampled_params(train=True, generator=gen):
        noise = _noise(model, opt)
        nn.functional.cross_entropy(model(X).float(), y).backward()
    opt.step()
    return noise


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("structure", OPTIMIZER_STRUCTURES)
def test_second_draw_of_a_pair_is_the_negated_noise_around_the_new_mean(structure, dtype):
    X, y = data(dtype=dtype)
    model = classifier(dtype)  # Linear layers (Kronecker) and a LayerNorm (diagonal rule)
    opt = VariationalNGD(model, data_size=48, lr=0.05, T=10**6, lr_cov=0.1,
                         structures=spec(structure), antithetic="steps")
    gen = torch.Generator().manual_seed(0)
    first = _step_with_noise(model, opt, X, y, gen)  # the factor update of step 0 follows
    second = _step_with_noise(model, opt, X, y, gen)  # new factors: a new pair starts
    assert not any(torch.allclose(a, -b) for a, b in zip(first, second))
    rng = gen.get_state()
    third = _step_with_noise(model, opt, X, y, gen)
    assert torch.equal(gen.get_state(), rng)  # no random numbers for a pair's second draw
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    # the Linear layers (parameters 0, 1, 4, 5): the negated product around the new mean
    for a, b in zip(second[:2] + second[4:], third[:2] + third[4:]):
        assert torch.allclose(b, -a, rtol=tol, atol=tol)
    # the LayerNorm (diagonal rule): −ε scaled by the *current* posterior std
    state = opt.state[model[1].weight]
    assert PAIRED not in state and (third[2] * second[2] < 0).all()
    fourth = _step_with_noise(model, opt, X, y, gen)
    assert not torch.equal(gen.get_state(), rng)  # a new pair: new random numbers
    assert not torch.allclose(fourth[0], -third[0])


def test_first_draw_of_a_pair_is_the_ordinary_draw():
    X, y = data()
    model = classifier()
    opt = VariationalNGD(model, **KW)
    train(model, opt, X, y, 3, torch.Generator().manual_seed(0))  # factors away from I
    twin_model, twin = copy.deepcopy((model, opt))
    twin.antithetic = "steps"
    drawn = []
    for m, o in ((model, opt), (twin_model, twin)):
        with o.sampled_params(train=True, generator=torch.Generator().manual_seed(5)):
            drawn.append(_noise(m, o))
    assert PAIRED in twin.state[twin_model[0].weight]
    for a, b in zip(*drawn):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def _a_pair_started():
    """A model and optimizer after the step-0 factor update and one draw that starts a pair
    (``T`` large: no factor update after): ``(model, opt, X, y, gen, that draw's noise)``."""
    X, y = data()
    model = classifier()
    opt = VariationalNGD(model, antithetic="steps", data_size=48, lr=0.05, T=10**6)
    gen = torch.Generator().manual_seed(0)
    _step_with_noise(model, opt, X, y, gen)
    return model, opt, X, y, gen, _step_with_noise(model, opt, X, y, gen)


def test_prediction_draws_leave_the_pairs_alone():
    model, opt, X, y, gen, kept = _a_pair_started()
    with torch.no_grad(), opt.sampled_params(generator=gen):  # a prediction draw in between
        model(X)
    partner = _step_with_noise(model, opt, X, y, gen)
    assert torch.allclose(partner[0], -kept[0], rtol=1e-12, atol=1e-14)


def test_factors_replaced_from_outside_start_a_new_pair():
    model, opt, X, y, gen, kept = _a_pair_started()
    state = opt.state[model[0].weight]
    state["K.matrix"] = state["K.matrix"] * 1.5  # a new factor tensor: the kept product is stale
    after = _step_with_noise(model, opt, X, y, gen)
    assert not torch.allclose(after[0], -kept[0])


def test_state_dict_round_trip_continues_the_pairs_in_lock_step():
    X, y = data()
    model = classifier()
    opt = VariationalNGD(model, prior_precision=3.0, antithetic="steps", **KW)
    gen = torch.Generator().manual_seed(0)
    train(model, opt, X, y, 2, gen)  # T = 2: the factors change after the first draw, so the
    assert PAIRED in opt.state[model[0].weight]  # second starts a pair and its noise is kept
    saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    gen_state = gen.get_state()
    train(model, opt, X, y, 3, gen)

    other = classifier(seed=9)
    other.load_state_dict(saved_model)
    other_opt = VariationalNGD(other, antithetic="steps", **KW)
    other_opt.load_state_dict(saved_opt)
    train(other, other_opt, X, y, 3, torch.Generator().set_state(gen_state))
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


@pytest.mark.lowprec
def test_bf16_pairs_draw_around_the_float32_master():
    X, y = data(dtype=torch.bfloat16)
    model = classifier(torch.bfloat16)
    opt = VariationalNGD(model, antithetic="steps", data_size=48, lr=0.05, T=10**6)
    gen = torch.Generator().manual_seed(0)
    _step_with_noise(model, opt, X, y, gen)
    kept = opt.state[model[0].weight]
    _step_with_noise(model, opt, X, y, gen)
    noise = kept[PAIRED].clone()
    rho = VariationalNGD.rho(opt.param_groups[0])
    opt.zero_grad()
    with opt.sampled_params(train=True, generator=gen):
        drawn = model[0].weight.detach().clone()
    master = opt.state[model[0].weight]["mean"]
    expected = (master - rho * noise[:, :-1]).to(torch.bfloat16)
    assert torch.equal(drawn, expected)


def test_antithetic_is_checked():
    with pytest.raises(ValueError, match="antithetic must be True, False or 'steps'.*'step'"):
        VariationalNGD(classifier(), data_size=10, antithetic="step")
