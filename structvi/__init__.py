"""structvi: structured Gaussian VI and inverse-free structured natural-gradient optimizers."""

from structvi import engine, structures
from structvi.engine import NGDConfig, NGDState, NGDStats
from structvi.structures import STRUCTURES, Structure, make_structure

__version__ = "0.1.0"

__all__ = [
    "NGDConfig",
    "NGDState",
    "NGDStats",
    "STRUCTURES",
    "Structure",
    "engine",
    "make_structure",
    "structures",
]
