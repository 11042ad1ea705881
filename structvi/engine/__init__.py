"""The shared engine: retractions and the momentum GNC natural-gradient step."""

from structvi.engine.ngd import (
    NGDConfig,
    NGDState,
    NGDStats,
    factor_step,
    init,
    mean_step,
    step,
)
from structvi.engine.mean_solver import (
    accumulation_dtype,
    plain_direction,
    target_hvp,
    trust_region_cg,
)
from structvi.engine.retraction import RETRACTIONS, apply_retraction, expm, first_order, quadratic

__all__ = [
    "RETRACTIONS",
    "accumulation_dtype",
    "plain_direction",
    "target_hvp",
    "trust_region_cg",
    "NGDConfig",
    "NGDState",
    "NGDStats",
    "apply_retraction",
    "expm",
    "factor_step",
    "first_order",
    "init",
    "mean_step",
    "quadratic",
    "step",
]
