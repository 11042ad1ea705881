"""structvi: structured Gaussian VI and inverse-free structured natural-gradient optimizers.

Public names: :func:`make_structure`, :class:`StructuredGaussian`, :func:`fit`, :class:`Fitter`,
:class:`NGDConfig`. Sub-packages ``structvi.optim`` (the deep-learning optimizer),
``structvi.pyro`` (Pyro guides), ``structvi.arviz`` (ArviZ export) and ``structvi.psis``
(Pareto-smoothed importance sampling of a fitted q) load on first access, so
``import structvi`` does not import Pyro or ArviZ.
"""

from __future__ import annotations

import importlib
from typing import Any

from structvi import engine, structures
from structvi.engine import NGDConfig, NGDState, NGDStats
from structvi.estimators import elbo
from structvi.fit import FitResult, Fitter, FitStopped, StepRule, fit
from structvi.gaussian import StructuredGaussian
from structvi.schedules import Plateau, TwoStage
from structvi.structures import STRUCTURES, Structure, make_structure

__version__ = "0.1.0"

_LAZY = ("arviz", "optim", "psis", "pyro")

__all__ = [
    "FitResult",
    "FitStopped",
    "Fitter",
    "NGDConfig",
    "NGDState",
    "NGDStats",
    "Plateau",
    "STRUCTURES",
    "StepRule",
    "Structure",
    "StructuredGaussian",
    "TwoStage",
    "elbo",
    "engine",
    "fit",
    "make_structure",
    "structures",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"structvi.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'structvi' has no attribute {name!r}")
