"""The README's quick start runs as printed (keeps the README true)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Quick start"):text.index("## Structures")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README quick start", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] in ("plateau", "steps")
