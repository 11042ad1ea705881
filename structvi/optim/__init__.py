"""Structured inverse-free natural-gradient optimizers for deep learning (MATH §3)."""

from structvi.optim.functional import FactorState, LocalReducer, Reducer
from structvi.optim.optimizer import StructuredNGD
from structvi.optim.predict import calibration, ece_floor, predict
from structvi.optim.variational import VariationalNGD

__all__ = ["FactorState", "LocalReducer", "Reducer", "StructuredNGD", "VariationalNGD",
           "calibration", "ece_floor", "predict"]
