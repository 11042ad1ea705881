"""``structvi demo``: the bundled demos (``structvi.demos``) on the bundled data."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

# name → (module in structvi.demos, one-line description)
DEMOS: dict[str, tuple[str, str]] = {
    "logistic": ("logistic", "Bayesian logistic regression: 3 structures vs Pyro autoguides"),
    "bnn": ("bnn", "Pyro BNN on digits: Kronecker NGD vs AutoNormal + Adam (calibration)"),
    "optimizer": ("optimizer", "StructuredNGD vs AdamW on a digits CNN"),
}


def run_demos(names: list[str], out: Path, quick: bool, progress: bool) -> list[Path]:
    """Run the named demos (all when empty); write their PNGs and ``summary.md`` into ``out``.

    Returns the paths of the written files.
    """
    out.mkdir(parents=True, exist_ok=True)
    sections, written = [], []
    start = time.perf_counter()
    for name in names or list(DEMOS):
        module_name, title = DEMOS[name]
        print(f"\n=== demo {name}: {title} ===", flush=True)
        module = importlib.import_module(f"structvi.demos.{module_name}")
        t0 = time.perf_counter()
        result = module.run(out, quick=quick, show=progress)
        seconds = time.perf_counter() - t0
        print(f"saved {result['png']}  ({seconds:.1f} s)", flush=True)
        written.append(Path(result["png"]))
        sections.append(f"## {title}\n\n{result['table']}\n\n![{name}]({Path(result['png']).name})")
    summary = out / "summary.md"
    total = time.perf_counter() - start
    summary.write_text(f"# structvi demo{' (quick)' if quick else ''}\n\n"
                       + "\n\n".join(sections) + f"\n\nTotal {total:.0f} s.\n", encoding="utf-8")
    written.append(summary)
    print(f"\nwrote {summary} ({total:.0f} s in all)")
    return written
