"""Which asyncio event loop trustmesh runs on: uvloop when it is installed
(``pip install trustmesh[fast]``), asyncio's own otherwise.

One place decides, for the command line (:func:`installed` around each run of it) and
the benchmarks (:func:`run`). ``TRUSTMESH_NO_UVLOOP=1`` keeps asyncio's loop even when
uvloop is installed. Library users pick their own loop; nothing here runs on import.

    from trustmesh import eventloop as loop

    loop.run(main())        # on uvloop when available
    loop.event_loop_name()  # "uvloop" or "asyncio"
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
from collections.abc import Coroutine, Iterator
from types import ModuleType
from typing import Any, TypeVar

__all__ = ["NO_UVLOOP_ENV", "event_loop_name", "installed", "new_event_loop", "run"]

NO_UVLOOP_ENV = "TRUSTMESH_NO_UVLOOP"
T = TypeVar("T")


def _uvloop() -> ModuleType | None:
    if os.environ.get(NO_UVLOOP_ENV, "") not in ("", "0"):
        return None
    try:
        return importlib.import_module("uvloop")
    except ImportError:
        return None


def event_loop_name() -> str:
    """``"uvloop"`` when :func:`new_event_loop` makes uvloop loops, else ``"asyncio"``."""
    return "uvloop" if _uvloop() is not None else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the chosen kind."""
    uvloop = _uvloop()
    if uvloop is None:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a loop of the chosen kind."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


@contextlib.contextmanager
def installed() -> Iterator[str]:
    """Within the block, ``asyncio.run`` uses the chosen loop (through the event loop
    policy, restored afterwards); yields the loop's name. Python 3.14 deprecates
    policies: there the block keeps asyncio's loop."""
    uvloop = _uvloop()
    if uvloop is None or sys.version_info >= (3, 14):
        yield "asyncio"
        return
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield "uvloop"
    finally:
        asyncio.set_event_loop_policy(previous)
