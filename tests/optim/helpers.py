"""Shared pieces of the optimizer tests: small nets, data, and layer-activation capture."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from structvi.structures import STRUCTURES

# Options that make every registered structure valid for dimensions >= 5.
STRUCTURE_OPTIONS = {
    "block_diagonal": {"block_size": 3},
    "low_rank_diagonal": {"rank": 2},
    "hierarchical": {"k1": 2, "k2": 2},
}
OPTIMIZER_STRUCTURES = sorted(n for n in STRUCTURES if n not in ("kronecker", "block_sites"))


# The INGD/SINGD update as published (absolute damping, unnormalized preconditioner, one lr for
# both rules): tests that compare with singd or a dense reference of those formulas pass these.
SINGD_RULES = dict(relative_damping=False, normalize_preconditioner=False, diagonal_lr_ratio=1.0)


def spec(name: str) -> dict:
    """``{"name": name, **test options}`` for the ``structures`` argument."""
    return {"name": name, **STRUCTURE_OPTIONS.get(name, {})}


def mlp(d_in: int = 5, hidden: int = 7, d_out: int = 6, *, bias: bool = True, seed: int = 0,
        dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(),
                         nn.Linear(hidden, d_out, bias=bias)).to(dtype)


def cnn(*, bias: bool = True, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Conv2d with stride, padding, dilation and groups, then a Linear (input 4×7×7)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=bias), nn.Tanh(),
        nn.Conv2d(6, 5, (3, 2), padding=(2, 1), dilation=2, bias=bias), nn.Tanh(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 3, bias=bias),
    ).to(dtype)


def batches(shape: tuple[int, ...], n_classes: int, steps: int, *, seed: int = 1,
            dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen, dtype=dtype),
             torch.randint(0, n_classes, shape[:1], generator=gen)) for _ in range(steps)]


def seq_loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of a net applied to ``(B, R, d)`` inputs, outputs averaged over ``R``."""
    out = net(x)
    return nn.functional.cross_entropy(out.mean(1) if out.dim() == 3 else out, y)


def train(net: nn.Module, opt: torch.optim.Optimizer, data, loss_fn: Callable = seq_loss) -> None:
    for x, y in data:
        opt.zero_grad()
        loss_fn(net, x, y).backward()
        opt.step()


def max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    return max(((p - q).abs().max() / p.abs().max()).item()
               for p, q in zip(a.parameters(), b.parameters()))


def copies(net: nn.Module, n: int = 2) -> list[nn.Module]:
    return [copy.deepcopy(net) for _ in range(n)]


@contextlib.contextmanager
def capture(modules: list[nn.Module]) -> Iterator[list[dict]]:
    """Record each module's input and output (whose ``.grad`` is kept after backward)."""
    records: list[dict] = [{} for _ in modules]

    def hook(record: dict, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        del module
        output.retain_grad()
        record.update(x=inputs[0].detach(), out=output)

    handles = [m.register_forward_hook(lambda m, i, o, r=r: hook(r, m, i, o))
               for m, r in zip(modules, records)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
