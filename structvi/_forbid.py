"""A ``TorchFunctionMode`` that raises on inverses and decompositions (DESIGN decision 2)."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

FORBIDDEN = {
    torch.linalg.inv, torch.linalg.inv_ex, torch.linalg.cholesky, torch.linalg.cholesky_ex,
    torch.linalg.eigh, torch.linalg.eig, torch.linalg.eigvals, torch.linalg.eigvalsh,
    torch.linalg.svd, torch.linalg.svdvals, torch.linalg.qr, torch.linalg.solve,
    torch.linalg.solve_ex, torch.linalg.solve_triangular, torch.linalg.lu_factor,
    torch.linalg.lu_factor_ex, torch.linalg.lu, torch.linalg.lstsq, torch.linalg.matrix_exp,
    torch.linalg.pinv, torch.linalg.slogdet, torch.linalg.det, torch.inverse, torch.cholesky,
    torch.linalg.matrix_power, torch.Tensor.inverse, torch.Tensor.cholesky, torch.logdet,
    torch.Tensor.logdet, torch.slogdet, torch.det, torch.matrix_exp, torch.Tensor.matrix_exp,
    torch.cholesky_solve, torch.cholesky_inverse, torch.triangular_solve,
}


class ForbidDecompositions(TorchFunctionMode):
    """Raise ``RuntimeError`` on any inverse, solve or decomposition called inside the block.

    Used by the tests to check that every update path is matrix-multiplication only::

        with ForbidDecompositions():
            state = engine.step(state, stats, config)
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in FORBIDDEN:
            name = getattr(func, "__name__", repr(func))
            raise RuntimeError(f"inverse/decomposition {name} called in an inverse-free path")
        return func(*args, **(kwargs or {}))
