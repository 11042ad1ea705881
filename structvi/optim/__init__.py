"""Structured inverse-free natural-gradient optimizers for deep learning (MATH §3)."""

from structvi.optim.functional import FactorState, LocalReducer, Reducer
from structvi.optim.optimizer import StructuredNGD

__all__ = ["FactorState", "LocalReducer", "Reducer", "StructuredNGD"]
