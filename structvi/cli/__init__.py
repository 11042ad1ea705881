"""The ``structvi`` command: ``demo``, ``bench``, ``readme``, ``info``, ``structures``.

``structvi demo`` runs the bundled demos on the bundled data (no checkout needed);
``structvi bench`` runs the benchmarks of a source checkout and regenerates the README tables;
``structvi readme`` only regenerates them; ``structvi info`` prints versions, threads and
accelerators; ``structvi structures`` lists the registered structures. ``structvi CMD --help``
describes each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from structvi.cli.bench import ALIASES, BENCHMARKS
from structvi.cli.demo import DEMOS

__all__ = ["BENCHMARKS", "DEMOS", "build_parser", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="structvi", description="structured Gaussian VI and inverse-free structured "
        "natural-gradient optimizers: demos, benchmarks, environment, structures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the bundled demos (about a minute on 2 cores)",
                       description="Run the bundled demos on the bundled data: Bayesian "
                       "logistic regression (3 structures vs Pyro's autoguides), a Pyro BNN, "
                       "and StructuredNGD vs AdamW on a digits CNN. Each prints a table and "
                       "saves a PNG; summary.md collects them.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"subset of {list(DEMOS)}")
    p.add_argument("--quick", action="store_true", help="few steps (a smoke test)")
    p.add_argument("--out", default="structvi-demo", metavar="DIR",
                   help="directory for the PNGs and summary.md (default: ./structvi-demo)")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="torch intra-op threads (default 1: the demo models are small)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("bench", help="run the benchmarks of a source checkout",
                       description="Run benchmarks/ of a source checkout (needs the bench "
                       "extra). A full run writes benchmarks/results/NAME.{json,md,png} and "
                       "regenerates the README tables; --quick writes to "
                       "benchmarks/results/quick/; --out DIR writes there instead (README "
                       "untouched).")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"subset of {list(BENCHMARKS)} (aliases {sorted(ALIASES)})")
    p.add_argument("--quick", action="store_true", help="small sizes (minutes, not hours)")
    p.add_argument("--out", metavar="DIR", help="write the results files here")
    p.add_argument("--root", metavar="PATH", help="the checkout (default: found from the cwd)")
    p.add_argument("--readme-only", action="store_true",
                   help="run nothing; regenerate the README tables (as `structvi readme`)")

    p = sub.add_parser("readme", help="regenerate the README tables from benchmarks/results",
                       description="Fill every <!-- results:NAME --> block of README.md and "
                       "docs/benchmarks.md from benchmarks/results/NAME.md and copy the result "
                       "figures into docs/assets/results/.")
    p.add_argument("--root", metavar="PATH", help="the checkout (default: found from the cwd)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if anything is stale")

    sub.add_parser("info", help="versions, threads, CUDA/bf16 availability",
                   description="Print package versions, torch threads and accelerator support.")
    p = sub.add_parser("structures", help="the registered structures",
                       description="List the registered structures with their options, "
                       "storage and cost (from the registry and the structures' docstrings).")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table")
    return parser


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import torch

    from structvi.cli.demo import run_demos

    unknown = [n for n in args.names if n not in DEMOS]
    if unknown:
        parser.error(f"unknown demo {unknown[0]!r}; expected one of {list(DEMOS)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out!r} exists and is not a directory")
    torch.set_num_threads(args.threads)
    run_demos(args.names, out, args.quick, not args.no_progress)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from structvi.cli import bench

    try:
        names = bench.resolve_names(args.names)
    except ValueError as err:
        parser.error(str(err))
    if args.readme_only and (args.names or args.quick or args.out):
        parser.error("--readme-only takes no NAME, --quick or --out")
    root = bench.find_checkout(args.root)
    if args.readme_only:
        bench.regenerate(root, check=False)
        return
    results = root / "benchmarks" / "results"
    out = Path(args.out) if args.out else results / "quick" if args.quick else results
    bench.run_benchmarks(names, root, out, args.quick)
    if out.resolve() == results.resolve():
        bench.regenerate(root, check=False)
    else:
        print(f"\nresults in {out}; README tables left alone (they quote {results})")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``structvi`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        _demo(args, parser)
    elif args.command == "bench":
        _bench(args, parser)
    elif args.command == "readme":
        from structvi.cli import bench

        if bench.regenerate(bench.find_checkout(args.root), check=args.check) and args.check:
            sys.exit(1)
    elif args.command == "info":
        from structvi.cli.info import info_lines

        print("\n".join(info_lines()))
    else:
        from structvi.cli.info import format_structures, structure_rows

        print(format_structures(structure_rows(), args.markdown))
