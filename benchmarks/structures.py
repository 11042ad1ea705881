"""Cost of the structure operations and of one engine step, side by side.

For every structure: time of ``matmul`` (``K @ X`` with ``X`` of shape ``(d, 16)``),
``inner_project`` (``Π̂(Kᵀ X Xᵀ K)``) and one engine step (``structvi.engine.step``) at
d ∈ {256, 1024, 4096} in float32 and bfloat16, plus storage in floats. The fitted growth
exponent ``log(t(4096)/t(256)) / log(16)`` shows the cost order (≈1 for diagonal,
≈1 per product for low_rank_diagonal at fixed rank, ≈2 for dense products, ≈3 for dense
compositions inside the engine step). A second sweep runs the linear-cost structures at
d ∈ {4096, 65536, 1048576}, where their per-call overhead no longer hides the growth.

Times are CPU seconds of the process (``time.process_time``, :func:`timeit`) with one intra-op
thread by default (``--threads``): on a shared machine wall times of long calls grow with the
load, and a second thread waiting for a descheduled partner inflates the median of
sub-millisecond calls by orders of magnitude.

Run: ``python -m benchmarks.structures [--quick] [--threads N]
[--out benchmarks/results/structures.json]`` (quick: ``benchmarks/results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from structvi import engine
from structvi.structures import STRUCTURES, make_structure

NCOLS = 16


def configs(d: int) -> dict[str, dict]:
    """Structure name → options at size ``d`` (only registered names)."""
    side = int(round(math.sqrt(d)))
    table = {
        "dense": {},
        "diagonal": {},
        "block_diagonal": {"block_size": 32},
        "lower_triangular": {},
        "low_rank_diagonal": {"rank": 8},
        "hierarchical": {"k1": 8, "k2": 8},
        "triangular_toeplitz": {},
        "kronecker": {"dims": (side, d // side), "factors": ("dense", "dense")},
    }
    return {k: v for k, v in table.items() if k in STRUCTURES}


def timeit(fn, budget: float = 0.3, max_reps: int = 50) -> float:
    """Median CPU seconds per call: one warm-up, then repeat until ``budget`` CPU seconds are spent.

    CPU time of this process (``time.process_time``), not wall time: on a shared machine a long
    call is preempted and its wall time grows with the load while short calls fit in one time
    slice, which biases the growth exponents upwards (measured: a float32 ``(4096, 4096) @
    (4096, 16)`` took 31.6 ms wall, 12.5 ms CPU at load 5.8 on 2 cores).
    """
    fn()
    times: list[float] = []
    start = time.process_time()
    while len(times) < max_reps and (time.process_time() - start < budget or len(times) < 3):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    times.sort()
    return times[len(times) // 2]


def measure(name: str, d: int, options: dict, dtype: torch.dtype, gen: torch.Generator) -> dict:
    K = make_structure(name, d, dtype=dtype, **options)
    # a non-trivial factor: one engine step away from the identity
    X = (torch.randn(d, NCOLS, generator=gen) / math.sqrt(NCOLS)).to(dtype)
    state = engine.init(torch.zeros(d, dtype=dtype), K)
    config = engine.NGDConfig(lr=0.1)
    stats = engine.NGDStats(torch.randn(d, generator=gen).to(dtype), K.inner_project(X))
    state = engine.step(state, stats, config)
    K = state.factor
    stats = engine.NGDStats(stats.grad, K.inner_project(X))
    return {
        "structure": name,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "d": d,
        "dtype": str(dtype).replace("torch.", ""),
        "storage_floats": K.num_params(),
        "matmul_s": timeit(lambda: K.matmul(X)),
        "inner_project_s": timeit(lambda: K.inner_project(X)),
        "engine_step_s": timeit(lambda: engine.step(state, stats, config)),
    }


def growth(rows: list[dict], key: str) -> dict:
    """Fitted exponent of ``key`` between the smallest and largest d, per structure and dtype."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        out.setdefault(r["structure"], {}).setdefault(r["dtype"], {})[r["d"]] = r[key]
    res = {}
    for s, by_dtype in out.items():
        for dt, by_d in by_dtype.items():
            lo, hi = min(by_d), max(by_d)
            res.setdefault(s, {})[dt] = math.log(by_d[hi] / by_d[lo]) / math.log(hi / lo)
    return res


def markdown(rows: list[dict], dims: list[int]) -> str:
    lines = [
        "| structure | dtype | storage (floats) at d=" + "/".join(map(str, dims))
        + " | matmul CPU ms | inner_project CPU ms | engine step CPU ms |",
        "|---|---|---|---|---|---|",
    ]
    keyed: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["structure"], r["dtype"]), []).append(r)
    for (s, dt), rs in keyed.items():
        rs.sort(key=lambda r: r["d"])

        def col(key, rs=rs):
            return " / ".join(f"{1e3 * r[key]:.3g}" for r in rs)

        storage = " / ".join(str(r["storage_floats"]) for r in rs)
        lines.append(f"| {s} | {dt} | {storage} | {col('matmul_s')} | "
                     f"{col('inner_project_s')} | {col('engine_step_s')} |")
    return "\n".join(lines)


LINEAR = ("diagonal", "block_diagonal", "low_rank_diagonal", "hierarchical", "kronecker")


def sweep(dims: list[int], names: tuple[str, ...] | None, gen: torch.Generator) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for d in dims:
            for name, options in configs(d).items():
                if names is not None and name not in names:
                    continue
                rows.append(measure(name, d, options, dtype, gen))
                print(f"{name:22s} d={d:7d} {rows[-1]['dtype']:8s} "
                      f"matmul {1e3 * rows[-1]['matmul_s']:.3g} ms  "
                      f"step {1e3 * rows[-1]['engine_step_s']:.3g} ms", flush=True)
    return rows


def growth_table(rows: list[dict], dims: list[int]) -> str:
    expo = {k: growth(rows, k) for k in
            ("storage_floats", "matmul_s", "inner_project_s", "engine_step_s")}
    table = (f"Growth exponent p in cost ∝ d^p (float32, d = {dims[0]}…{dims[-1]}):\n\n"
             "| structure | storage | matmul | inner_project | engine step |\n|---|---|---|---|---|\n")
    for s in expo["matmul_s"]:
        table += (f"| {s} | {expo['storage_floats'][s]['float32']:.2f} | "
                  f"{expo['matmul_s'][s]['float32']:.2f} | "
                  f"{expo['inner_project_s'][s]['float32']:.2f} | "
                  f"{expo['engine_step_s'][s]['float32']:.2f} |\n")
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d ∈ {64, 256} only")
    parser.add_argument("--out", default=None, help="results .json path (default "
                        "benchmarks/results/structures.json, quick: benchmarks/results/quick/)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dims = [64, 256] if args.quick else [256, 1024, 4096]
    large = [1024, 16384] if args.quick else [4096, 65536, 1048576]
    gen = torch.Generator().manual_seed(0)
    rows = sweep(dims, None, gen)
    large_rows = sweep(large, LINEAR, gen)
    result = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "dims": dims,
        "rows": rows,
        "large_dims": large,
        "large_rows": large_rows,
        "growth_exponent": {k: growth(rows, k) for k in
                            ("storage_floats", "matmul_s", "inner_project_s", "engine_step_s")},
        "growth_exponent_large": {k: growth(large_rows, k) for k in
                                  ("storage_floats", "matmul_s", "inner_project_s",
                                   "engine_step_s")},
    }
    out = Path(args.out or (f"benchmarks/results/{'quick/' if args.quick else ''}"
                            "structures.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    table = markdown(rows, dims) + "\n\n" + growth_table(rows, dims)
    table += ("\nAt these sizes the cheap structures are dominated by per-call overhead; their "
              "growth shows at large d:\n\n" + markdown(large_rows, large) + "\n\n"
              + growth_table(large_rows, large))
    out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
