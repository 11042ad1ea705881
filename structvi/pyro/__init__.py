"""Pyro integration: a structured Gaussian autoguide and a natural-gradient SVI driver.

``AutoStructuredNormal`` is an :class:`~pyro.infer.autoguide.AutoContinuous` whose posterior is a
:class:`~structvi.gaussian.StructuredGaussian`; ``NaturalGradientSVI`` trains it with the
structvi engine (MATH (2.6)) the way ``pyro.infer.SVI`` trains a guide with a Pyro optimizer.
Per-site structures are composed block-diagonally by :class:`BlockSites` (``"block_sites"``,
a registered structure of :mod:`structvi.structures`).
"""

from structvi.structures.block_sites import BlockSites
from structvi.pyro.guides import AutoStructuredNormal, PyroStructuredGaussian
from structvi.pyro.log_joint import latent_log_joint
from structvi.pyro.svi import NaturalGradientSVI

__all__ = [
    "AutoStructuredNormal",
    "BlockSites",
    "NaturalGradientSVI",
    "PyroStructuredGaussian",
    "latent_log_joint",
]
