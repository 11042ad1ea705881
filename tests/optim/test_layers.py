"""Which parameters get which rule; hooks (in-place activations, repeated calls, close)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD
from tests.optim.helpers import batches, copies, mlp, seq_loss

DT = torch.float64
KW = dict(lr=0.05, lr_cov=0.1, T=1, weight_decay=1e-2, momentum=0.8, beta2=0.99, eps=1e-6,
          diagonal_lr_ratio=1.0)


class _Tagger(nn.Module):
    """Embedding + LayerNorm + Linear + MultiheadAttention: every kind of parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 4)

    def forward(self, tokens):
        h = self.norm(self.emb(tokens))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h).mean(1)


def _train_tagger(net, opt, steps=4):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, 11, (5, 3), generator=gen)
        y = torch.randint(0, 4, (5,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(tokens), y).backward()
        opt.step()


def test_other_parameters_follow_adamw():
    """Norms and embeddings: the diagonal rule, AdamW(betas=(momentum, beta2)); the attention
    projections are preconditioned (tests/optim/test_attention.py)."""
    torch.manual_seed(0)
    net = _Tagger().to(DT)
    ours, ref = copies(net)
    opt = StructuredNGD(ours, **KW)
    layers = (ours.head, ours.attn, ours.attn.out_proj)
    assert {m for m in layers if opt.preconditioner(m)} == set(layers)
    with pytest.raises(ValueError, match="no preconditioner"):
        opt.preconditioner(ours.norm)
    others = [p for n, p in ref.named_parameters() if n.startswith(("emb", "norm"))]
    adamw = torch.optim.AdamW(others, lr=KW["lr"], betas=(KW["momentum"], KW["beta2"]),
                              eps=KW["eps"], weight_decay=KW["weight_decay"])
    kronecker = [p for n, p in ref.named_parameters() if n.startswith(("head", "attn"))]
    ref_head = StructuredNGD(ref, kronecker, **KW)
    _train_tagger(ours, opt)
    _train_tagger(ref, _Both(adamw, ref_head))
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
        assert not torch.equal(p, dict(net.named_parameters())[name]), f"{name} was not trained"


class _Both:
    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


def test_bias_without_its_weight_follows_the_diagonal_rule():
    net = mlp()
    net[0].weight.requires_grad_(False)
    opt = StructuredNGD(net, **KW)
    with pytest.raises(ValueError, match="no preconditioner"):
        opt.preconditioner(net[0])
    assert opt.preconditioner(net[2]).K.dim == 8  # weight 7 columns + bias
    before = net[0].bias.clone()
    x, y = batches((4, 3, 5), 6, 1)[0]
    seq_loss(net, x, y).backward()
    opt.step()
    assert not torch.equal(before, net[0].bias) and "exp_avg" in opt.state[net[0].bias]


def test_in_place_activations_give_the_same_training():
    torch.manual_seed(0)
    make = lambda inplace: nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=inplace),  # noqa: E731
                                         nn.Linear(7, 6)).to(DT)
    a, b = make(False), make(True)
    b.load_state_dict(a.state_dict())
    for net in (a, b):
        opt = StructuredNGD(net, **KW)
        for x, y in batches((4, 3, 5), 6, 4):
            opt.zero_grad()
            seq_loss(net, x, y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


class _TwoCalls(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):  # x: (B, 2, d) → the layer applied to each position separately
        return torch.stack([self.layer(x[:, 0]), self.layer(x[:, 1])], 1)


def test_a_layer_called_twice_equals_one_call_on_both_positions():
    """Loss terms are counted once per forward pass (not once per call)."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).to(DT)
    once, twice = nn.Sequential(copy.deepcopy(layer)), _TwoCalls(copy.deepcopy(layer))
    stats = []
    for net in (once, twice):
        opt = StructuredNGD(net, structures="dense")
        x, y = batches((3, 2, 5), 4, 1)[0]
        nn.functional.cross_entropy(net(x).mean(1), y).backward()
        stats.append(opt.statistics(net[0] if net is once else net.layer))
    for a, b in zip(*stats):
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-12, atol=1e-14)


def test_close_removes_every_hook_and_hooks_do_not_keep_the_optimizer_alive():
    net = mlp()
    opt = StructuredNGD(net, **KW)
    assert net._forward_pre_hooks and net[0]._forward_hooks
    opt.close()
    assert not net._forward_pre_hooks and not net[0]._forward_hooks and not net[2]._forward_hooks
    x, y = batches((4, 3, 5), 6, 1)[0]
    seq_loss(net, x, y).backward()
    assert opt.statistics(net[0]) is None
    ref = weakref.ref(StructuredNGD(net, **KW))
    gc.collect()
    assert ref() is None
    seq_loss(net, x, y).backward()  # hooks of a collected optimizer are inert


def test_a_copied_model_gets_inert_hooks():
    net = mlp()
    opt = StructuredNGD(net, **KW)
    clone = copy.deepcopy(net)
    x, y = batches((4, 3, 5), 6, 1)[0]
    seq_loss(clone, x, y).backward()
    assert opt.statistics(net[0]) is None
