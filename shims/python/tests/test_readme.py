"""The README's Python example ("Python engines") runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"


def test_the_readme_example_runs() -> None:
    text = README.read_text()
    section = text[text.index("## Python engines") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("```", start)]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == ["[1] None", "[2] None", "[3] None"]
    assert lines[3].startswith('Record(request_id="r1", outcome="finished"')
    assert lines[4] == "[] length"
