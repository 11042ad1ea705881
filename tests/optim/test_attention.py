"""``nn.MultiheadAttention``: in_proj and out_proj are Kronecker layers (optim/attention.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structvi.optim import StructuredNGD

DT = torch.float64
E, HEADS = 8, 2


class _ManualAttention(nn.Module):
    """The computation of ``nn.MultiheadAttention`` (self-attention) with two ``nn.Linear``."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        bias = mha.in_proj_bias is not None
        self.in_proj = nn.Linear(E, 3 * E, bias=bias, dtype=DT)
        self.out_proj = nn.Linear(E, E, bias=bias, dtype=DT)
        self.batch_first = mha.batch_first
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                self.in_proj.bias.copy_(mha.in_proj_bias)
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, x):
        x = x if self.batch_first else x.transpose(0, 1)  # (B, L, E)
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2)
                   for t in self.in_proj(x).chunk(3, dim=-1))
        h = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = self.out_proj(h)
        return out if self.batch_first else out.transpose(0, 1)


class _Wrap(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def _train(net, opt, batch_first: bool, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 5, E, generator=gen, dtype=DT)
        x = x if batch_first else x.transpose(0, 1)
        opt.zero_grad()
        net(x).sin().mean().backward()
        opt.step()


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_self_attention_matches_two_linear_layers(approx, batch_first, bias):
    """The optimizer treats MHA exactly like the same computation written with nn.Linear."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first, dtype=DT)
    ours, ref = _Wrap(mha), _ManualAttention(mha)
    kw = dict(T=1, lr=1e-2, kfac_approx=approx, loss_average="batch+sequence")
    opt_ours, opt_ref = StructuredNGD(ours, **kw), StructuredNGD(ref, **kw)
    _train(ours, opt_ours, batch_first)
    _train(ref, opt_ref, batch_first)
    pairs = [(mha.in_proj_weight, ref.in_proj.weight), (mha.out_proj.weight, ref.out_proj.weight)]
    if bias:
        pairs += [(mha.in_proj_bias, ref.in_proj.bias), (mha.out_proj.bias, ref.out_proj.bias)]
    for p, q in pairs:
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    for module, other in ((mha, ref.in_proj), (mha.out_proj, ref.out_proj)):
        for ours_f, ref_f in zip(opt_ours.preconditioner(module), opt_ref.preconditioner(other)):
            torch.testing.assert_close(ours_f.to_dense(), ref_f.to_dense(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp64", "bf16_autocast"])
def test_cross_attention_blocks_have_their_own_rows(autocast):
    """Different query/key/value inputs: H_C of in_proj is block diagonal (each block's rows
    carry gradients only in its own rows of the weight), and K, C are updated."""
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else DT
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True, dtype=dtype)
    opt = StructuredNGD(mha, T=1)
    q, k, v = (torch.randn(3, n, E, dtype=dtype) for n in (5, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = mha(q, k, v)[0]
    out.float().square().mean().backward()
    H_K, H_C = opt.statistics(mha)
    assert (H_K.dim, H_C.dim) == (E + 1, 3 * E)
    dense = H_C.to_dense()
    for i in range(3):
        for j in range(3):
            block = dense[i * E:(i + 1) * E, j * E:(j + 1) * E]
            assert (block.abs().max() > 0) == (i == j), (i, j)
    opt.step()
    K, C = opt.preconditioner(mha)[:2]
    eye = torch.eye(3 * E, dtype=dtype)
    assert not torch.allclose(C.to_dense(), eye)
    assert opt.statistics(mha.out_proj) is None  # consumed by the step


def test_separate_qkv_weights_stay_diagonal_and_are_reported():
    mha = nn.MultiheadAttention(E, HEADS, kdim=5, vdim=3, batch_first=True)
    opt = StructuredNGD(mha)
    rules = {line.split()[0]: line for line in opt.describe().splitlines()[1:]}
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert "diagonal" in rules[name] and "kdim/vdim" in rules[name]
    assert "kronecker" in rules["out_proj.weight"]
    with pytest.raises(ValueError, match="no preconditioner"):
        opt.preconditioner(mha)
    q, k, v = torch.randn(2, 4, E), torch.randn(2, 6, 5), torch.randn(2, 6, 3)
    mha(q, k, v)[0].square().mean().backward()
    assert opt.statistics(mha.out_proj) is not None
    opt.step()


def test_attention_projections_are_preconditioned():
    """Regression: in_proj_weight and the functionally called out_proj got the diagonal rule."""
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    opt = StructuredNGD(mha)
    x = torch.randn(2, 5, E)
    mha(x, x, x)[0].square().mean().backward()
    for module in (mha, mha.out_proj):
        assert opt.statistics(module) is not None
    opt.step()
    assert "exp_avg" not in opt.state[mha.in_proj_weight]  # not the AdamW-style rule


def _bf16_run(bf16: bool):
    torch.manual_seed(0)
    emb, mha = nn.Embedding(6, E), nn.MultiheadAttention(E, HEADS, batch_first=True)
    net = nn.Sequential(emb, _Wrap(mha), nn.Flatten(), nn.Linear(5 * E, 3))
    opt = StructuredNGD(net, T=1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 6, (32, 5), generator=gen), torch.randint(0, 3, (32,), generator=gen)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert opt.statistics(mha) is None  # recorded and consumed (no "no statistics" warning)
    return losses, opt.preconditioner(mha)


def test_bf16_autocast_attention_follows_fp32():
    """Under bf16 autocast the attention statistics are recorded (autocast copies the weights)
    and the run follows the fp32 one (measured: final losses within 1 %)."""
    fp32, _ = _bf16_run(False)
    bf16, factors = _bf16_run(True)
    assert bf16[-1] < 0.6 * bf16[0]
    assert abs(bf16[-1] - fp32[-1]) < 0.05 * fp32[-1]
    assert factors.C.dtype == torch.float32
