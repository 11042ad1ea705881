"""``block_sites`` (per-site structures composed block-diagonally): the structure conformance
suite runs on the block_sites cases of ``cases.py``; here: blockwise identities
with a Kronecker block (whose coordinates are not a sparsity pattern)."""

from __future__ import annotations

import pytest
import torch

from structvi.structures.block_sites import BlockSites, block_spec
from structvi.structures import make_structure, structure_from_spec
from structvi.testing import assert_close, state_roundtrip

F64 = torch.float64


def _kron_blocks(dtype=F64):
    kron = make_structure("kronecker", 6, dims=(2, 3), factors=("dense", "diagonal"), dtype=dtype)
    diag = make_structure("diagonal", 2, dtype=dtype)
    return kron, diag


def _randomize(s, gen, scale=0.3):
    return type(s)(s.dim, {k: t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
                           for k, t in s.tensors().items()}, **s.options)


def test_kronecker_block_ops_equal_the_blocks_own(gen):
    kron, diag = (_randomize(b, gen) for b in _kron_blocks())
    s = BlockSites.from_blocks([kron, diag])
    x = torch.randn(8, 3, generator=gen, dtype=F64)
    assert_close(s.matmul(x), torch.cat([kron.matmul(x[:6]), diag.matmul(x[6:])]), 1e-14, "K x")
    assert_close(s.to_dense(), torch.block_diag(kron.to_dense(), diag.to_dense()), 0.0, "dense")
    assert_close(s.logabsdet(), kron.logabsdet() + diag.logabsdet(), 1e-12, "logdet")
    P = s.project_outer(x)
    assert P.blocks[0].kind == "sum"
    assert_close(P.blocks[0].to_dense(), kron.project_outer(x[:6]).to_dense(), 1e-14, "Π̂ kron")
    step = P.scale(0.05)
    new = s.retract(step)
    expected = kron.retract(step.blocks[0]).to_dense()
    assert_close(new.blocks[0].to_dense(), expected, 1e-14, "retract")
    assert_close(new.blocks[1].to_dense(), diag.retract(step.blocks[1]).to_dense(), 1e-14, "diag")


def test_kronecker_block_state_roundtrip(gen):
    s = BlockSites.from_blocks([_randomize(b, gen) for b in _kron_blocks()])
    m = s.zeros_like()
    for x in (s, m):
        back = state_roundtrip(x)
        assert back.spec() == x.spec()
        assert_close(back.to_dense(), x.to_dense(), 0.0, "roundtrip")
    assert structure_from_spec(m.tensors(), m.spec()).blocks[0].kind == "sum"


def test_solve_is_the_inverse(gen):
    s = BlockSites.from_blocks([_randomize(b, gen) for b in _kron_blocks()])
    r = torch.randn(8, 2, generator=gen, dtype=F64)
    assert_close(s.matmul(s.solve(r)), r, 1e-12, "K K⁻¹ r")


def test_bad_options_name_the_problem():
    with pytest.raises(ValueError, match="add up to 5, expected dim=6"):
        make_structure("block_sites", 6, blocks=[block_spec("dense", 3), block_spec("dense", 2)])
    with pytest.raises(ValueError, match="non-empty list"):
        make_structure("block_sites", 3, blocks=[])
    with pytest.raises(ValueError, match="blocks\\[0\\] must be a mapping"):
        make_structure("block_sites", 3, blocks=["dense"])
    with pytest.raises(TypeError, match="exactly the option 'blocks'"):
        make_structure("block_sites", 3, rank=2)
    s = make_structure("block_sites", 3, blocks=[block_spec("dense", 3)], dtype=F64)
    with pytest.raises(ValueError, match="block sizes"):
        s.retract(make_structure("dense", 3, dtype=F64))
