"""``structvi bench`` and ``structvi readme``: benchmarks of a source checkout, README tables.

The benchmarks are not shipped in the wheel: they compare against scikit-learn, singd and ivon
(the ``bench`` extra), and a full run rewrites the checkout's ``benchmarks/results/`` and the
README tables generated from them. Both commands therefore work in a source checkout (found from
the working directory upwards, or given with ``--root``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

from structvi import _readme

# name → (module, how its --out is given: "file" = a .json path, "dir" = a directory). Adding a
# benchmark to `structvi bench` is one line here; its README table is one marker pair.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "structures": ("benchmarks.structures", "file"),
    "vi_vs_pyro": ("benchmarks.vi_vs_pyro", "dir"),
    "vi_scaling": ("benchmarks.vi_scaling", "dir"),
    "optim_digits": ("benchmarks.optim_digits", "file"),
    "pyro_path": ("benchmarks.pyro_path", "dir"),
    "optim_faults": ("benchmarks.optim_faults", "file"),
    "optim_defaults": ("benchmarks.optim_defaults", "dir"),
    "bayesian_digits": ("benchmarks.bayesian_digits", "file"),
    "ddp_scaling": ("benchmarks.ddp_scaling", "dir"),
    "real_models": ("benchmarks.real_models", "dir"),
    "fault_sweep": ("benchmarks.fault_sweep", "dir"),
    "sparse_convergence": ("benchmarks.sparse_convergence", "dir"),
    "vngd_step": ("benchmarks.vngd_step", "file"),
    "digits_calibration": ("benchmarks.digits_calibration", "file"),
    "vngd_defaults": ("benchmarks.vngd_defaults", "file"),
}
ALIASES = {"vi": "vi_vs_pyro", "optim": "optim_digits", "pyro": "pyro_path"}


class CheckoutError(SystemExit):
    """No source checkout where one is needed (exit status 1 with the message)."""


def find_checkout(root: str | os.PathLike[str] | None) -> Path:
    """The checkout root: ``root`` if given, else the working directory or a parent of it."""
    candidates = [Path(root)] if root else [Path.cwd(), *Path.cwd().parents]
    for path in candidates:
        if (path / "benchmarks" / "__init__.py").is_file() and (path / "pyproject.toml").is_file():
            return path.resolve()
    where = f"--root {root}" if root else f"{Path.cwd()} or its parents"
    raise CheckoutError(
        f"structvi bench/readme: no structvi source checkout at {where} (looked for "
        f"benchmarks/__init__.py next to pyproject.toml). The benchmarks are not part of the "
        f"installed package: clone the repository, `pip install -e '.[bench]'`, and run from "
        f"there or pass --root PATH."
    )


def resolve_names(names: list[str]) -> list[str]:
    """Benchmark names with aliases resolved (all when empty); ``ValueError`` on unknown ones."""
    resolved = [ALIASES.get(n, n) for n in names] or list(BENCHMARKS)
    unknown = [n for n in resolved if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; expected one of "
                         f"{sorted(BENCHMARKS)} (aliases {sorted(ALIASES)})")
    return list(dict.fromkeys(resolved))


@contextlib.contextmanager
def _in_checkout(root: Path):
    """Import ``benchmarks`` from ``root`` and run with ``root`` as working directory."""
    old_cwd, old_path = Path.cwd(), list(sys.path)
    sys.path.insert(0, str(root))
    for mod in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[mod]  # a `benchmarks` package from elsewhere must not shadow root's
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path


def run_benchmarks(names: list[str], root: Path, out: Path, quick: bool) -> None:
    """Run each benchmark's ``main`` writing ``NAME.{json,md,png}`` into ``out``."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _in_checkout(root):
        for name in names:
            module_name, kind = BENCHMARKS[name]
            print(f"\n=== benchmark {name} ({'quick' if quick else 'full'}) → {out} ===",
                  flush=True)
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                raise SystemExit(
                    f"structvi bench {name}: cannot import {module_name} ({err}); the benchmarks "
                    f"need the bench extra: pip install -e '.[bench]'"
                ) from err
            target = out / f"{name}.json" if kind == "file" else out
            module.main((["--quick"] if quick else []) + ["--out", str(target)])


def regenerate(root: Path, check: bool) -> list[str]:
    """Regenerate (or with ``check`` compare) the README/docs blocks; print what changed."""
    changed = _readme.update_checkout(root, check=check)
    verb = "stale" if check else "rewrote"
    for path in changed:
        print(f"{verb}: {path}")
    if not changed:
        print("README and docs tables are up to date with benchmarks/results/")
    return changed
