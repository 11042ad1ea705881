"""Training runs shared by the spawned ranks and the single-process references.

Each ``*_run(rank, world, ...)`` trains on rank ``rank``'s shard when ``world > 1`` and on the
concatenated batch when ``rank is None``; it returns plain tensors to compare.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from typing import Any

import pyro
import pyro.distributions as pdist
import torch
from torch import Tensor, nn

from structvi.distributed import DataParallelVI
from structvi.fit import Fitter, fit
from structvi.gaussian import StructuredGaussian
from structvi.optim import StructuredNGD
from structvi.pyro import AutoStructuredNormal, NaturalGradientSVI
from structvi.structures import make_structure

STEPS = 20
BATCH = 16

# name -> (dtype, wrap in DDP, split of the batch (rank 0 gets split rows), work spreading,
#          loss_average, structures, micro-batches per step under no_sync)
OPTIMIZER_CASES: dict[str, tuple] = {
    "ddp-equal": (torch.float64, True, 8, False, "batch", "dense", 1),
    "ddp-unequal-spread": (torch.float64, True, 5, True, "batch", ("dense", "diagonal"), 1),
    "bare-equal-spread": (torch.float64, False, 8, True, "batch",
                          {"name": "block_diagonal", "block_size": 2}, 1),
    "bare-unequal": (torch.float64, False, 11, False, "batch", "dense", 1),
    "ddp-unequal-sumloss": (torch.float64, True, 5, False, None, "dense", 1),
    "ddp-nosync-unequal": (torch.float64, True, 6, False, "batch", "dense", 2),
    "ddp-equal-float32": (torch.float32, True, 8, False, "batch", "dense", 1),
    "bare-unequal-spread-float32": (torch.float32, False, 5, True, "batch", "dense", 1),
}
OPTIONS = dict(lr=0.05, T=2, lr_cov=0.05, damping=1e-3, momentum=0.5)


def cnn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 16, 6), nn.LayerNorm(6), nn.Tanh(),
                         nn.Linear(6, 4)).to(dtype)


def batches(dtype: torch.dtype, steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 1, 4, 4, generator=gen, dtype=dtype),
             torch.randint(0, 4, (BATCH,), generator=gen)) for _ in range(steps)]


def shard(rank: int | None, split: int, x: Tensor) -> Tensor:
    return x if rank is None else (x[:split] if rank == 0 else x[split:])


def _train(net: nn.Module, opt: StructuredNGD, data: list, rank: int | None, split: int,
           loss_average: str | None, micro: int) -> None:
    reduction = "sum" if loss_average is None else "mean"
    for x, y in data:
        x, y = shard(rank, split, x), shard(rank, split, y)
        opt.zero_grad()
        chunks = list(zip(x.tensor_split(micro), y.tensor_split(micro)))
        for i, (xc, yc) in enumerate(chunks):
            sync = i == len(chunks) - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
            with nullcontext() if sync else net.no_sync():
                loss = nn.functional.cross_entropy(net(xc), yc, reduction=reduction)
                if loss_average is not None:  # micro-batch mean → mini-batch mean
                    loss = loss * (len(yc) / len(y))
                loss.backward()
        opt.step()


def _snapshot(model: nn.Module, opt: StructuredNGD) -> dict[str, Tensor]:
    out = {f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for key, s in zip("KC", opt.preconditioner(module)[:2]):
                out[f"{key}.{name}"] = s.to_dense().clone()
    return out


def optimizer_run(rank: int | None, world: int, case: str) -> dict[str, Tensor]:
    dtype, wrap, split, spread, loss_average, structures, micro = OPTIMIZER_CASES[case]
    model = cnn(dtype)
    net = nn.parallel.DistributedDataParallel(model) if wrap and rank is not None else model
    opt = StructuredNGD(net, loss_average=loss_average, structures=structures, **OPTIONS)
    if rank is not None:
        opt.reducer.spread_work = spread
    _train(net, opt, batches(dtype), rank, split, loss_average, micro)
    if rank is not None:
        opt.reducer.check_consistency(opt)
    return _snapshot(model, opt)


def optimizer_checkpoint_run(rank: int | None, world: int, checkpoint: bytes | None = None
                             ) -> dict[str, Any]:
    """2 ranks: 10 steps, rank 0 saves, 10 more. 1 rank: load ``checkpoint``, the last 10."""
    data, split = batches(torch.float64), 5
    model = cnn(torch.float64)
    net = nn.parallel.DistributedDataParallel(model) if rank is not None else model
    opt = StructuredNGD(net, **OPTIONS)
    saved = None
    if rank is not None:
        _train(net, opt, data[:10], rank, split, "batch", 1)
        if rank == 0:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            saved = buffer.getvalue()
    else:
        state = torch.load(io.BytesIO(checkpoint), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    _train(net, opt, data[10:], rank, split, "batch", 1)
    return {"snapshot": _snapshot(model, opt), "checkpoint": saved}


# ---------------------------------------------------------------------------------- VI
N_DATA, DIM = 40, 4
# name -> (structure, estimator, rank-0 rows, weight convention)
VI_CASES = {
    "dense-stein-equal": ("dense", "stein", 20, "mean"),
    "diagonal-stein-unequal": ("diagonal", "stein", 13, "weighted"),
    "dense-hessian-sum": ("dense", "hessian", 9, "sum"),
    "low_rank-stein-sum": ("low_rank_diagonal", "stein", 25, "sum"),
}


def logistic_data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N_DATA, DIM, generator=gen, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    y = (torch.rand(N_DATA, generator=gen, dtype=torch.float64) < torch.sigmoid(X @ w)).double()
    return X, y


def _log_joint(X: Tensor, y: Tensor, lik_scale: float, prior_scale: float):
    def log_joint(Z: Tensor) -> Tensor:
        logits = Z @ X.T
        lik = -nn.functional.binary_cross_entropy_with_logits(
            logits, y.expand_as(logits), reduction="none").sum(1)
        return prior_scale * (-0.5 * Z.square().sum(1)) + lik_scale * lik
    return log_joint


def _vi_setup(rank: int | None, world: int, case: str):
    name, estimator, split, convention = VI_CASES[case]
    X, y = logistic_data()
    rows = slice(None) if rank is None else (slice(0, split) if rank == 0 else
                                             slice(split, None))
    n = X[rows].shape[0]
    if rank is None:
        log_joint, group = _log_joint(X, y, 1.0, 1.0), False
    elif convention == "sum":  # shards sum to the full log-joint: the prior split evenly
        log_joint, group = _log_joint(X[rows], y[rows], 1.0, 1.0 / world), DataParallelVI(
            weight=1.0)
    else:  # minibatch convention: each rank's full-data estimate
        weight = n / N_DATA if convention == "weighted" else None
        log_joint, group = _log_joint(X[rows], y[rows], N_DATA / n, 1.0), DataParallelVI(
            weight=weight)
    options = {"rank": 2} if name == "low_rank_diagonal" else {}
    q = StructuredGaussian(torch.zeros(DIM, dtype=torch.float64),
                           make_structure(name, DIM, dtype=torch.float64, **options))
    return dict(log_joint=log_joint, q=q, estimator=estimator,
                generator=torch.Generator().manual_seed(5), process_group=group)


def vi_run(rank: int | None, world: int, case: str) -> dict[str, Any]:
    """Through :func:`structvi.fit.fit`."""
    setup = _vi_setup(rank, world, case)
    log_joint, q = setup.pop("log_joint"), setup.pop("q")
    result = fit(log_joint, q, STEPS, progress=False, early_stopping=None, **setup)
    return {"loc": result.q.loc, "factor": result.q.factor.to_dense(),
            "elbo": torch.tensor(result.history["elbo"])}


def vi_checkpoint_run(rank: int | None, world: int, checkpoint: dict | None = None) -> dict:
    """2 ranks: 10 steps, rank 0 keeps the state, 10 more. 1 rank: load it, the last 10."""
    setup = _vi_setup(rank, world, "diagonal-stein-unequal")
    fitter = Fitter(setup.pop("log_joint"), setup.pop("q"), **setup)
    saved = None
    if rank is not None:
        fitter.run(10, progress=False, early_stopping=None)
        saved = fitter.state_dict() if rank == 0 else None
    else:
        fitter.load_state_dict(checkpoint)
    result = fitter.run(10, progress=False, early_stopping=None)
    return {"loc": result.q.loc, "factor": result.q.factor.to_dense(),
            "elbo": torch.tensor(result.history["elbo"][-10:]), "checkpoint": saved}


def pyro_model(X: Tensor, y: Tensor, index: Tensor | None) -> None:
    w = pyro.sample("w", pdist.Normal(torch.zeros(DIM, dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", N_DATA, subsample=index) as i:
        pyro.sample("y", pdist.Bernoulli(logits=X[i] @ w), obs=y[i])


def pyro_run(rank: int | None, world: int, structure: str) -> dict[str, Tensor]:
    X, y = logistic_data()
    index = None if rank is None else torch.arange(N_DATA).tensor_split(world)[rank]
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoStructuredNormal(pyro_model, structure=structure)
    svi = NaturalGradientSVI(pyro_model, guide, lr=0.5, num_samples=8,
                             generator=torch.Generator().manual_seed(3),
                             process_group=None if rank is not None else False)
    losses = torch.tensor([svi.step(X, y, index) for _ in range(STEPS)])
    return {"loc": guide.loc.detach().clone(), "factor": guide.factor.to_dense().detach(),
            "loss": losses}


def errors(rank: int, world: int) -> dict[str, str]:
    """Messages of the errors that data-parallel misuse raises (same on every rank)."""
    out = {}
    model = cnn(torch.float64)
    opt = StructuredNGD(model, **OPTIONS)
    opt.found_inf = torch.tensor(0.0)  # what a GradScaler sets before step()
    opt.grad_scale = torch.tensor(1.0)
    try:
        opt.step()
    except RuntimeError as err:
        out["bare_scaler"] = str(err)
    try:
        StructuredNGD(model, [{"params": list(model[0].parameters()), "loss_average": None},
                              {"params": list(model[3].parameters())}])
    except ValueError as err:
        out["loss_average"] = str(err)
    return out


def all_runs(rank: int, world: int) -> dict[str, Any]:
    """Everything the 2-process test group computes (one spawn for all checks)."""
    out: dict[str, Any] = {f"optim/{c}": optimizer_run(rank, world, c) for c in OPTIMIZER_CASES}
    out["errors"] = errors(rank, world)
    out["optim/checkpoint"] = optimizer_checkpoint_run(rank, world)
    out.update({f"vi/{c}": vi_run(rank, world, c) for c in VI_CASES})
    out["vi/checkpoint"] = vi_checkpoint_run(rank, world)
    for structure in ("dense", "diagonal"):
        out[f"pyro/{structure}"] = pyro_run(rank, world, structure)
    return out
