"""README and docs benchmark tables are generated from benchmarks/results (none typed by hand)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from structvi import _readme

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
REQUIRED = {"structures", "vi_vs_pyro", "vi_scaling", "pyro_path", "optim_digits"}


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md"])
def test_tables_equal_what_the_results_files_render(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    assert REQUIRED <= set(_readme.markers(text)), "a results file is not quoted"
    assert _readme.update_text(text, RESULTS) == text, (
        f"{page} is stale: run `structvi readme` (tables come from benchmarks/results/*.md)")


def test_docs_result_figures_are_the_results_figures():
    assert _readme.copy_figures(RESULTS, ROOT / "docs" / "assets" / "results", check=True) == []


def test_no_number_typed_by_hand_in_the_benchmark_section():
    """Regression: the old README quoted benchmark numbers in prose."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Benchmarks"):text.index("## ", text.index("## Benchmarks") + 3)]
    prose = _readme.MARKER.sub("", section)
    prose = re.sub(r"`[^`]*`", "", prose)  # code spans: command names, `tables=…`
    numbers = re.findall(r"(?<![A-Za-z_\d])\d[\d.,]*", prose)  # not bf16, fp32
    assert numbers == [], f"numbers typed into the README benchmark prose: {numbers}"


RESULTS_MD = """# Demo (full; torch 2)

Intro paragraph.

## First

| a | b |
|---|---|
| 1 | 2 |

Note on the first table.

## Second

Caption of the second table:

| c |
|---|
| 3 |

| d |
|---|
| 4 |
"""


def test_render_whole_file():
    out = _readme.render("demo", RESULTS_MD)
    assert out.startswith("<sub>Generated from `benchmarks/results/demo.md` — Demo (full; "
                          "torch 2); regenerate with `structvi readme`.</sub>")
    assert "**First**" in out and "## First" not in out and "# Demo" not in out
    assert out.count("|---|") == 3 and "Intro paragraph." in out


def test_render_selected_tables_with_their_heading_and_paragraphs():
    out = _readme.render("demo", RESULTS_MD, tables=[1, 3])
    assert "**First**" in out and "| 1 | 2 |" in out and "Note on the first table." in out
    assert "| 4 |" in out and "**Second**" in out
    assert "| 3 |" not in out and "Caption of the second table" not in out
    assert "Intro paragraph." not in out
    only2 = _readme.render("demo", RESULTS_MD, tables=[2])
    assert "Caption of the second table:" in only2 and "| 3 |" in only2 and "| 4 |" not in only2


def test_update_text_fills_and_is_idempotent(tmp_path):
    (tmp_path / "demo.md").write_text(RESULTS_MD)
    text = "x\n<!-- results:demo tables=2 -->\nstale\n<!-- /results:demo -->\ny\n"
    once = _readme.update_text(text, tmp_path)
    assert "stale" not in once and "| 3 |" in once and once.endswith("<!-- /results:demo -->\ny\n")
    assert _readme.update_text(once, tmp_path) == once
    path = tmp_path / "README.md"
    path.write_text(text)
    assert _readme.update_file(path, tmp_path, check=True) and path.read_text() == text
    assert _readme.update_file(path, tmp_path) and path.read_text() == once


def test_bad_markers_are_reported(tmp_path):
    (tmp_path / "demo.md").write_text(RESULTS_MD)
    with pytest.raises(FileNotFoundError, match="results marker 'missing'.*structvi bench"):
        _readme.update_text("<!-- results:missing -->\n<!-- /results:missing -->", tmp_path)
    with pytest.raises(ValueError, match=r"tables=\[4\] out of range: the file has 3 tables"):
        _readme.update_text("<!-- results:demo tables=4 -->\n<!-- /results:demo -->", tmp_path)
    with pytest.raises(ValueError, match="unknown results-marker option 'rows=1'"):
        _readme.update_text("<!-- results:demo rows=1 -->\n<!-- /results:demo -->", tmp_path)
