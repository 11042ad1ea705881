"""2 spawned gloo processes vs 1 process on the concatenated batch / the full data.

One spawned group computes every 2-process run (:func:`scenarios.all_runs`; spawning costs
seconds); the tests compare its results with single-process references computed here.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import scenarios
from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(scenarios.all_runs, nprocs=2)


def _rtol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def assert_close(got: dict, want: dict, rtol: float, keys=None) -> None:
    for key in keys or want:
        g, w = got[key], want[key]
        scale = w.abs().max().clamp(min=1.0) if w.numel() else 1.0
        err = float((g - w).abs().max() / scale) if w.numel() else 0.0
        assert err <= rtol, f"{key}: relative error {err:.2e} > {rtol:.0e}"


def assert_identical(a: dict, b: dict, keys=None) -> None:
    for key in keys or a:
        assert torch.equal(a[key], b[key]), f"{key} differs between the ranks"


@pytest.mark.parametrize("case", list(scenarios.OPTIMIZER_CASES))
def test_optimizer_matches_one_process(ranks, case):
    """DDP/bare, equal/unequal shards, work spreading, summed loss, no_sync: params and factors
    equal the single-process run on the concatenated batch; both ranks bit-identical."""
    dtype = scenarios.OPTIMIZER_CASES[case][0]
    want = scenarios.optimizer_run(None, 1, case)
    got0, got1 = ranks[0][f"optim/{case}"], ranks[1][f"optim/{case}"]
    assert set(got0) == set(want)
    assert_identical(got0, got1)
    assert_close(got0, want, _rtol(dtype))
    assert any(k.startswith("K.") for k in want) and any(k.startswith("param.") for k in want)


def test_optimizer_checkpoint_resumes_in_one_process(ranks):
    """A checkpoint written by rank 0 of a 2-process run continues in lock-step in 1 process."""
    two = ranks[0]["optim/checkpoint"]
    assert ranks[1]["optim/checkpoint"]["checkpoint"] is None  # rank 0 only writes
    one = scenarios.optimizer_checkpoint_run(None, 1, two["checkpoint"])
    assert_close(one["snapshot"], two["snapshot"], 1e-10)


@pytest.mark.parametrize("case", list(scenarios.VI_CASES))
def test_fit_matches_full_data(ranks, case):
    """Sharded log-joints (minibatch, weighted and summed conventions), dense and sparse
    structures, Stein and Hessian estimators: q and the ELBO equal the full-data fit."""
    want = scenarios.vi_run(None, 1, case)
    got0, got1 = ranks[0][f"vi/{case}"], ranks[1][f"vi/{case}"]
    assert_identical(got0, got1)
    assert_close(got0, want, 1e-10)
    assert len(want["elbo"]) == scenarios.STEPS


def test_fit_checkpoint_resumes_in_one_process(ranks):
    two = ranks[0]["vi/checkpoint"]
    one = scenarios.vi_checkpoint_run(None, 1, two["checkpoint"])
    assert_close(one, two, 1e-10, keys=["loc", "factor", "elbo"])


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_natural_gradient_svi_matches_full_data(ranks, structure):
    """Each rank's model subsamples its half of the plate: same guide as the full-data SVI."""
    want = scenarios.pyro_run(None, 1, structure)
    got0, got1 = ranks[0][f"pyro/{structure}"], ranks[1][f"pyro/{structure}"]
    assert_identical(got0, got1)
    assert_close(got0, want, 1e-10)


def test_misuse_raises_clear_errors(ranks):
    for rank in ranks:
        assert "wrap the model in DistributedDataParallel" in rank["errors"]["bare_scaler"]
        assert "one loss_average for every param group" in rank["errors"]["loss_average"]
