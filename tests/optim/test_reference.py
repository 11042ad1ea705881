"""StructuredNGD against an independent dense float64 implementation of MATH (3.2)–(3.3).

The reference keeps dense ``K, C, m_K, m_C``, forms ``Ā = aᵀa/n`` and ``Ḡ = n_loss gᵀg`` from
the layers' recorded inputs and output gradients, and uses the structure only for ``Π̂`` (its
``project``, which the structures' conformance suite checks against dense oracles).
"""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

from structvi.optim import StructuredNGD
from structvi.structures import make_structure
from tests.optim.helpers import (
    OPTIMIZER_STRUCTURES,
    SINGD_RULES,
    batches,
    capture,
    cnn,
    copies,
    mlp,
    seq_loss,
    spec,
)

HP = dict(lr=0.1, momentum=0.9, damping=0.1, alpha1=0.5, weight_decay=1e-2, lr_cov=0.1,
          **SINGD_RULES)
STEPS = 8
TOL = dict(rtol=1e-10, atol=1e-12)


def _rows_input(x: Tensor, layer: nn.Module, approx: str, bias: bool) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        g = layer.groups
        x = x.unflatten(1, (g, -1)).mean(1)
        p = nn.functional.unfold(x, layer.kernel_size, dilation=layer.dilation,
                                 padding=layer.padding, stride=layer.stride)  # (B, D, L)
        a = p.transpose(1, 2).reshape(-1, p.shape[1]) if approx == "expand" else p.mean(2)
    else:
        a = x.reshape(-1, x.shape[-1]) if approx == "expand" else x.reshape(
            x.shape[0], -1, x.shape[-1]).mean(1)
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if bias else a


def _rows_grad(g: Tensor, approx: str) -> Tensor:
    g = g.flatten(2).transpose(1, 2) if g.dim() == 4 else g.reshape(g.shape[0], -1, g.shape[-1])
    return g.reshape(-1, g.shape[-1]) if approx == "expand" else g.sum(1)


def _h(M: Tensor, retraction: str) -> Tensor:
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    if retraction == "expm":  # scipy: torch.linalg.matrix_exp is off by ~1e-11 at small ‖M‖
        return torch.from_numpy(scipy.linalg.expm(M.detach().numpy())).to(M.dtype)
    return eye + M + (0.5 * M @ M if retraction == "quadratic" else 0.0)


class DenseReference:
    """Dense MATH (3.2)–(3.3) for a list of layers (weights and biases updated in place)."""

    def __init__(self, layers, structures, *, T, approx, bias, retraction="quadratic",
                 kfac_like=False, normalize_lr_cov=False, trust_region=1.0):
        self.layers, self.structures, self.T, self.approx, self.bias = (
            layers, structures, T, approx, bias)
        self.retraction, self.kfac_like, self.normalize = retraction, kfac_like, normalize_lr_cov
        self.trust_region = trust_region
        self.state = []
        for layer in layers:
            d_K, d_C = layer.weight[0].numel() + int(bias), layer.weight.shape[0]
            z = lambda d: torch.zeros(d, d, dtype=torch.float64)  # noqa: E731
            self.state.append(dict(K=torch.eye(d_K, dtype=torch.float64), C=torch.eye(
                d_C, dtype=torch.float64), m_K=z(d_K), m_C=z(d_C), m_W=torch.zeros(d_C, d_K,
                                                                                  dtype=torch.float64)))

    def _proj(self, which: int, Y: Tensor) -> Tensor:
        s = self.structures[which]
        s = dict(s) if isinstance(s, dict) else {"name": s}
        name = s.pop("name")
        S = make_structure(name, Y.shape[0], dtype=torch.float64, **s)
        return S.project(0.5 * (Y + Y.T)).to_dense()

    def _nu(self, which: int, F: Tensor, H_other: Tensor, hat: Tensor, hat_other: Tensor):
        d, d_o = F.shape[0], H_other.shape[0]
        eye = self._proj(which, torch.eye(d, dtype=torch.float64))
        if self.kfac_like:
            return F + HP["damping"] * hat - eye
        return (H_other.trace() / d_o) * F + HP["damping"] * (hat_other.trace() / d_o) * hat - eye

    def _update_factors(self, st: dict, a: Tensor, g: Tensor, n_loss: int) -> None:
        K, C = st["K"], st["C"]
        A, G = a.T @ a / a.shape[0], n_loss * g.T @ g
        H_K, H_C = self._proj(0, K.T @ A @ K), self._proj(1, C.T @ G @ C)
        K_hat, C_hat = self._proj(0, K.T @ K), self._proj(1, C.T @ C)
        alpha = 0.0 if self.kfac_like else HP["alpha1"]
        half = 0.5 * ((1 - alpha) if self.normalize else 1.0)
        for key, F, H_o, hat, hat_o, which in (("K", H_K, H_C, K_hat, C_hat, 0),
                                                ("C", H_C, H_K, C_hat, K_hat, 1)):
            m = alpha * st["m_" + key] + half * self._nu(which, F, H_o, hat, hat_o)
            beta = HP["lr_cov"] / (max(1.0, m.abs().max().item()) if self.normalize else 1.0)
            if self.trust_region is not None:  # β_eff = min(β, c/‖m‖_∞), max absolute row sum
                beta = min(beta, self.trust_region / m.abs().sum(1).max().item())
            st["m_" + key], st[key] = m, st[key] @ _h(-beta * m, self.retraction)

    @torch.no_grad()
    def step(self, t: int, records: list[dict]) -> None:
        for layer, st, rec in zip(self.layers, self.state, records):
            if t % self.T == 0:
                a = _rows_input(rec["x"], layer, self.approx, self.bias)
                g = _rows_grad(rec["out"].grad, self.approx)
                self._update_factors(st, a, g, rec["x"].shape[0])
            W = layer.weight.flatten(1)
            G = layer.weight.grad.flatten(1)
            if self.bias:
                W, G = torch.cat([W, layer.bias[:, None]], 1), torch.cat(
                    [G, layer.bias.grad[:, None]], 1)
            nat = st["C"] @ st["C"].T @ G @ st["K"] @ st["K"].T + HP["weight_decay"] * W
            st["m_W"] = HP["momentum"] * st["m_W"] + nat
            W = W - HP["lr"] * st["m_W"]
            layer.weight.copy_(W[:, : W.shape[1] - int(self.bias)].reshape(layer.weight.shape))
            if self.bias:
                layer.bias.copy_(W[:, -1])


def _layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net if isinstance(m, (nn.Linear, nn.Conv2d))]


def _run_both(net, data, structures, *, T, approx, bias, **options):
    ours, ref = copies(net)
    opt = StructuredNGD(ours, structures=structures, T=T, kfac_approx=approx, **HP, **options)
    reference = DenseReference(_layers(ref), structures, T=T, approx=approx, bias=bias, **options)
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        seq_loss(ours, x, y).backward()
        opt.step()
        ref.zero_grad()
        with capture(_layers(ref)) as records:
            seq_loss(ref, x, y).backward()
        reference.step(t, records)
    return ours, ref, opt, reference


def _assert_match(ours, ref, opt, reference) -> None:
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    for layer, st in zip(_layers(ours), reference.state):
        factors = opt.preconditioner(layer)
        torch.testing.assert_close(factors.K.to_dense(), st["K"], **TOL)
        torch.testing.assert_close(factors.C.to_dense(), st["C"], **TOL)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("T", [1, 3], ids=lambda T: f"T={T}")
@pytest.mark.parametrize("name", OPTIMIZER_STRUCTURES)
def test_matches_dense_reference(name, T, bias, approx):
    net = mlp(bias=bias)
    data = batches((4, 3, 5), 6, STEPS)
    results = _run_both(net, data, (spec(name), spec(name)), T=T, approx=approx, bias=bias)
    assert not math.isclose(results[2].preconditioner(_layers(results[0])[0]).K.to_dense()[0, 0],
                            1.0), "K did not move: the test would not see a wrong update"
    _assert_match(*results)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("structures", [("dense", "diagonal"), ("diagonal", "dense")])
def test_conv_matches_dense_reference(structures, approx):
    data = batches((3, 4, 7, 7), 3, STEPS)
    _assert_match(*_run_both(cnn(), data, structures, T=2, approx=approx, bias=True))


@pytest.mark.parametrize("options", [
    dict(retraction="first_order", trust_region=None), dict(retraction="expm"),
    dict(kfac_like=True), dict(normalize_lr_cov=True), dict(trust_region=None),
    dict(trust_region=0.05),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", ["dense", "lower_triangular"])
def test_variants_match_dense_reference(name, options):
    data = batches((4, 3, 5), 6, STEPS)
    results = _run_both(mlp(), data, (name, name), T=2, approx="expand", bias=True, **options)
    _assert_match(*results)
