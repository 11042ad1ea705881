"""The `structvi` command from a plain (non-editable) install of a wheel built from this tree.

The wheel is built from a copy of the package sources (so no build files land in the checkout)
and installed with ``--no-deps --no-index`` into a fresh virtual environment that sees the
current environment's packages through a ``.pth`` file (torch, Pyro, ... are not downloaded; the
checkout's editable install is not visible there). Every command runs in a subprocess from a
directory outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The ``bin`` directory of a venv with structvi installed from a freshly built wheel."""
    import importlib.util

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel offline (--no-build-isolation) needs setuptools in this "
                    "environment: pip install -e '.[test]'")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "structvi", src / "structvi",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(src)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("structvi-*.whl"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    new_python = bin_dir / "python"
    purelib = subprocess.run([str(new_python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the current environment's packages (torch, pyro, ...), without processing its .pth files
    Path(purelib, "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(new_python), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, cwd=tmp)
    return bin_dir


def structvi(bin_dir: Path, *args: str, cwd: Path, timeout: float = 240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(bin_dir / "structvi"), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_installed_copy_is_the_wheel_with_its_data(installed, tmp_path):
    out = subprocess.run(
        [str(installed / "python"), "-c",
         "import structvi, structvi.data as d; print(structvi.__file__); "
         "print(d.load_breast_cancer()[0].shape, d.load_digits()[0].shape)"],
        cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(installed.parent) in out.splitlines()[0] and str(ROOT) not in out
    assert "torch.Size([569, 31]) torch.Size([1797, 64])" in out


BATCH = textwrap.dedent("""
    import contextlib, io, json, sys
    from structvi.cli import main

    results = []
    for argv in json.loads(sys.argv[1]):
        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as exit:  # as the interpreter reports it
                code = exit.code if isinstance(exit.code, int) else 1
                if not isinstance(exit.code, (int, type(None))):
                    err.write(str(exit.code))
        results.append([code, out.getvalue(), err.getvalue()])
    print(json.dumps(results))
""")


def run_batch(bin_dir: Path, argvs: list[list[str]], cwd: Path) -> list[tuple[int, str, str]]:
    """``structvi.cli.main(argv)`` for each argv in one subprocess of the installed copy (one
    torch import instead of one per command): ``(exit code, stdout, stderr)`` each."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    res = subprocess.run([str(bin_dir / "python"), "-c", BATCH, json.dumps(argvs)], cwd=cwd,
                         env=env, capture_output=True, text=True, check=True)
    return [tuple(r) for r in json.loads(res.stdout)]


COMMANDS = ("demo", "bench", "readme", "info", "structures")
BAD = [
    (["demo", "nope"], "unknown demo 'nope'"),
    (["demo", "--threads", "0"], "expected a positive integer, got '0'"),
    (["demo", "--out", "pyproject.toml"], "exists and is not a directory"),
    (["bench", "nope"], "unknown benchmark 'nope'"),
    (["bench", "--readme-only", "--quick"], "--readme-only takes no NAME, --quick or --out"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["structures", "--bogus"], "unrecognized arguments: --bogus"),
]


def test_help_info_structures_and_bad_arguments(installed, tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    argvs = [["--help"], *[[c, "--help"] for c in COMMANDS], ["info"],
             ["structures", "--markdown"], *[args for args, _ in BAD]]
    results = iter(run_batch(installed, argvs, tmp_path))
    code, top, _ = next(results)
    assert code == 0 and all(c in top for c in COMMANDS)
    for command in COMMANDS:
        code, out, _ = next(results)
        assert code == 0 and f"usage: structvi {command}" in out
    import torch

    from structvi import STRUCTURES

    code, info, _ = next(results)
    assert code == 0 and f"torch: {torch.__version__}" in info
    assert "torch threads:" in info and "bf16 on CPU:" in info
    assert "CUDA" in info or "cuda:0" in info
    code, listing, _ = next(results)
    assert code == 0 and all(f"| `{name}` |" in listing for name in STRUCTURES)
    assert "rank: ``k``" in listing and "9208 (rank=8)" in listing
    for args, message in BAD:
        code, _, err = next(results)
        assert code == 2 and message in err, (args, err)


def test_console_script_exit_status(installed, tmp_path):
    res = structvi(installed, "bench", "nope", cwd=tmp_path)
    assert res.returncode == 2 and "unknown benchmark 'nope'" in res.stderr


def test_demo_quick_writes_its_figures(installed, tmp_path):
    res = structvi(installed, "demo", "--quick", "--no-progress", "--out", "figs", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "figs"
    for png in ("logistic_regression.png", "bnn_calibration.png", "optimizer_digits.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
    summary = (out / "summary.md").read_text()
    assert summary.count("| method |") == 2 and "| optimizer |" in summary
    assert "Pyro's best" in res.stdout and "StructuredNGD" in res.stdout


def test_bench_and_readme_need_a_checkout(installed, tmp_path):
    for code, _, err in run_batch(installed, [["bench", "--quick"], ["readme"]], tmp_path):
        assert code == 1 and "no structvi source checkout" in err


def _fake_checkout(root: Path) -> None:
    """A checkout with one fast stand-in benchmark named `structures` and a README marker."""
    (root / "benchmarks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'structvi'\n")
    (root / "benchmarks" / "__init__.py").write_text("")
    (root / "benchmarks" / "structures.py").write_text(textwrap.dedent('''
        import argparse, json
        from pathlib import Path

        def main(argv):
            p = argparse.ArgumentParser()
            p.add_argument("--quick", action="store_true")
            p.add_argument("--out")
            a = p.parse_args(argv)
            out = Path(a.out)
            out.with_suffix(".json").write_text(json.dumps({"quick": a.quick}))
            out.with_suffix(".md").write_text(
                f"# Fake ({'quick' if a.quick else 'full'})\\n\\n| a | b |\\n|---|---|\\n| 1 | 2 |\\n")
    '''))
    (root / "README.md").write_text(
        "# x\n\n<!-- results:structures -->\nold, typed by hand\n<!-- /results:structures -->\n")


def test_bench_writes_results_and_regenerates_the_readme(installed, tmp_path):
    root = tmp_path / "checkout"
    _fake_checkout(root)
    quick = structvi(installed, "bench", "--quick", "structures", "--out", str(tmp_path / "o"),
                     "--root", str(root), cwd=tmp_path)
    assert quick.returncode == 0, quick.stderr
    assert (tmp_path / "o" / "structures.md").read_text().startswith("# Fake (quick)")
    assert "old, typed by hand" in (root / "README.md").read_text()  # --out: README untouched
    full = structvi(installed, "bench", "structures", cwd=root / "benchmarks")  # found upwards
    assert full.returncode == 0, full.stderr
    readme = (root / "README.md").read_text()
    assert "typed by hand" not in readme and "| 1 | 2 |" in readme and "Fake (full)" in readme
    check = structvi(installed, "readme", "--check", "--root", str(root), cwd=tmp_path)
    assert check.returncode == 0 and "up to date" in check.stdout
    (root / "benchmarks" / "results" / "structures.md").write_text("| a |\n|---|\n| 3 |\n")
    stale = structvi(installed, "readme", "--check", "--root", str(root), cwd=tmp_path)
    assert stale.returncode == 1 and "stale: README.md" in stale.stdout


def test_readme_check_passes_on_this_checkout(installed, tmp_path):
    res = structvi(installed, "readme", "--check", "--root", str(ROOT), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_full_demo_runs_in_two_minutes(installed, tmp_path):
    import time

    t0 = time.perf_counter()
    res = structvi(installed, "demo", "--no-progress", "--out", "full", cwd=tmp_path, timeout=600)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "full").glob("*.png"))) == 3
    assert seconds < 120, f"structvi demo took {seconds:.0f} s"


@pytest.mark.slow
def test_real_quick_benchmark_from_the_installed_command(installed, tmp_path):
    res = structvi(installed, "bench", "--quick", "structures", "--out", str(tmp_path),
                   "--root", str(ROOT), cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "structures.json").is_file() and (tmp_path / "structures.md").is_file()
