"""NCCL: the same equivalences on GPUs (one rank per GPU; skipped without CUDA).

With one GPU the group has one rank (NCCL needs a GPU per rank): that still runs the NCCL code
paths (DDP communication hook, statistics bucket, work-spreading broadcast, VI reduction on the
GPU); with two or more, two ranks with unequal shards are compared with one process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from structvi.distributed import DataParallelVI
from structvi.fit import Fitter
from structvi.gaussian import StructuredGaussian
from structvi.optim import StructuredNGD
from structvi.structures import make_structure
from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SPLIT = 11  # rank 0's rows of 32 with two ranks


def _rows(rank, world, x):
    return x if rank is None or world == 1 else (x[:SPLIT] if rank == 0 else x[SPLIT:])


def _optimizer(rank, world, spread):
    device = torch.device("cuda", 0 if rank is None else rank)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double().to(device)
    net = model if rank is None else nn.parallel.DistributedDataParallel(model)
    opt = StructuredNGD(net, T=2, lr=0.05, lr_cov=0.05)
    if rank is not None:
        opt.reducer.spread_work = spread
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(32, 8, generator=gen, dtype=torch.float64).to(device)
        y = torch.randint(0, 3, (32,), generator=gen).to(device)
        opt.zero_grad()
        nn.functional.cross_entropy(net(_rows(rank, world, x)), _rows(rank, world, y)).backward()
        opt.step()
    if rank is not None:
        opt.reducer.check_consistency(opt)
    return torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()


def _vi(rank, world):
    device = torch.device("cuda", 0 if rank is None else rank)
    X = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = _rows(rank, world, X).to(device)
    share = 1.0 if rank is None else X.shape[0] / 40

    def log_joint(W):  # full-data estimate from this shard; prior N(1, I): a non-zero mean
        return -0.01 * (W @ X.T).square().sum(1) / share - 0.5 * (W - 1).square().sum(1)

    q = StructuredGaussian(torch.zeros(5, dtype=torch.float64, device=device),
                           make_structure("dense", 5, dtype=torch.float64, device=device))
    group = False if rank is None else DataParallelVI(weight=share)
    fitter = Fitter(log_joint, q, generator=torch.Generator(device).manual_seed(2),
                    process_group=group)
    fitter.run(10, progress=False, early_stopping=None)
    return fitter.q.loc.cpu()


def _all(rank, world):
    return {"plain": _optimizer(rank, world, False), "spread": _optimizer(rank, world, True),
            "vi": _vi(rank, world)}


def test_nccl_matches_one_process():
    world = min(2, torch.cuda.device_count())
    got = run_ranks(_all, nprocs=world, backend="nccl")
    want = _all(None, 1)
    for key, value in want.items():
        for rank in range(world):
            err = float((got[rank][key] - value).abs().max() / value.abs().max())
            assert err < 1e-10, f"{key} rank {rank}: relative error {err:.1e}"
