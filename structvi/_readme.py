"""Fill the benchmark tables of README.md (and the docs) from ``benchmarks/results/*.md``.

No number in the README is typed by hand: every results block sits between two marker comments
and is regenerated from the results file a benchmark wrote::

    <!-- results:vi_vs_pyro -->
    ...generated, do not edit...
    <!-- /results:vi_vs_pyro -->

``<!-- results:NAME -->`` renders all of ``benchmarks/results/NAME.md``;
``<!-- results:NAME tables=2,4 -->`` renders only its 2nd and 4th tables (1-based), each with
its section heading and the paragraph that introduces it (a paragraph belongs to the next table
of its section, or to the previous one when no table follows). The file's ``#`` title becomes
the source line; ``##`` headings become bold lines. Adding a benchmark to the README is one line
pair in README.md. ``structvi readme`` rewrites the blocks, ``structvi readme --check`` fails
when they are stale, and ``structvi bench`` rewrites them after a full run.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

MARKER = re.compile(
    r"<!-- results:(?P<name>[\w.-]+)(?P<opts>[^>]*?)-->\n(?P<body>.*?)<!-- /results:(?P=name) -->",
    re.S,
)


@dataclass
class Block:
    """One block of a results file: ``kind`` is ``"title"``, ``"heading"``, ``"table"`` or
    ``"text"``."""

    kind: str
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def parse_blocks(markdown: str) -> list[Block]:
    """Split Markdown into titles, headings, tables and text paragraphs (blank lines separate)."""
    blocks: list[Block] = []
    for line in markdown.splitlines():
        stripped = line.strip()
        if not stripped:
            blocks.append(Block("blank"))
            continue
        if stripped.startswith("#"):
            level = len(stripped) - len(stripped.lstrip("#"))
            kind = "title" if level == 1 else "heading"
            blocks.append(Block(kind, [stripped.lstrip("#").strip()]))
            continue
        kind = "table" if stripped.startswith("|") else "text"
        if blocks and blocks[-1].kind == kind:
            blocks[-1].lines.append(line.rstrip())
        else:
            blocks.append(Block(kind, [line.rstrip()]))
    return [b for b in blocks if b.kind != "blank"]


def _select(blocks: list[Block], tables: list[int]) -> list[Block]:
    """The chosen tables with their heading and attached paragraphs, in file order."""
    table_ix = [i for i, b in enumerate(blocks) if b.kind == "table"]
    bad = [t for t in tables if not 1 <= t <= len(table_ix)]
    if bad:
        raise ValueError(f"tables={bad} out of range: the file has {len(table_ix)} tables")
    keep: set[int] = set()
    for t in tables:
        i = table_ix[t - 1]
        keep.add(i)
        j = i - 1
        while j >= 0 and blocks[j].kind == "text":  # introducing paragraphs
            keep.add(j)
            j -= 1
        while j >= 0 and blocks[j].kind not in ("heading", "title"):  # its section's heading
            j -= 1
        if j >= 0 and blocks[j].kind == "heading":
            keep.add(j)
        j = i + 1
        while j < len(blocks) and blocks[j].kind == "text":  # trailing notes, if no table follows
            k = j
            while k < len(blocks) and blocks[k].kind == "text":
                k += 1
            if k < len(blocks) and blocks[k].kind == "table":
                break
            keep.add(j)
            j += 1
    return [b for i, b in enumerate(blocks) if i in keep]


def render(name: str, markdown: str, tables: list[int] | None = None) -> str:
    """The README block for results file ``name`` with content ``markdown``."""
    blocks = parse_blocks(markdown)
    title = next((b.text for b in blocks if b.kind == "title"), None)
    body = [b for b in blocks if b.kind != "title"]
    if tables:
        body = _select(body, tables)
    source = f"`benchmarks/results/{name}.md`" + (f" — {title}" if title else "")
    out = [f"<sub>Generated from {source}; regenerate with `structvi readme`.</sub>"]
    out += [f"**{b.text}**" if b.kind == "heading" else b.text for b in body]
    return "\n\n".join(out)


def _options(text: str) -> dict[str, list[int]]:
    opts: dict[str, list[int]] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if key != "tables" or not sep:
            raise ValueError(f"unknown results-marker option {token!r}; expected tables=1,2,...")
        opts["tables"] = [int(v) for v in value.split(",") if v]
    return opts


def update_text(text: str, results_dir: Path) -> str:
    """``text`` with every results block regenerated from ``results_dir``."""

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        path = Path(results_dir) / f"{name}.md"
        if not path.is_file():
            raise FileNotFoundError(
                f"results marker {name!r}: {path} not found; run `structvi bench {name}` first "
                f"or remove the marker"
            )
        block = render(name, path.read_text(encoding="utf-8"), **_options(match["opts"]))
        return f"<!-- results:{name}{match['opts']}-->\n{block}\n<!-- /results:{name} -->"

    return MARKER.sub(fill, text)


def markers(text: str) -> list[str]:
    """The results names referenced by markers in ``text``."""
    return [m["name"] for m in MARKER.finditer(text)]


def update_file(path: Path, results_dir: Path, check: bool = False) -> bool:
    """Regenerate the blocks of ``path``; returns whether it changed (``check``: do not write)."""
    old = Path(path).read_text(encoding="utf-8")
    new = update_text(old, results_dir)
    if new != old and not check:
        Path(path).write_text(new, encoding="utf-8")
    return new != old


def copy_figures(results_dir: Path, dest: Path, check: bool = False) -> list[str]:
    """Copy ``results_dir/*.png`` into ``dest`` (the docs' figures); returns names that differed."""
    changed = []
    for png in sorted(Path(results_dir).glob("*.png")):
        target = Path(dest) / png.name
        if not target.is_file() or target.read_bytes() != png.read_bytes():
            changed.append(png.name)
            if not check:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, target)
    return changed


def update_checkout(root: Path, check: bool = False) -> list[str]:
    """Regenerate README.md, docs/benchmarks.md and docs' result figures of a checkout.

    Returns the paths (relative to ``root``) that changed (or would change with ``check``).
    """
    root = Path(root)
    results = root / "benchmarks" / "results"
    changed = [str(p.relative_to(root)) for p in (root / "README.md", root / "docs" / "benchmarks.md")
               if p.is_file() and update_file(p, results, check)]
    changed += [f"docs/assets/results/{n}" for n in
                copy_figures(results, root / "docs" / "assets" / "results", check)]
    return changed
