"""Shared fixtures: structure cases × dtypes, seeded generators, the inverse-free guard."""

from __future__ import annotations

import sys

import pytest
import torch

from structvi._forbid import ForbidDecompositions
from structvi.structures import STRUCTURES
from tests.structures.cases import STRUCTURE_CASES

# Tests use tiny matrices: intra-op threads only add barrier waits (on a loaded 2-core machine a
# 7×7 bfloat16 matrix-vector product took 18 ms with 2 threads and 2 µs with one).
torch.set_num_threads(1)

DTYPES = [
    torch.float64,
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.lowprec),
]
FLOAT_DTYPES = [torch.float64, torch.float32]


@pytest.fixture(params=STRUCTURE_CASES, ids=lambda c: c.id)
def structure_case(request):
    case = request.param
    assert case.name in STRUCTURES, f"structure {case.name!r} has a case but is not registered"
    return case


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def float_dtype(request):
    return request.param


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def forbid_decompositions():
    with ForbidDecompositions():
        yield


@pytest.fixture(autouse=True)
def _fresh_pyro_param_store():
    """Guides of one name share Pyro's param store (as in Pyro): every test starts empty."""
    pyro = sys.modules.get("pyro")
    if pyro is not None:
        pyro.clear_param_store()
    yield
