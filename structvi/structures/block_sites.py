r"""``block_sites``: structures of different kinds composed block-diagonally.

.. math:: K = \begin{pmatrix} K_1 & & \\ & \ddots & \\ & & K_m \end{pmatrix}, \qquad
          \Sigma = \operatorname{blockdiag}(K_1 K_1^\top, \dots, K_m K_m^\top)

Each block ``K_i`` is any registered structure (e.g. ``kronecker`` for a weight matrix,
``diagonal`` for a bias), so the Pyro guide can give every latent site its own structure.
Coordinates are block-diagonal with each block in its own coordinate space, and every operation
(products, ``Π̂``, the retraction, norms, determinants) is done block by block by the block's own
structure — a block's semantics (e.g. Kronecker's factor-wise retraction) are kept exactly.

Options: ``blocks``, a list of block specs ``{"name", "dim", "options"}`` (``Structure.spec()``)
whose dims add up to ``dim``. Tensors are stored under ``"{i}:{key}"`` for block ``i``.

Registered as ``"block_sites"``: ``make_structure("block_sites", d, blocks=[...])`` with
``blocks`` as above, or :meth:`BlockSites.from_blocks` from existing structures. It is a VI
structure (the Pyro guide composes per-site structures with it); the optimizer rejects it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from structvi.structures.base import Structure
from structvi.structures.registry import get_structure_class, register

__all__ = ["BlockSites", "block_spec"]


def block_spec(name: str, dim: int, **options: Any) -> dict[str, Any]:
    """A normalized block spec ``{"name", "dim", "options"}`` (validated by the block's class)."""
    cls = get_structure_class(name)
    return {"name": name, "dim": int(dim), "options": cls.check_options(dim, **options)}


def _normalize_blocks(dim: int, blocks: Any) -> list[dict[str, Any]]:
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
        raise ValueError(
            f"block_sites: blocks must be a non-empty list of block specs "
            f"{{'name', 'dim', 'options'}}, got blocks={blocks!r}"
        )
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, Mapping) or "name" not in b or "dim" not in b:
            raise ValueError(
                f"block_sites: blocks[{i}] must be a mapping with keys 'name', 'dim' and "
                f"optionally 'options', got {b!r}"
            )
        out.append(block_spec(b["name"], b["dim"], **dict(b.get("options") or {})))
    total = sum(b["dim"] for b in out)
    if total != dim:
        raise ValueError(
            f"block_sites: the block dims {[b['dim'] for b in out]} add up to {total}, "
            f"expected dim={dim}"
        )
    return out


@register
class BlockSites(Structure):
    """Block-diagonal composition of arbitrary structures (module docstring)."""

    name = "block_sites"

    def _setup(self) -> None:
        # the constructor has checked options, keys, shapes and a shared dtype/device
        self.blocks: list[Structure] = []
        for i, spec in enumerate(self.options["blocks"]):
            cls = get_structure_class(spec["name"])
            prefix = f"{i}:"
            own = {k[len(prefix):]: t for k, t in self._t.items() if k.startswith(prefix)}
            self.blocks.append(cls._trusted(spec["dim"], own, spec["options"]))
        self.sizes = [b.dim for b in self.blocks]

    # ------------------------------------------------------------------ spec and storage
    @classmethod
    def check_options(cls, dim: int, **options: Any) -> dict[str, Any]:
        unknown = set(options) - {"blocks"}
        if unknown or "blocks" not in options:
            raise TypeError(f"block_sites takes exactly the option 'blocks', got {sorted(options)}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got dim={dim!r}")
        return {"blocks": _normalize_blocks(dim, options["blocks"])}

    @classmethod
    def _block_items(cls, blocks: list[dict[str, Any]]):
        for i, spec in enumerate(blocks):
            yield i, get_structure_class(spec["name"]), spec

    @classmethod
    def shapes(cls, dim: int, **options: Any) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for i, sub, spec in cls._block_items(options["blocks"]):
            for k, shape in sub.shapes(spec["dim"], **spec["options"]).items():
                out[f"{i}:{k}"] = tuple(shape)
        return out

    @classmethod
    def identity_tensors(cls, dim, *, dtype, device, **options) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, sub, spec in cls._block_items(options["blocks"]):
            own = sub.identity_tensors(spec["dim"], dtype=dtype, device=device, **spec["options"])
            out.update({f"{i}:{k}": t for k, t in own.items()})
        return out

    @classmethod
    def from_blocks(cls, blocks: Sequence[Structure]) -> BlockSites:
        """The block-diagonal structure with the given blocks (shared dtype and device)."""
        if not blocks or not all(isinstance(b, Structure) for b in blocks):
            raise ValueError(f"blocks must be a non-empty list of Structures, got {blocks!r}")
        tensors = {f"{i}:{k}": t for i, b in enumerate(blocks) for k, t in b.tensors().items()}
        specs = [b.spec() for b in blocks]
        return cls(sum(b.dim for b in blocks), tensors, blocks=specs)

    def default_step_size(self) -> float:
        """The smallest of the blocks' default step sizes (one step size serves all blocks)."""
        return min(b.default_step_size() for b in self.blocks)

    def is_newton(self) -> bool:
        """A Newton step when every block's is."""
        return all(b.is_newton() for b in self.blocks)

    def _map(self, fn, *others: BlockSites) -> BlockSites:
        """A new ``BlockSites`` whose block ``i`` is ``fn(self.blocks[i], others[..][i])``."""
        return self._of_parts([fn(b, *(o.blocks[i] for o in others))
                               for i, b in enumerate(self.blocks)])

    def _of_parts(self, parts: list[Structure]) -> BlockSites:
        """The block-diagonal structure of ``parts``, made by ops on this one's blocks (same
        dims and kinds): no re-validation, no rebuilt blocks."""
        if all(p.options is b.options and p.name == b.name for p, b in zip(parts, self.blocks)):
            options = self.options
        else:
            options = {"blocks": [{"name": p.name, "dim": p.dim, "options": p.options}
                                  for p in parts]}
        out = BlockSites.__new__(BlockSites)
        out.options, out.dim, out.blocks, out.sizes = options, self.dim, parts, self.sizes
        out._t = {f"{i}:{k}": t for i, p in enumerate(parts) for k, t in p._t.items()}
        return out

    def _split(self, x: Tensor) -> tuple[Tensor, ...]:
        return torch.split(x, self.sizes, dim=0)

    # ------------------------------------------------------------------ linear-space ops
    def add(self, other: Structure, alpha: float = 1.0) -> BlockSites:
        self._check_same(other)
        return self._map(lambda b, o: b.add(o, alpha), other)

    def add_identity(self, alpha: float) -> BlockSites:
        return self._map(lambda b: b.add_identity(alpha))

    def scale(self, c: float | Tensor) -> BlockSites:
        return self._map(lambda b: b.scale(c))

    def max_abs(self) -> Tensor:
        return torch.stack([b.max_abs() for b in self.blocks]).max()

    def zeros_like(self) -> BlockSites:
        return self._map(lambda b: b.zeros_like())

    def identity_like(self) -> BlockSites:
        return self._map(lambda b: b.identity_like())

    def coord_identity(self) -> BlockSites:
        return self._map(lambda b: b.coord_identity())

    def to(self, dtype: torch.dtype | None = None, device=None) -> BlockSites:
        if self._same_place(dtype, device):
            return self
        return self._map(lambda b: b.to(dtype, device))

    # ------------------------------------------------------------------ dense forms
    def to_dense(self) -> Tensor:
        return torch.block_diag(*(b.to_dense() for b in self.blocks))

    def _diag_blocks(self, A: Tensor) -> list[Tensor]:
        out, start = [], 0
        for n in self.sizes:
            out.append(A[start:start + n, start:start + n])
            start += n
        return out

    def from_dense(self, A: Tensor) -> BlockSites:
        parts = self._diag_blocks(A)
        return self._of_parts([b.from_dense(a) for b, a in zip(self.blocks, parts)])

    def project(self, Y: Tensor) -> BlockSites:
        parts = self._diag_blocks(Y)
        return self._of_parts([b.project(y) for b, y in zip(self.blocks, parts)])

    # ------------------------------------------------------------------ structured ops
    def matmul(self, x: Tensor) -> Tensor:
        self._check_vec(x)
        return torch.cat([b.matmul(xi) for b, xi in zip(self.blocks, self._split(x))])

    def rmatmul(self, x: Tensor) -> Tensor:
        self._check_vec(x)
        return torch.cat([b.rmatmul(xi) for b, xi in zip(self.blocks, self._split(x))])

    def solve(self, x: Tensor) -> Tensor:
        """``K^{-1} x`` block by block with each block's own ``solve`` (log-densities and
        diagnostics; never in an update)."""
        self._check_vec(x)
        return torch.cat([b.solve(xi) for b, xi in zip(self.blocks, self._split(x))])

    def compose(self, other: Structure) -> BlockSites:
        self._check_same(other)
        return self._map(lambda b, o: b.compose(o), other)

    def project_outer(self, U: Tensor, V: Tensor | None = None) -> BlockSites:
        V = U if V is None else V
        self._check_vec(U, "U")
        self._check_vec(V, "V")
        pairs = zip(self.blocks, self._split(U), self._split(V))
        return self._of_parts([b.project_outer(u, v) for b, u, v in pairs])

    def inner_project(self, X: Tensor) -> BlockSites:
        self._check_vec(X, "X")
        pairs = zip(self.blocks, self._split(X))
        return self._of_parts([b.inner_project(x) for b, x in pairs])

    def inner_project_self(self) -> BlockSites:
        return self._map(lambda b: b.inner_project_self())

    def diagonal(self) -> Tensor:
        return torch.cat([b.diagonal() for b in self.blocks])

    def gram_diagonal(self) -> Tensor:
        return torch.cat([b.gram_diagonal() for b in self.blocks])

    def inf_norm(self) -> Tensor:
        return self._memo("inf_norm",
                          lambda: torch.stack([b.inf_norm() for b in self.blocks]).max())

    def logabsdet(self) -> Tensor:
        return torch.stack([b.logabsdet() for b in self.blocks]).sum()

    def retract(self, M: Structure, retraction: str = "quadratic") -> BlockSites:
        if not isinstance(M, BlockSites) or M.sizes != self.sizes:
            got = M.spec() if isinstance(M, Structure) else type(M).__name__
            raise ValueError(f"M must be a block_sites coordinate element with block sizes "
                             f"{self.sizes}, got {got}")
        return self._map(lambda b, m: b.retract(m, retraction), M)

    def __repr__(self) -> str:
        inner = ", ".join(f"{b.name}({b.dim})" for b in self.blocks)
        return f"BlockSites(dim={self.dim}, blocks=[{inner}], dtype={self.dtype})"
