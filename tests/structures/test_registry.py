"""make_structure: names, options, dtypes and errors that name argument, value and expectation."""

from __future__ import annotations

import pytest
import torch

from structvi.structures import STRUCTURES, make_structure, structure_from_spec

ALL = [
    "block_diagonal", "block_sites", "dense", "diagonal", "hierarchical", "kronecker", "low_rank_diagonal",
    "lower_triangular", "triangular_toeplitz", "upper_triangular",
]


def test_all_structures_registered():
    assert sorted(STRUCTURES) == ALL


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown structure 'tridiagonal'; expected one of \["):
        make_structure("tridiagonal", 4)


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "4"])
def test_bad_dim(dim):
    with pytest.raises(ValueError, match=r"dim must be an integer >= 1, got dim="):
        make_structure("diagonal", dim)


def test_bad_dtype_and_init():
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype, got dtype=torch.int64"):
        make_structure("dense", 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="init must be 'identity' or 'zeros', got init='ones'"):
        make_structure("dense", 3, init="ones")


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("block_diagonal", {"block_size": 0}, "block_size"),
        ("low_rank_diagonal", {"rank": 5}, "rank"),
        ("hierarchical", {"k1": 3, "k2": 3}, "k1"),
        ("kronecker", {"dims": (2, 3), "factors": ("dense", "dense")}, "dims"),
    ],
)
def test_bad_options_name_the_argument(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_structure(name, 5, **options)


def test_options_on_structure_without_options():
    with pytest.raises(TypeError, match="dense takes no options"):
        make_structure("dense", 3, rank=2)


def test_spec_with_wrong_name_is_rejected():
    s = make_structure("diagonal", 3)
    with pytest.raises(ValueError, match="unknown structure"):
        structure_from_spec(s.tensors(), {"name": "nope", "dim": 3, "options": {}})


def test_wrong_tensor_shapes_are_reported():
    s = make_structure("diagonal", 3)
    with pytest.raises(ValueError, match=r"tensor 'diag' must have shape \(3,\), got \(4,\)"):
        type(s)(3, {"diag": torch.ones(4)})


@pytest.mark.parametrize("name", ALL)
def test_device_and_dtype_move(name):
    options = {"block_diagonal": {"block_size": 2}, "low_rank_diagonal": {"rank": 1},
               "block_sites": {"blocks": [{"name": "dense", "dim": 3}, {"name": "diagonal", "dim": 1}]},
               "hierarchical": {"k1": 1, "k2": 1},
               "kronecker": {"dims": (2, 2), "factors": ("dense", "diagonal")}}.get(name, {})
    s = make_structure(name, 4, dtype=torch.float64, **options)
    moved = s.to(dtype=torch.bfloat16, device="cpu")
    assert moved.dtype == torch.bfloat16 and moved.device.type == "cpu"
    assert moved.spec() == s.spec()


@pytest.mark.parametrize(
    "name, dim, options, expected",
    [
        ("block_diagonal", 5, {"block_size": 30}, {"block_size": 5}),
        ("block_diagonal", 50, {"block_size": 30}, {"block_size": 30}),
        ("low_rank_diagonal", 4, {"rank": 8}, {"rank": 3}),
        ("hierarchical", 10, {"k1": 15, "k2": 15}, {"k1": 10, "k2": 0}),
        ("hierarchical", 20, {"k1": 15, "k2": 15}, {"k1": 15, "k2": 5}),
        ("hierarchical", 40, {"k1": 15, "k2": 15}, {"k1": 15, "k2": 15}),
        ("dense", 3, {}, {}),
    ],
)
def test_fit_options_shrink_to_the_dimension(name, dim, options, expected):
    cls = STRUCTURES[name]
    fitted = cls.fit_options(dim, **options)
    assert fitted == expected
    make_structure(name, dim, **fitted)  # valid

