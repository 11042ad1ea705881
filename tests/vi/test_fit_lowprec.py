"""Pure low-precision VI (mean, factor and target in bf16/fp16) on a stiff target (issue 9.4).

The fitter keeps the mean, momenta, statistics and the acceptance test in float32 and rounds
only the stored factor. The old code stopped "non_finite" after 10 skipped steps on the d = 6
target in bf16 (checked) and diverged on stiff targets with a bf16 mean. Contract: finite, at
most 2 failed steps, KL(q‖p) after the last step no worse than after step 100 (+0.05), and below
0.6 nats — the distance to the float32 run (KL 1e-8) is the low-precision rounding of the target
itself: measured for d = 6, cond 1e4: bf16 0.40 at step 100, 0.41 at 300 and 3000; fp16 0.066.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from structvi.fit import fit
from structvi.gaussian import StructuredGaussian
from structvi.structures import make_structure
from tests.vi import models

F64 = torch.float64


def kl_path(dtype, steps, d=6, cond=1e4):
    log_joint, m, Lam = models.stiff_gaussian(d=d, cond=cond)
    exact = MultivariateNormal(m, precision_matrix=Lam)
    q0 = StructuredGaussian(torch.zeros(d, dtype=dtype), make_structure("dense", d, dtype=dtype))
    kls = {}

    def callback(fitter, record):
        if record.iteration in (100, steps):
            q = fitter.q
            assert q.loc.dtype == dtype and q.factor.dtype == dtype
            q64 = StructuredGaussian(q.loc.double(), q.factor.to(F64))
            kls[record.iteration] = float(kl_divergence(q64, exact))

    res = fit(log_joint, q0, steps, estimator="stein", num_samples=4, progress=False,
              generator=torch.Generator().manual_seed(0), early_stopping=None, callback=callback)
    return res, kls


def check(res, kls, steps):
    assert res.stopped_reason == "steps" and res.state["num_skipped"] <= 2, res.message
    assert torch.isfinite(res.q.loc).all()
    assert kls[steps] <= kls[100] + 0.05 and kls[steps] < 0.6, kls


@pytest.mark.lowprec
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_pure_low_precision_fit_on_a_stiff_target(dtype):
    res, kls = kl_path(dtype, 300)
    check(res, kls, 300)


@pytest.mark.slow
@pytest.mark.lowprec
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_pure_low_precision_fit_10k_steps(dtype):
    res, kls = kl_path(dtype, 10_000)
    check(res, kls, 10_000)
