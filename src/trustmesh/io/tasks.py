"""Background tasks a driver owns, and bounded waits at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger("trustmesh.io")


class TaskSet:
    """Tasks started by one owner; each leaves the set when it ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[None]] = set()

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self, seconds: float, what: str) -> bool:
        """Cancel them all and wait at most ``seconds`` for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return await within(seconds, *tasks, what=what)


async def within(seconds: float, *waits: Awaitable[object], what: str = "") -> bool:
    """Wait for all of ``waits`` (their errors ignored) for at most ``seconds``; say so
    (if ``what``) when they do not finish, rather than hang a shutdown."""
    if not waits:
        return True
    futures = [asyncio.ensure_future(w) for w in waits]
    _, pending = await asyncio.wait(futures, timeout=seconds)
    for future in futures:
        if future.done() and not future.cancelled():
            future.exception()  # retrieved: a shutdown reports nothing more
    if pending and what:
        log.warning("shutdown: %d of %s did not finish within %g s", len(pending), what, seconds)
    return not pending
