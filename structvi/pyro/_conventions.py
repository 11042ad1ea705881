"""Pyro conventions for :class:`~structvi.pyro.NaturalGradientSVI`: argument names, guide lists,
sample counts.

* Pyro's names (``num_particles``, ``loss``, ...) and misspelt options are answered with the
  structvi name ("did you mean ..."), not an ``NGDConfig`` error.
* An :class:`~pyro.infer.autoguide.AutoGuideList` is split into its one
  :class:`AutoStructuredNormal` part (natural-gradient steps) and the other parts (e.g.
  ``AutoDelta``), whose parameters the Pyro ``optim`` trains.
* The Stein/reparameterization estimate of the curvature of a dense ``d``-block from ``S``
  samples has rank ≤ ``S``: far below ``d`` it is too noisy (the issue's 513-dimensional BNN:
  dense ``−281`` against diagonal ``−116`` with 16 samples), so set-up warns when
  ``S < d / SAMPLES_PER_DIM`` for a dense or low-rank block.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from typing import Any

from pyro.infer.autoguide import AutoGuideList

from structvi.engine import NGDConfig
from structvi.pyro.guides import AutoStructuredNormal

__all__ = ["check_config_options", "sample_count_advice", "split_guide"]

SAMPLES_PER_DIM = 4
"""Set-up warns when ``num_samples < d / SAMPLES_PER_DIM`` for a dense or low-rank block."""

PYRO_NAMES = {
    "num_particles": "num_samples (Monte-Carlo points per step)",
    "learning_rate": "lr",
    "step_size": "lr",
    "loss": "nothing: NaturalGradientSVI optimizes the ELBO itself (drop loss=)",
    "loss_and_grads": "nothing: NaturalGradientSVI optimizes the ELBO itself",
    "vectorize": "vectorize_particles",
    "progress_bar": "progress (an argument of NaturalGradientSVI.run)",
}
OWN_NAMES = ("lr", "momentum", "num_samples", "estimator", "optim", "config",
             "vectorize_particles", "generator", "max_plate_nesting")


def check_config_options(options: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming the right argument for Pyro names and misspellings.

    Raises:
        TypeError: an option that is neither an :class:`NGDConfig` field nor ours.
    """
    fields = [f.name for f in dataclasses.fields(NGDConfig)]
    for key in options:
        if key in fields:
            continue
        if key in PYRO_NAMES:
            raise TypeError(f"NaturalGradientSVI got {key}= (Pyro's name); did you mean "
                            f"{PYRO_NAMES[key]}?")
        close = difflib.get_close_matches(key, fields + list(OWN_NAMES), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise TypeError(f"NaturalGradientSVI got an unexpected argument {key}={options[key]!r}"
                        f"{hint} (its own arguments: {', '.join(OWN_NAMES)}; engine options: "
                        f"{', '.join(fields)})")


def split_guide(guide: Any) -> tuple[AutoStructuredNormal, list[Any]]:
    """``(structured part, other parts)`` of an :class:`AutoStructuredNormal` or an
    ``AutoGuideList`` holding exactly one.

    Raises:
        TypeError: another guide type, or a list without exactly one structured part.
    """
    if isinstance(guide, AutoStructuredNormal):
        return guide, []
    if isinstance(guide, AutoGuideList):
        parts = list(guide)
        ours = [p for p in parts if isinstance(p, AutoStructuredNormal)]
        if len(ours) == 1:
            return ours[0], [p for p in parts if p is not ours[0]]
        raise TypeError(f"an AutoGuideList given to NaturalGradientSVI must hold exactly one "
                        f"AutoStructuredNormal, got {len(ours)} among "
                        f"{[type(p).__name__ for p in parts]}")
    raise TypeError(f"guide must be an AutoStructuredNormal or an AutoGuideList with one, got "
                    f"guide={type(guide).__name__}")


def _blocks(spec: dict[str, Any]) -> list[tuple[str, int]]:
    if spec["name"] == "block_sites":
        return [(b["name"], b["dim"]) for b in spec["options"]["blocks"]]
    return [(spec["name"], spec["dim"])]


def sample_count_advice(spec: dict[str, Any], num_samples: int, estimator: str) -> str | None:
    """A warning text when ``num_samples`` is far below what a dense/low-rank block needs."""
    if estimator == "hessian":
        return None  # Hessian-vector products: the curvature is exact for any sample count
    worst = max((d for name, d in _blocks(spec) if name in ("dense", "low_rank_diagonal")),
                default=0)
    need = -(-worst // SAMPLES_PER_DIM)
    if num_samples >= need:
        return None
    return (f"num_samples={num_samples} is far below the {worst} coordinates of a dense or "
            f"low-rank block: its curvature estimate has rank <= {num_samples} and the fit "
            f"ends well below a sparser structure's; use num_samples >= {need + need % 2}, "
            f"estimator='hessian', or a sparser structure (diagonal, kronecker, block_diagonal)")


def warn_sample_count(spec: dict[str, Any], num_samples: int, estimator: str) -> None:
    """Issue :func:`sample_count_advice` as a ``UserWarning``, if any."""
    advice = sample_count_advice(spec, num_samples, estimator)
    if advice is not None:
        warnings.warn(advice, UserWarning, stacklevel=4)
