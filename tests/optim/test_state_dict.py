"""``state_dict``: tensors and numbers, ``weights_only`` loads, dtypes kept, lock-step resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

from structvi.optim import StructuredNGD
from tests.optim.helpers import batches, mlp, seq_loss

KW = dict(lr=0.05, T=3, lr_cov=0.1, weight_decay=1e-2)


def _net_with_norm(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 6)).to(dtype)


def _roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _step(net: nn.Module, opt: StructuredNGD, batch: tuple[Tensor, Tensor]) -> None:
    opt.zero_grad()
    seq_loss(net, *batch).backward()
    opt.step()


def _assert_same_state(a: StructuredNGD, b: StructuredNGD) -> None:
    for p, q in zip((p for g in a.param_groups for p in g["params"]),
                    (q for g in b.param_groups for q in g["params"])):
        assert a.state[p].keys() == b.state[q].keys()
        for key, value in a.state[p].items():
            other = b.state[q][key]
            if isinstance(value, Tensor):
                assert value.dtype == other.dtype, key
                assert torch.equal(value, other), key
            else:
                assert value == other, key


def _plain(value) -> bool:
    """Containers of strings, numbers and dtypes (param groups) around tensors."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (Tensor, int, float, str, bool, torch.dtype))


@pytest.mark.parametrize("options", [
    dict(structures=("dense", "diagonal")),
    dict(structures=({"name": "hierarchical", "k1": 2, "k2": 2}, "lower_triangular")),
    dict(structures="dense", kfac_like=True, lr_cov=lambda step: 0.1 / (1 + step)),
], ids=["dense-diagonal", "hierarchical-lower_triangular", "ikfac-scheduled"])
def test_lock_step_round_trip(options):
    net = _net_with_norm(torch.float64)
    opt = StructuredNGD(net, **{**KW, **options})
    data = batches((4, 3, 5), 6, 12)
    for batch in data[:7]:  # mid-period: the next update of the factors is at step 9
        _step(net, opt, batch)
    saved = opt.state_dict()
    assert _plain(saved)
    assert all(isinstance(v, Tensor) for st in saved["state"].values() for v in st.values())
    loaded = _roundtrip(saved)
    snapshot = copy.deepcopy(loaded)
    net2 = copy.deepcopy(net)
    opt2 = StructuredNGD(net2, **{**KW, **options})
    opt2.load_state_dict(loaded)
    _assert_same_state(opt, opt2)
    for batch in data[7:]:
        _step(net, opt, batch)
        _step(net2, opt2, batch)
        _assert_same_state(opt, opt2)
        for p, q in zip(net.parameters(), net2.parameters()):
            assert torch.equal(p, q)
    torch.testing.assert_close(loaded["state"], snapshot["state"], rtol=0, atol=0)


def test_fp32_factors_of_bf16_parameters_stay_fp32_on_load():
    net = _net_with_norm(torch.bfloat16)
    kw = dict(KW, preconditioner_dtype=(torch.float32, torch.float32),
              momentum_dtype=torch.float32)
    opt = StructuredNGD(net, **kw)
    data = batches((4, 3, 5), 6, 8, dtype=torch.bfloat16)
    for batch in data[:4]:
        _step(net, opt, batch)
    K = opt.preconditioner(net[0]).K.to_dense()
    assert K.dtype == torch.float32 and not torch.equal(K, K.to(torch.bfloat16).float())
    net2 = copy.deepcopy(net)
    opt2 = StructuredNGD(net2, **kw)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    _assert_same_state(opt, opt2)  # dtype and value of every tensor, fp32 bits included
    for batch in data[4:]:
        _step(net, opt, batch)
        _step(net2, opt2, batch)
    _assert_same_state(opt, opt2)


def test_loaded_callable_lr_cov_is_the_loading_optimizers():
    net = mlp()
    opt = StructuredNGD(net, lr_cov=lambda step: 0.01)
    saved = _roundtrip(opt.state_dict())
    schedule = lambda step: 0.02  # noqa: E731
    opt2 = StructuredNGD(copy.deepcopy(net), lr_cov=schedule)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr_cov"] is schedule
