"""``examples/ddp_vi.py`` in one process (no ``torchrun``): fit, checkpoint, resume, Pyro.

The two-process launch of ``examples/ddp_train.py`` is exercised by ``test_faults.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
EXAMPLE = Path(__file__).parents[2] / "examples" / "ddp_vi.py"


def _example():
    spec = importlib.util.spec_from_file_location("ddp_vi", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddp_vi_example_checkpoints_and_resumes(tmp_path, capsys):
    example, path = _example(), tmp_path / "vi.pt"
    example.main(["--structure", "diagonal", "--steps", "3", "--checkpoint", str(path)])
    assert path.exists()
    example.main(["--structure", "diagonal", "--steps", "5", "--resume", str(path)])
    example.main(["--pyro", "--structure", "diagonal", "--steps", "2"])
    out = capsys.readouterr().out
    assert "diagonal: 3 steps" in out and "diagonal: 5 steps" in out and "pyro diagonal" in out
