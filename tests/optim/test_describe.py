"""``StructuredNGD.describe()``, the construction summary and ``diagnostics()``."""

from __future__ import annotations

import logging

import torch
from torch import nn

from structvi.optim import StructuredNGD
from structvi.optim.describe import rules


class _Everything(nn.Module):
    """Every layer kind: Linear, Conv2d, BatchNorm, Embedding, LayerNorm, attention (packed and
    with separate q/k/v weights), a Linear with a frozen weight, a bias-free Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
        self.frozen = nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)
        self.nobias = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(tokens))
        h = h + self.attn(h, h, h)[0]
        feats = self.bn(self.conv(image)).flatten(2).transpose(1, 2)  # (B, 16, 4)
        h = h + self.cross(h, feats, feats)[0]
        return self.head(self.nobias(self.frozen(h))).mean(1)


def _rules_by_name(opt):
    return {r["name"]: r for r in rules(opt)}


def test_describe_lists_every_parameter_with_its_rule():
    net = _Everything()
    opt = StructuredNGD(net, structures=("dense", "diagonal"))
    by_name = _rules_by_name(opt)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert set(by_name) == trained
    kronecker = {
        "conv.weight": ("conv", "dense(10)", "diagonal(4)"),
        "conv.bias": ("conv", "dense(10)", "diagonal(4)"),
        "attn.in_proj_weight": ("attn.in_proj", "dense(9)", "diagonal(24)"),
        "attn.in_proj_bias": ("attn.in_proj", "dense(9)", "diagonal(24)"),
        "attn.out_proj.weight": ("attn.out_proj", "dense(9)", "diagonal(8)"),
        "attn.out_proj.bias": ("attn.out_proj", "dense(9)", "diagonal(8)"),
        "cross.out_proj.weight": ("cross.out_proj", "dense(9)", "diagonal(8)"),
        "cross.out_proj.bias": ("cross.out_proj", "dense(9)", "diagonal(8)"),
        "nobias.weight": ("nobias", "dense(8)", "diagonal(8)"),
        "head.weight": ("head", "dense(9)", "diagonal(3)"),
        "head.bias": ("head", "dense(9)", "diagonal(3)"),
    }
    for name, (layer, K, C) in kronecker.items():
        r = by_name[name]
        assert (r["rule"], r["layer"], r["K"], r["C"]) == ("kronecker", layer, K, C), name
    diagonal = trained - set(kronecker)
    assert diagonal == {"emb.weight", "bn.weight", "bn.bias", "norm.weight", "norm.bias",
                        "cross.in_proj_bias", "cross.q_proj_weight", "cross.k_proj_weight",
                        "cross.v_proj_weight", "frozen.bias"}
    for name in diagonal:
        assert by_name[name]["rule"] == "diagonal"
        assert by_name[name]["lr"] == opt.param_groups[0]["lr"] / 3
    assert "not trained" in by_name["frozen.bias"]["note"]
    assert "kdim/vdim" in by_name["cross.q_proj_weight"]["note"]
    assert "kdim/vdim" in by_name["cross.in_proj_bias"]["note"]
    text = opt.describe()
    assert text.splitlines()[0].startswith("StructuredNGD: Kronecker rule on 6 layer(s)")
    for name in trained:
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
    net(torch.randint(0, 10, (2, 5)), torch.randn(2, 1, 4, 4)).sum().backward()
    opt.step()  # every layer kind trains together


def test_construction_logs_the_rule_counts_once(caplog):
    net = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2, bias=False))
    with caplog.at_level(logging.INFO, logger="structvi.optim"):
        opt = StructuredNGD(net)
        opt.step()
    messages = [r.getMessage() for r in caplog.records if r.name == "structvi.optim"]
    assert messages == [
        "StructuredNGD: Kronecker rule on 2 layer(s), 3 tensor(s), 35 parameters; diagonal "
        "(AdamW-style) rule on 2 tensor(s), 10 parameters (opt.describe() lists them)"
    ]


def test_diagnostics_tell_a_moving_preconditioner_from_a_frozen_one():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(256, 6, generator=gen) * torch.tensor([3.0, 1.0, 1.0, 0.3, 0.1, 1.0])
    y = (X @ torch.randn(6, 3, generator=gen)).argmax(1)
    reports = {}
    for lr_cov in (0.0, 0.1):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = StructuredNGD(net, lr_cov=lr_cov, T=1)
        for idx in torch.arange(256).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()
        reports[lr_cov] = opt.diagnostics()
    for name in ("0", "2"):
        frozen, moving = reports[0.0][name], reports[0.1][name]
        assert frozen["K_deviation"] == frozen["C_deviation"] == 0.0
        assert abs(frozen["cosine"] - 1.0) < 1e-12
        assert min(moving["K_deviation"], moving["C_deviation"]) > 0.05
        assert moving["cosine"] < 0.99
        assert moving["step"] == 8
