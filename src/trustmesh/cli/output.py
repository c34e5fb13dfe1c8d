"""How commands report: JSON (one object per line) or short human-readable lines."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit(data: dict[str, Any], *, as_json: bool, human: str | None = None) -> None:
    """Print ``data`` as one JSON line, or ``human`` (default: ``key: value`` lines)."""
    if as_json:
        sys.stdout.write(json.dumps(data, separators=(",", ":"), sort_keys=False) + "\n")
    elif human is not None:
        sys.stdout.write(human.rstrip("\n") + "\n")
    else:
        width = max((len(k) for k in data), default=0)
        for key, value in data.items():
            sys.stdout.write(f"{key.ljust(width)}  {value}\n")
    sys.stdout.flush()
