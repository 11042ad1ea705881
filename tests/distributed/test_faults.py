"""A rank that raises ends a ``torchrun`` job with its error, within the stated timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 20  # the example's process-group timeout (s)
BOUND = 120  # the launcher must have exited by then (startup on a loaded 2-core machine included)


def test_failing_rank_ends_the_job():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "ddp_train.py"), "--epochs", "1", "--fail-rank", "1",
           "--fail-step", "2", "--timeout", str(TIMEOUT)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BOUND, cwd=ROOT)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "injected failure at step 2" in proc.stdout + proc.stderr
    assert elapsed < BOUND
