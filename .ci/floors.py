"""Print a pip constraints file pinning each of modes' runtime dependencies at the lowest version
its pyproject range allows, so CI tests the floor of every range it declares, not only the top."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def floors() -> list[str]:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = []
    for requirement in dependencies:
        match = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([\d.]+)", requirement)
        if match is None:
            raise SystemExit(f"{requirement!r} declares no lower bound: give it one (name>=X)")
        pins.append(f"{match.group(1)}=={match.group(3)}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors()))
