"""Data-parallel step time: 1 process vs 2 processes, and the share spent communicating.

Per structure, for the optimizer (``StructuredNGD`` on a DDP-wrapped model, with and without
work spreading) and for VI (``Fitter`` with a sharded log-joint): the same global batch / the
same data are processed (steps timed in interleaved rounds, every other round in reverse order,
the fastest round kept) by

* ``1 proc``: one process, everything;
* ``2 proc``: two ranks, half each, communicating (gloo on the CPU; NCCL with one GPU per rank);
* ``2 proc, no comm``: the same two ranks doing the same per-rank work without any collective.

``speed-up = t(1 proc) / t(2 proc)`` and ``comm share = 1 − t(no comm) / t(2 proc)`` (the time
the collectives add to a step, waiting included). On the shared 2-core CPU machine the absolute
times are noisy; compare the ratios within one run. Models: the digits CNN (batch 256) and an
MLP 64-256-256-10 (batch 256), ``T = 1`` (a factor update every step, the worst case for
communication); VI: Bayesian logistic regression with ``N = 20000`` synthetic rows, ``d = 64``.

Run: ``python -m benchmarks.ddp_scaling [--quick]`` → ``benchmarks/results/ddp_scaling.{json,md}``
(``--quick``: ``benchmarks/results/quick/``). With ≥ 2 GPUs the NCCL rows are added; with one
GPU they are skipped with a note (NCCL needs one GPU per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from structvi.optim import StructuredNGD
from structvi.optim.functional import LOCAL

OPT_STRUCTURES = {"dense": "dense", "diagonal": "diagonal",
                  "hierarchical": {"name": "hierarchical", "k1": 4, "k2": 4}}
VI_STRUCTURES = {"dense": {}, "diagonal": {}, "low_rank_diagonal": {"rank": 4}}
BATCH, N_VI, D_VI = 256, 20000, 64


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))


MODELS = {"CNN": _cnn, "MLP 64-256-256-10": _mlp}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, steps: int, device: torch.device, barrier: bool) -> float:
    """Seconds per step (ranks start together)."""
    _sync(device)
    if barrier:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _optimizer_step(model_name: str, structure: str, mode: str, rank: int, world: int,
                    device: torch.device):
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    comm = mode in ("ddp", "ddp+spread")
    net = nn.parallel.DistributedDataParallel(model) if comm else model
    opt = StructuredNGD(net, lr=0.01, T=1, lr_cov=0.05, damping=1e-2,
                        structures=OPT_STRUCTURES[structure])
    if mode == "local":
        opt.reducer = LOCAL
    elif comm:
        opt.reducer.spread_work = mode == "ddp+spread"
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH // world, 1, 8, 8, generator=gen).to(device)
    y = torch.randint(0, 10, (BATCH // world,), generator=gen).to(device)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def _vi_step(structure: str, comm: bool, rank: int, world: int, device: torch.device):
    from structvi.distributed import DataParallelVI
    from structvi.fit import Fitter
    from structvi.gaussian import StructuredGaussian
    from structvi.structures import make_structure

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N_VI, D_VI, generator=gen, dtype=torch.float64)
    y = (torch.rand(N_VI, generator=gen, dtype=torch.float64) < 0.5).double()
    rows = torch.arange(N_VI).tensor_split(world)[rank]
    X, y = X[rows].to(device), y[rows].to(device)
    scale = N_VI / len(rows)

    def log_joint(W: torch.Tensor) -> torch.Tensor:
        logits = W @ X.T
        lik = (y * logits - nn.functional.softplus(logits)).sum(-1)
        return scale * lik - 0.5 * W.square().sum(-1)

    q = StructuredGaussian(torch.zeros(D_VI, dtype=torch.float64, device=device),
                           make_structure(structure, D_VI, dtype=torch.float64, device=device,
                                          **VI_STRUCTURES[structure]))
    group = DataParallelVI(weight=len(rows) / N_VI) if comm else False
    fitter = Fitter(log_joint, q, generator=torch.Generator(device).manual_seed(1),
                    process_group=group)
    return lambda: fitter.step(monitor=False)


def _worker(rank: int, world: int, port: int, backend: str, steps: int, rounds: int,
            out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend, rank=rank, world_size=world)
    modes = ["ddp", "ddp+spread", "local"] if world > 1 else ["single"]
    cases = {}
    for model_name in MODELS:
        for structure in OPT_STRUCTURES:
            for mode in modes:
                cases[f"optim|{model_name}|{structure}|{mode}"] = _optimizer_step(
                    model_name, structure, mode, rank, world, device)
    for structure in VI_STRUCTURES:
        for comm in ([True, False] if world > 1 else [False]):
            mode = ("dp" if comm else "local") if world > 1 else "single"
            cases[f"vi|{structure}|{mode}"] = _vi_step(structure, comm, rank, world, device)
    for step in cases.values():  # warm-up
        for _ in range(2):
            step()
    times = {key: float("inf") for key in cases}
    keys = list(cases)
    for r in range(rounds):  # interleaved rounds, order reversed every other one; fastest counts
        for key in keys if r % 2 == 0 else keys[::-1]:
            times[key] = min(times[key], _time_steps(cases[key], steps, device, world > 1))
    if world > 1:  # a step is as slow as its slowest rank
        keys = sorted(times)
        t = torch.tensor([times[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = dict(zip(keys, t.tolist()))
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def _spawn(world: int, backend: str, steps: int, rounds: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(world, port, backend, steps, rounds, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def _rows(one: dict[str, float], two: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for key, t1 in one.items():
        kind, *name, _ = key.split("|")
        base = "|".join([kind, *name])
        variants = [("ddp", "2 proc"), ("ddp+spread", "2 proc + spreading")] if kind == "optim" \
            else [("dp", "2 proc")]
        local = two[f"{base}|local"]
        rows.append(dict(kind=kind, case=" / ".join(name), setting="1 proc", step_ms=1e3 * t1,
                         speedup=1.0, comm_share=0.0))
        for mode, label in variants:
            t2 = two[f"{base}|{mode}"]
            rows.append(dict(kind=kind, case=" / ".join(name), setting=label, step_ms=1e3 * t2,
                             speedup=t1 / t2, comm_share=max(0.0, 1 - local / t2)))
        rows.append(dict(kind=kind, case=" / ".join(name), setting="2 proc, no comm",
                         step_ms=1e3 * local, speedup=t1 / local, comm_share=0.0))
    return rows


def _markdown(sections: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for backend, rows in sections.items():
        lines += [f"## {backend}", "",
                  "| what | case | setting | step ms | speed-up vs 1 proc | comm share |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['kind']} | {r['case']} | {r['setting']} | {r['step_ms']:.2f} | "
                         f"{r['speedup']:.2f} | {100 * r['comm_share']:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--out", default=None,
                        help="directory (default benchmarks/results, quick: .../quick)")
    args = parser.parse_args(argv)
    steps, rounds = (5, 2) if args.quick else (8, 8)
    backends = ["gloo"]
    note = None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2:
        backends.append("nccl")
    elif gpus == 1:
        note = "NCCL skipped: 1 GPU visible and NCCL needs one GPU per rank"
        print(note)
    sections, raw = {}, {}
    for backend in backends:
        one, two = _spawn(1, backend, steps, rounds), _spawn(2, backend, steps, rounds)
        raw[backend] = {"1": one, "2": two}
        label = "gloo (CPU)" if backend == "gloo" else "NCCL (GPU)"
        sections[label] = _rows(one, two)
    result = dict(config=dict(quick=args.quick, timed_steps=steps, rounds=rounds, batch=BATCH,
                              vi_rows=N_VI,
                              vi_dim=D_VI, T=1, cpus=os.cpu_count(), gpus=gpus,
                              torch=torch.__version__, platform=platform.platform(), note=note),
                  results=sections, raw_seconds=raw)
    folder = Path(args.out) if args.out else Path("benchmarks/results") / ("quick" if args.quick
                                                                          else "")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ddp_scaling.json").write_text(json.dumps(result, indent=1))
    md = _markdown(sections) + (f"\n{note}\n" if note else "")
    (folder / "ddp_scaling.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
