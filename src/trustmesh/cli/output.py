"""How commands report: JSON (one object per line) or short human-readable lines."""

from __future__ import annotations

import asyncio
import json
import os
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
    """Lines of stdin (None at its end), read by a daemon thread with ``os.read``. Not
    through ``sys.stdin``: a thread blocked reading its buffer holds the buffer's lock,
    and the interpreter's shutdown then aborts (``_enter_buffered_busy``) when connect
    exits while stdin is still open (the channel closed, or --once is done)."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def put(item: bytes | None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads any more
            return False
        return True

    def pump() -> None:
        pending = b""
        try:
            while chunk := os.read(0, 65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if not put(line.rstrip(b"\r")):
                        return
        except OSError:
            pass  # stdin closed or unreadable: its end
        if pending:
            put(pending.rstrip(b"\r"))
        put(None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return queue
