"""Command line: ``structvi demo`` and ``structvi bench``.

``demo`` runs the bundled examples (Bayesian logistic regression on scikit-learn's breast-cancer
data with three structures, and a short optimizer run on the digits data); ``bench`` runs the
benchmarks in ``benchmarks/`` and writes ``benchmarks/results/``. Both need the source checkout
(the examples and benchmarks are not part of the installed package).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# script → (keyword arguments of its ``main`` for a full run, for a quick run)
DEMOS = {
    "examples/logistic_regression.py": ({}, {"quick": True}),
    "examples/train_digits.py": ({"argv": ["--epochs", "5"]}, {"argv": ["--epochs", "1"]}),
}
# name → (module, --out for a quick run: quick results never overwrite the full ones the README
# quotes; some benchmarks take an output file, others a directory)
QUICK_DIR = "benchmarks/results/quick"
BENCHMARKS = {
    "structures": ("benchmarks.structures", f"{QUICK_DIR}/structures.json"),
    "vi": ("benchmarks.vi_vs_pyro", QUICK_DIR),
    "vi_scaling": ("benchmarks.vi_scaling", QUICK_DIR),
    "optim": ("benchmarks.optim_digits", f"{QUICK_DIR}/optim_digits.json"),
    "pyro": ("benchmarks.pyro_path", QUICK_DIR),
}


def _require_checkout(path: Path) -> None:
    if not path.exists():
        raise SystemExit(
            f"{path} not found: `structvi demo` and `structvi bench` run from a source checkout "
            f"(git clone, then `make demo`)"
        )


def demo(quick: bool) -> None:
    """Run each demo script's ``main`` (few steps with ``--quick``)."""
    for rel, (full, short) in DEMOS.items():
        path = ROOT / rel
        _require_checkout(path)
        print(f"\n=== {rel} ===", flush=True)
        module = runpy.run_path(str(path), run_name="structvi_demo")
        module["main"](**(short if quick else full))


def bench(names: list[str], quick: bool) -> None:
    """Run the named benchmarks (all by default); ``quick`` runs write under ``QUICK_DIR``."""
    _require_checkout(ROOT / "benchmarks")
    sys.path.insert(0, str(ROOT))
    import importlib

    for name in names or list(BENCHMARKS):
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
        print(f"\n=== benchmark {name} ===", flush=True)
        module_name, quick_out = BENCHMARKS[name]
        module = importlib.import_module(module_name)
        module.main(["--quick", "--out", str(ROOT / quick_out)] if quick else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="structvi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the bundled examples")
    p_demo.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    p_bench = sub.add_parser("bench", help="run benchmarks and write benchmarks/results/")
    p_bench.add_argument("names", nargs="*", help=f"subset of {sorted(BENCHMARKS)}")
    p_bench.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.quick)
    else:
        bench(args.names, args.quick)


if __name__ == "__main__":
    main()
