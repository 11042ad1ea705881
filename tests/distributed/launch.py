"""Spawn ``nprocs`` CPU processes in a gloo process group and collect what each returns."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: str,
           backend: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, nprocs: int = 2, backend: str = "gloo"
              ) -> list[Any]:
    """``[fn(rank, nprocs, *args) for each rank]``, run in ``nprocs`` spawned processes."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(nprocs, free_port(), fn, args, out, backend), nprocs=nprocs,
                 join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
                for r in range(nprocs)]
