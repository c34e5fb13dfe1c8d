"""How commands report: JSON (one object per line) or short human-readable lines."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
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


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[bytes | None]:
    """Lines of stdin, read by a daemon thread (a blocked read must not hold up exit)."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin.buffer:
            loop.call_soon_threadsafe(queue.put_nowait, line.rstrip(b"\r\n"))
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return queue
