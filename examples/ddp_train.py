"""Data-parallel training of the digits CNN with ``StructuredNGD`` and ``DistributedDataParallel``.

    torchrun --nproc_per_node=2 examples/ddp_train.py --epochs 5
    torchrun --nproc_per_node=2 examples/ddp_train.py --checkpoint ckpt.pt   # save every epoch
    python examples/ddp_train.py --resume ckpt.pt                            # resume, 1 process

Each global batch of 64 images is split over the ranks (``tensor_split``: unequal shards are
fine); the optimizer all-reduces its Kronecker statistics in one bucket per update step and DDP
the gradients, so every rank holds the same weights and factors as one process on the whole batch.
Gloo on the CPU, NCCL when every local rank has a GPU. A rank that raises ends the job:
``torchrun`` stops the others, and the process-group ``--timeout`` bounds any collective that
waits for a dead rank. Checkpoints are written by rank 0 only and load on any number of ranks.
``--fail-rank R --fail-step S`` makes rank ``R`` raise at step ``S`` (to try the fault path).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import STRUCTURES, digits, small_cnn  # noqa: E402

from structvi.distributed import init_from_env  # noqa: E402
from structvi.optim import StructuredNGD  # noqa: E402


def save_checkpoint(path: str, model: nn.Module, opt: StructuredNGD, epoch: int) -> None:
    """Rank 0 writes (atomically); the others wait so nobody reads a half-written file."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = f"{path}.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch}, tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> float:
    """Train; return the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", choices=sorted(STRUCTURES), default="dense")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--no-spread-work", action="store_true",
                        help="every rank updates every layer's factors (default: each layer's "
                             "update on one rank, then broadcast)")
    parser.add_argument("--timeout", type=float, default=60.0, help="collective timeout (s)")
    parser.add_argument("--checkpoint", help="write a checkpoint here after every epoch")
    parser.add_argument("--resume", help="start from this checkpoint")
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=-1)
    args = parser.parse_args(argv)

    device = init_from_env(args.timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(0)  # same start everywhere (DDP also broadcasts rank 0's weights)
    X, y, X_test, y_test = (t.to(device) for t in digits())
    model = small_cnn().to(device)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = StructuredNGD(net, lr=args.lr, T=5, lr_cov=0.05, damping=1e-2,
                        structures=STRUCTURES[args.structure])
    if args.no_spread_work and world > 1:
        opt.reducer.spread_work = False
    start = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"]
    step, accuracy = 0, float("nan")
    for epoch in range(start, args.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for batch in order.to(device).split(args.batch_size):
            mine = batch.tensor_split(world)[rank]  # this rank's shard of the global batch
            if rank == args.fail_rank and step == args.fail_step:
                raise RuntimeError(f"rank {rank}: injected failure at step {step}")
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(X[mine]), y[mine])
            loss.backward()
            opt.step()
            step += 1
        with torch.no_grad():
            accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1:2d}  loss {loss.item():.4f}  test accuracy {accuracy:.4f}"
                  f"  ({world} process{'es' if world > 1 else ''}, {device.type})", flush=True)
        if args.checkpoint:
            save_checkpoint(args.checkpoint, model, opt, epoch + 1)
    opt.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    main()
