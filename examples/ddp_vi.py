"""Data-parallel Bayesian logistic regression: the data sharded over ranks, one shared ``q``.

    torchrun --nproc_per_node=2 examples/ddp_vi.py --structure dense --steps 200
    torchrun --nproc_per_node=2 examples/ddp_vi.py --pyro            # NaturalGradientSVI
    torchrun --nproc_per_node=2 examples/ddp_vi.py --checkpoint vi.pt
    python examples/ddp_vi.py --resume vi.pt --steps 300             # resume in 1 process

Model: scikit-learn's breast-cancer data (standardized, a bias column, ``d = 31``), prior
``w ~ N(0, I)``, ``y_i ~ Bernoulli(sigmoid(x_iᵀ w))``. Rank ``r`` holds rows ``shard_r`` only
and evaluates the full-data estimate ``(N/n_r) Σ_{i∈shard_r} log p(y_i | w) + log p(w)``;
:class:`structvi.distributed.DataParallelVI` with ``weight = n_r/N`` combines the ranks'
estimator statistics (one all-reduce per step) into those of the full log-joint, so every rank
holds the same ``q`` — the one a single process fits on all rows with the same seed. With
``--pyro`` the same model runs through Pyro, each rank's ``pyro.plate`` subsampling its shard.
Gloo on the CPU, NCCL when every local rank has a GPU; rank 0 writes the checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logistic_regression import load_data, make_log_joint  # noqa: E402

from structvi.distributed import DataParallelVI, init_from_env  # noqa: E402
from structvi.fit import Fitter  # noqa: E402
from structvi.gaussian import StructuredGaussian  # noqa: E402
from structvi.structures import make_structure  # noqa: E402

OPTIONS = {"low_rank_diagonal": {"rank": 4}, "block_diagonal": {"block_size": 8}}


def shard_log_joint(X: torch.Tensor, y: torch.Tensor, N: int):
    """This rank's full-data estimate ``(N/n_r)·log-likelihood(shard) + log-prior``."""
    lik = make_log_joint(X, y, prior_precision=0.0)
    return lambda W: (N / len(y)) * lik(W) - 0.5 * W.square().sum(-1)


def run_fit(args, X, y, rows, N) -> None:
    dim = X.shape[1]
    q = StructuredGaussian(torch.zeros(dim, dtype=X.dtype, device=X.device),
                           make_structure(args.structure, dim, dtype=X.dtype, device=X.device,
                                          **OPTIONS.get(args.structure, {})))
    group = DataParallelVI(weight=len(rows) / N) if dist.is_initialized() else False
    fitter = Fitter(shard_log_joint(X[rows], y[rows], N), q,
                    generator=torch.Generator(X.device).manual_seed(args.seed),
                    process_group=group)
    if args.resume:
        fitter.load_state_dict(torch.load(args.resume, map_location=X.device, weights_only=True))
    result = fitter.run(max(args.steps - fitter.iteration, 1), progress=False, early_stopping=None)
    if is_rank0():
        print(f"{args.structure}: {fitter.iteration} steps, ELBO {result.history['elbo'][-1]:.4f}"
              f", |mean| {float(result.q.loc.norm()):.4f}", flush=True)
    if args.checkpoint:
        save(args.checkpoint, result.state)


def run_pyro(args, X, y, rows, N) -> None:
    import pyro
    import pyro.distributions as pdist

    from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI

    def model(X, y, index=None):
        w = pyro.sample("w", pdist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0)
                        .to_event(1))
        with pyro.plate("data", N, subsample=index) as i:
            pyro.sample("y", pdist.Bernoulli(logits=X[i] @ w), obs=y[i])

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()  # a guide of the same name would reuse stored parameters
    guide = AutoStructuredNormal(model, structure=args.structure,
                                 **OPTIONS.get(args.structure, {}))
    group = DataParallelVI(weight=len(rows) / N) if dist.is_initialized() else False
    svi = NaturalGradientSVI(model, guide, lr=0.5, num_samples=16,
                             generator=torch.Generator().manual_seed(args.seed),
                             process_group=group)
    if args.resume:
        svi.load_state_dict(torch.load(args.resume, weights_only=True))
    index = torch.as_tensor(rows) if dist.is_initialized() else None
    for _ in range(args.steps):
        loss = svi.step(X, y, index)
    if is_rank0():
        mean_norm = float(guide.loc.detach().norm())
        print(f"pyro {args.structure}: loss {loss:.4f}, |mean| {mean_norm:.4f}",
              flush=True)
    if args.checkpoint:
        save(args.checkpoint, svi.state_dict())


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save(path: str, state: dict) -> None:
    """Rank 0 writes atomically; the others wait for it."""
    if is_rank0():
        torch.save(state, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    if dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="dense",
                        choices=["dense", "diagonal", "low_rank_diagonal", "block_diagonal"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pyro", action="store_true", help="NaturalGradientSVI on a Pyro model")
    parser.add_argument("--timeout", type=float, default=60.0, help="collective timeout (s)")
    parser.add_argument("--checkpoint", help="rank 0 writes the final state here")
    parser.add_argument("--resume", help="start from this state (any number of ranks)")
    args = parser.parse_args(argv)

    device = init_from_env(args.timeout)
    if args.pyro:
        device = torch.device("cpu")  # the Pyro example stays on the CPU
    X, y = (t.to(device) for t in load_data())
    N = len(y)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rows = torch.arange(N).tensor_split(world)[rank].tolist()
    (run_pyro if args.pyro else run_fit)(args, X, y, rows, N)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
