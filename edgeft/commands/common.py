"""What the sub-commands share: list-valued flags, and running a command so that an ``EdgeftError`` is a
one-line message and exit code 2 instead of a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from edgeft.errors import EdgeftError


def csv_list(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def labels(value: str | None) -> tuple[str, ...]:
    """Labels from a JSON list file, a text file (one per line) or a comma-separated list."""
    if not value:
        return ()
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        return tuple(json.loads(text)) if path.suffix == ".json" else tuple(l for l in text.splitlines() if l.strip())
    return csv_list(value) or ()


def execute(command: str, run: Callable[[], int]) -> int:
    """``run()``'s exit code; an EdgeftError is printed as ``edgeft COMMAND: error: ...`` and exits with 2."""
    try:
        return int(run())
    except EdgeftError as exc:
        print(f"edgeft {command}: error: {exc}", file=sys.stderr)
        return 2
