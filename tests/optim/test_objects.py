"""Object semantics of a torch optimizer: copies, pickling, hook lifetime, checked loading."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import re

import pytest
import torch
from torch import Tensor, nn

from structvi.optim import StructuredNGD
from tests.optim.helpers import batches, seq_loss

KW = dict(lr=0.05, T=3, lr_cov=0.1, weight_decay=1e-2)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 6)).double()


def _step(net: nn.Module, opt: StructuredNGD, batch: tuple[Tensor, Tensor]) -> None:
    opt.zero_grad()
    seq_loss(net, *batch).backward()
    opt.step()


def _hook_count(net: nn.Module) -> int:
    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    params = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
                 for p in net.parameters())
    return modules + params


def _state(opt: StructuredNGD) -> list[dict]:
    return [{k: v.clone() if isinstance(v, Tensor) else v for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"]]


def _same_state(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(
        torch.equal(x[k], y[k]) if isinstance(x[k], Tensor) else x[k] == y[k] for k in x)
        for x, y in zip(a, b))


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("duplicate", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
def test_copied_model_and_optimizer_train_in_lock_step(duplicate):
    """Before: the copy raised AttributeError: 'StructuredNGD' object has no attribute '_layers'."""
    net = _net()
    opt = StructuredNGD(net, **KW)
    data = batches((4, 3, 5), 6, 10)
    for batch in data[:4]:  # mid-period
        _step(net, opt, batch)
    net2, opt2 = duplicate((net, opt))
    assert all(p is q for p, q in zip(net2.parameters(),
                                      (p for g in opt2.param_groups for p in g["params"])))
    assert _hook_count(net2) == _hook_count(net)  # the copy's own hooks, no stale ones
    for batch in data[4:]:
        _step(net, opt, batch)
        _step(net2, opt2, batch)
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))
    assert _same_state(_state(opt), _state(opt2))
    assert opt2.preconditioner(net2[0]).K.to_dense().data_ptr() != \
        opt.preconditioner(net[0]).K.to_dense().data_ptr()


def test_a_deep_copied_optimizer_alone_steps_like_the_original():
    net = _net()
    opt = StructuredNGD(net, **KW)
    data = batches((4, 3, 5), 6, 3)
    for batch in data[:2]:
        _step(net, opt, batch)
    opt.zero_grad()
    seq_loss(net, *data[2]).backward()
    twin = copy.deepcopy(opt)  # bound to a private copy of the model
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p, q in zip(net.parameters(), twin_params):
        assert p is not q
        q.grad = p.grad.clone()  # (a Parameter's deepcopy has no grad)
    opt.step()
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin_params))


def test_hooks_are_released_when_the_optimizer_is_collected():
    """Before: 20 re-creations without close() left 40 live hooks on the model."""
    net = _net()
    alone = _hook_count(net)
    for _ in range(20):
        opt = StructuredNGD(net, **KW)
    per_optimizer = _hook_count(net) - alone
    assert per_optimizer == 1 + 2 + 4  # model pre-hook, 2 layer hooks, 4 grad hooks: one optimizer
    del opt
    gc.collect()
    assert _hook_count(net) == alone
    opt = StructuredNGD(net, **KW)
    assert _hook_count(net) - alone == per_optimizer
    opt.close()
    assert _hook_count(net) == alone


def _saved(opt: StructuredNGD) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _trained(net: nn.Module, **options) -> StructuredNGD:
    opt = StructuredNGD(net, **{**KW, **options})
    for batch in batches((4, 3, 5), 6, 2):
        _step(net, opt, batch)
    return opt


def _other_hidden_size(saved: dict) -> dict:
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 6)).double()
    return _saved(_trained(other))


def _reversed_order(saved: dict) -> dict:
    group = saved["param_groups"][0]
    return {**saved, "param_groups": [{**group, "params": group["params"][::-1]}]}


def _missing_tensor(saved: dict) -> dict:
    del saved["state"][0]["K.matrix"]
    return saved


@pytest.mark.parametrize("corrupt, message", [
    (_other_hidden_size, r"layer '0' \(weight \(7, 5\)\): tensor 'C.matrix' has shape \(4, 4\) "
                         r"in the saved state, expected \(7, 7\) \('dense' factor C of dim 7\)"),
    (_reversed_order, r"layer '0' \(weight \(7, 5\)\): the saved state holds the state of "
                      r"another parameter \(\{'momentum_buffer': \(6,\)\}\) .* another order"),
    (_missing_tensor, r"layer '0' \(weight \(7, 5\)\): the saved state has no tensor 'K.matrix' "
                      r"\('dense' factor K of dim 6\)"),
], ids=["shape", "order", "missing_tensor"])
def test_a_mismatched_state_dict_is_refused_and_changes_nothing(corrupt, message):
    """Before: accepted, then step() failed naming neither layer nor load (or KeyError)."""
    net = _net()
    opt = _trained(net)
    saved = corrupt(_saved(_trained(_net())))
    before, groups = _state(opt), copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=r"load_state_dict: the saved state does not fit this "
                                         r"optimizer; nothing was loaded:\n  " + message):
        opt.load_state_dict(saved)
    assert _same_state(before, _state(opt))
    assert [{k: v for k, v in g.items() if k != "params"} for g in groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    _step(net, opt, batches((4, 3, 5), 6, 1)[0])  # still works


def test_a_load_that_changes_structures_says_so():
    """Before: loading silently switched the optimizer to the saved structures."""
    saved = _saved(_trained(_net(), structures=("diagonal", "diagonal")))
    net = _net()
    opt = StructuredNGD(net, **KW)
    with pytest.warns(UserWarning, match=re.escape(
            "param group 0 switches structures from (dense, dense) to (diagonal, diagonal)")):
        opt.load_state_dict(saved)
    assert opt.preconditioner(net[0]).K.name == "diagonal"
    _step(net, opt, batches((4, 3, 5), 6, 1)[0])


def test_saved_structure_options_that_disagree_with_the_tensors_are_refused():
    saved = _saved(_trained(_net(), structures={"name": "hierarchical", "k1": 2, "k2": 2}))
    saved["param_groups"][0]["structures"] = ({"name": "hierarchical", "k1": 5, "k2": 5},) * 2
    opt = StructuredNGD(_net(), **KW)
    with pytest.raises(ValueError, match=re.escape(
            "layer '0' (weight (7, 5)): tensor 'K.A' has shape (2, 2) in the saved state, "
            "expected (5, 5) ('hierarchical' factor K of dim 6)")):
        opt.load_state_dict(saved)
