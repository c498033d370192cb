"""The README's first Python example runs as written and skips some but not all slots."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_as_written():
    example = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    assert len(example.strip().splitlines()) <= 12
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(example, "README.md", "exec"), {})
    ratio = float(output.getvalue().splitlines()[-1].split()[0])
    assert 0 < ratio < 1
