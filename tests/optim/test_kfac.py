"""Kronecker statistics (MATH §3.4) and the IKFAC identities (MATH §3.6, §7 items 4 and 9).

KFAC exactness: for deep linear networks and a summed squared error, the statistics that the
optimizer's hooks record (with ``K = C = I``) satisfy ``Ḡ ⊗ Ā = Jᵀ J`` (the exact GGN block of
the layer, ``J`` the Jacobian of all outputs w.r.t. ``[W | b]``) — KFAC-expand when the loss is
over every shared position, KFAC-reduce when the shared positions are summed before the loss.
The GGN is recovered from the empirical statistics by one backward pass per output coordinate.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from structvi.optim import StructuredNGD
from tests.optim.helpers import SINGD_RULES, mlp

DT = torch.float64


def _linear_net(bias: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Linear(5, 3, bias=bias)).to(DT)


def _conv_net(bias: bool, padding_mode: str = "zeros") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2, bias=bias,
                                   padding_mode=padding_mode),
                         nn.Conv2d(3, 2, 1, bias=bias)).to(DT)


NETS = {
    "linear_shared": (_linear_net, (3, 4, 4)),
    "conv": (_conv_net, (3, 2, 6, 6)),
    "conv_circular": (lambda bias: _conv_net(bias, "circular"), (3, 2, 6, 6)),
    "conv_same": (lambda bias: nn.Sequential(nn.Conv2d(2, 3, (3, 2), padding="same", bias=bias),
                                             nn.Conv2d(3, 2, 1, bias=bias)).to(DT), (3, 2, 5, 5)),
}


def _output(net: nn.Module, x: Tensor, approx: str) -> Tensor:
    return _setting(net(x), approx)


def _setting(out: Tensor, approx: str) -> Tensor:
    """Expand setting: every position is a loss term; reduce: positions summed first."""
    if approx == "expand":
        return out
    return out.sum(1) if out.dim() == 3 else out.sum((2, 3))


def _exact_ggn(net: nn.Module, layer: nn.Module, x: Tensor, approx: str) -> Tensor:
    names = {p: n for n, p in net.named_parameters()}
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])

    def f(*ps):
        out = functional_call(net, {names[p]: q for p, q in zip(params, ps)}, (x,))
        return _setting(out, approx).reshape(-1)

    jac = jacrev(f, argnums=tuple(range(len(params))))(*params)
    rows = [jac[0].flatten(2)] + ([jac[1][..., None]] if len(params) == 2 else [])
    J = torch.cat(rows, dim=2).flatten(1)  # row-major [W | b]
    return J.T @ J


def _kfac(net: nn.Module, layer: nn.Module, x: Tensor, approx: str) -> Tensor:
    opt = StructuredNGD(net, structures="dense", kfac_approx=approx, loss_average=None)
    out = _output(net, x, approx)
    channels = out.shape[1] if out.dim() == 4 else out.shape[-1]
    for c in range(channels):  # one backward per output coordinate: Σ ggᵀ = Jᵀ J
        (out[:, c] if out.dim() == 4 else out[..., c]).sum().backward(retain_graph=True)
    H_K, H_C = opt.statistics(layer)
    opt.close()
    return torch.kron(H_C.to_dense(), H_K.to_dense())


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("which", [0, 1], ids=["first_layer", "last_layer"])
@pytest.mark.parametrize("arch", list(NETS))
def test_kfac_is_exact_for_deep_linear_networks(arch, which, bias, approx):
    make, shape = NETS[arch]
    net = make(bias)
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=DT)
    layer = net[which]
    torch.testing.assert_close(_kfac(net, layer, x, approx), _exact_ggn(net, layer, x, approx),
                               rtol=1e-10, atol=1e-12)


def test_kfac_expand_is_not_exact_in_the_reduce_setting():
    """The comparison above can fail: expand statistics in the reduce setting differ."""
    torch.manual_seed(1)
    net, x = _linear_net(True), torch.randn(3, 4, 4, dtype=DT)
    opt = StructuredNGD(net, structures="dense", kfac_approx="expand", loss_average=None)
    out = _output(net, x, "reduce")
    for c in range(out.shape[-1]):
        out[..., c].sum().backward(retain_graph=True)
    H_K, H_C = opt.statistics(net[0])
    kfac = torch.kron(H_C.to_dense(), H_K.to_dense())
    assert (kfac - _exact_ggn(net, net[0], x, "reduce")).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- IKFAC
DAMPING = 0.1


def _ikfac(net: nn.Module, lr_cov: float) -> StructuredNGD:
    return StructuredNGD(net, lr=0.0, momentum=0.0, damping=DAMPING, alpha1=0.0, T=1,
                         lr_cov=lr_cov, structures="dense", kfac_like=True, **SINGD_RULES)


def _backward(net: nn.Module, x: Tensor, y: Tensor) -> None:
    nn.functional.cross_entropy(net(x), y).backward()


def _set_factor(opt: StructuredNGD, layer: nn.Module, key: str, value: Tensor) -> None:
    opt.state[layer.weight][f"{key}.matrix"] = value.clone()  # dense storage (state.py)


def test_ikfac_fixed_point_does_not_move():
    """``K Kᵀ = (Ā + λI)⁻¹`` and ``C Cᵀ = (Ḡ + λI)⁻¹`` ⇒ ``ν = 0``: K and C unchanged."""
    torch.manual_seed(0)
    net = mlp(5, 6, 4)
    x, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 4, (16,))
    probe = _ikfac(net, lr_cov=0.5)  # statistics with K = C = I: Ā and Ḡ
    _backward(net, x, y)
    stats = {layer: probe.statistics(layer) for layer in (net[0], net[2])}
    probe.close()
    opt = _ikfac(net, lr_cov=0.5)
    targets = {}
    for layer in (net[0], net[2]):
        for key, H in zip(("K", "C"), stats[layer]):
            L = torch.linalg.cholesky(H.to_dense() + DAMPING * torch.eye(H.dim, dtype=DT))
            targets[layer, key] = torch.linalg.inv(L).T  # Kᵀ (H + λI) K = I
            _set_factor(opt, layer, key, targets[layer, key])
    net.zero_grad()
    _backward(net, x, y)
    opt.step()
    for (layer, key), K in targets.items():
        factors = opt.preconditioner(layer)
        torch.testing.assert_close(getattr(factors, key).to_dense(), K, rtol=1e-10, atol=1e-12)


def _ema_error(lr_cov: float) -> float:
    """‖(K₁K₁ᵀ)⁻¹ − [(1−β)(K₀K₀ᵀ)⁻¹ + β(Ā + λI)]‖ for one IKFAC step from ``K₀ = I``."""
    torch.manual_seed(0)
    net = mlp(5, 6, 4)
    x, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 4, (16,))
    opt = _ikfac(net, lr_cov)
    _backward(net, x, y)
    A = opt.statistics(net[0])[0].to_dense()
    opt.step()
    K = opt.preconditioner(net[0]).K.to_dense()
    eye = torch.eye(A.shape[0], dtype=DT)
    ema = (1 - lr_cov) * eye + lr_cov * (A + DAMPING * eye)
    return (torch.linalg.inv(K @ K.T) - ema).abs().max().item()


def test_ikfac_is_kfac_ema_to_first_order():
    """MATH §3.6: the error is O(β₁²): 10× smaller β₁ ⇒ about 100× smaller error."""
    ratio = _ema_error(1e-2) / _ema_error(1e-3)
    assert 50 < ratio < 200
