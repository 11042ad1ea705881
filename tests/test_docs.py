"""The documentation site builds with `mkdocs build --strict` and its pages stay true."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_mkdocs_build_strict_without_warnings(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None or (
                "." in module and importlib.util.find_spec(module) is None):
            pytest.skip(f"{module} is not installed (pip install -e '.[test]' installs mkdocs, "
                        f"mkdocs-material and mkdocstrings[python])")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                          "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stdout + res.stderr
    site = tmp_path / "site"
    assert (site / "index.html").is_file() and (site / "api" / "structvi" / "index.html").is_file()
    api = (site / "api" / "optim" / "index.html").read_text(encoding="utf-8")
    assert "StructuredNGD" in api and "damping" in api  # generated from the docstrings


def test_every_structure_has_a_page_and_a_pattern_figure():
    from structvi import STRUCTURES

    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for name in STRUCTURES:
        assert (DOCS / "assets" / "structures" / f"{name}.png").is_file(), name
        page = "lower_triangular" if name == "upper_triangular" else name
        assert (DOCS / "structures" / f"{page}.md").is_file(), name
        assert f"structures/{page}.md" in nav, name
        assert f"assets/structures/{name}.png" in (DOCS / "structures" / f"{page}.md").read_text()


def test_pages_cite_no_file_outside_the_repository():
    """Regression: the old pages cited MATH.md / DESIGN.md, which are not in the repository."""
    for page in DOCS.rglob("*.md"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"MATH|DESIGN\.md", text), page


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("page", sorted((DOCS / "structures").glob("*.md")), ids=lambda p: p.stem)
def test_structure_page_code_runs(page):
    for code in _python_blocks(page):
        namespace: dict = {}
        exec(compile(code, str(page), "exec"), namespace)
        q = namespace["q"] if "q" in namespace else None
        if q is not None and hasattr(q, "covariance_matrix"):
            assert q.covariance_matrix.shape == (q.event_shape[0],) * 2


def test_tutorial_code_compiles():
    pages = [DOCS / "index.md", *sorted((DOCS / "tutorials").glob("*.md"))]
    blocks = [(p, c) for p in pages for c in _python_blocks(p)]
    assert len(blocks) >= 5
    for page, code in blocks:
        compile(code, str(page), "exec")


def test_figure_script_draws_a_structure(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_figures", DOCS / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ASSETS", tmp_path)
    path = module.structure_figure("low_rank_diagonal")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    K = module.generic_factor("low_rank_diagonal")
    assert (K[3:, :3] == 0).all() and (K[3:, 3:] == K[3:, 3:].diag().diag()).all()


def test_sources_hold_no_control_characters():
    """Regression: a ``\\frac`` written through a non-raw string became a form feed + ``rac``
    in a docstring of structvi/_fit_rules.py (rendered as ``rac{...}``)."""
    bad = [str(p.relative_to(ROOT)) for top in ("structvi", "benchmarks", "examples", "tests",
                                                "docs")
           for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".md")
           and any(c in p.read_text(encoding="utf-8") for c in "\x0b\x0c\x07\x08")]
    assert not bad, bad
