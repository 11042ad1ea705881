"""``structvi info`` (environment) and ``structvi structures`` (the registry)."""

from __future__ import annotations

import importlib.metadata
import inspect
import platform
import re
import sys
from typing import Any

import torch

PACKAGES = ("structvi", "torch", "pyro-ppl", "arviz", "numpy", "scipy", "matplotlib", "tqdm",
            "scikit-learn", "singd", "ivon-opt", "mkdocs")

# Options used only to measure storage at d = 1024 for structures that require options.
EXAMPLE_OPTIONS: dict[str, dict[str, Any]] = {
    "block_diagonal": {"block_size": 32},
    "low_rank_diagonal": {"rank": 8},
    "hierarchical": {"k1": 8, "k2": 8},
    "kronecker": {"dims": (32, 32)},
    "block_sites": {"blocks": [{"name": "dense", "dim": 32}, {"name": "diagonal", "dim": 992}]},
}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _bf16_cpu() -> bool:
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        return bool((a @ a)[0, 0] == 4)
    except RuntimeError:
        return False


def info_lines() -> list[str]:
    """Versions, threads and accelerator availability, one ``key: value`` per line."""
    lines = [f"python: {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"{name}: {_version(name)}" for name in PACKAGES]
    lines.append(f"torch threads: {torch.get_num_threads()} intra-op, "
                 f"{torch.get_num_interop_threads()} inter-op")
    lines.append(f"bf16 on CPU: {'yes' if _bf16_cpu() else 'no'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
        lines.append(f"bf16 on CUDA: {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        lines.append(f"CUDA: not available (torch built with CUDA {torch.version.cuda})")
    mps = getattr(torch.backends, "mps", None)
    lines.append(f"MPS: {'available' if mps is not None and mps.is_available() else 'not available'}")
    return lines


def _options(cls: type) -> str:
    """Option names and descriptions from the class docstring's ``Args`` (not dim/tensors)."""
    doc = inspect.getdoc(cls) or ""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    found = re.findall(r"^    (\w+): (.+?)(?=^    \w+:|\Z|^\S)", args, re.S | re.M)
    opts = [f"{k}: {' '.join(v.split()).rstrip('.')}" for k, v in found if k not in ("dim", "tensors", "kind")]
    if not opts:
        module_doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
        match = re.search(r"Options: (.+?\.)(?:\s|$)", " ".join(module_doc.split()))
        opts = [match.group(1)] if match else []
    return "; ".join(opts) or "—"


def _cost(cls: type) -> str:
    """The module docstring's sentences on storage and cost."""
    doc = " ".join((inspect.getdoc(sys.modules[cls.__module__]) or "").split())
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z`*:])", doc)
    keep = [s for s in sentences if re.search(r"\bStorage\b|\bcosts?\b|O\(", s)]
    return " ".join(keep) or "see the module docstring"


def _storage(name: str, cls: type, dim: int = 1024) -> str:
    try:
        s = cls.identity(dim, dtype=torch.float32, **EXAMPLE_OPTIONS.get(name, {}))
    except (TypeError, ValueError):
        return "—"
    opts = ", ".join(f"{k}={v}" for k, v in EXAMPLE_OPTIONS.get(name, {}).items()
                     if k != "blocks")
    return f"{s.num_params()}" + (f" ({opts})" if opts else "")


def structure_rows() -> list[dict[str, str]]:
    """One row per registered structure: name, summary, options, storage at d = 1024, cost."""
    from structvi.structures import STRUCTURES

    rows = []
    for name, cls in sorted(STRUCTURES.items()):
        doc = (inspect.getdoc(sys.modules[cls.__module__]) or "").strip()
        summary = " ".join(doc.split("\n\n")[0].split())
        rows.append({"name": name, "summary": summary, "options": _options(cls),
                     "storage_d1024": _storage(name, cls), "cost": _cost(cls)})
    return rows


def format_structures(rows: list[dict[str, str]], markdown: bool) -> str:
    """Plain text (one block per structure) or a Markdown table."""
    if markdown:
        lines = ["| name | options | floats at d = 1024 | storage and cost |", "|---|---|---|---|"]
        lines += [f"| `{r['name']}` | {r['options']} | {r['storage_d1024']} | {r['cost']} |"
                  for r in rows]
        return "\n".join(lines)
    blocks = [f"{r['name']}: {r['summary']}\n  options: {r['options']}\n"
              f"  floats stored at d = 1024: {r['storage_d1024']}\n  storage and cost: {r['cost']}"
              for r in rows]
    return "\n\n".join(blocks)
