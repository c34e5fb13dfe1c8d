"""The worker threads the CA API makes its store calls on (when they may block: a
database on another machine, a key on a token), so that the event loop never waits.

Bounded three ways: a fixed number of threads; at most ``max_pending`` calls admitted
at once (the next is refused at once with :class:`StoreUnavailable`, a 503, instead of
queueing without end while the database is away); and a deadline per call, after which
its caller gets a 503 and the call, if it has not started yet, never runs (it would act
on a request whose client was already told no, at a time it did not ask for).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from trustmesh.pki.errors import StoreUnavailable

T = TypeVar("T")

THREADS = 8  # a PostgreSQL store's pool has as many connections
MAX_PENDING = 64  # calls admitted at once: running, or waiting for a thread


class _Abandoned(Exception):
    """The caller gave up before the call started."""


class StoreWorkers:
    def __init__(self, threads: int = THREADS, max_pending: int = MAX_PENDING) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="ca-store")
        self.max_pending = max_pending
        self.pending = 0  # admitted and not finished (touched on the event loop only)

    async def run(self, call: Callable[[], T], *, deadline: float) -> T:
        """``call()`` on a worker thread; :class:`StoreUnavailable` when too many calls
        are admitted already, or when it has not returned within ``deadline`` seconds."""
        if self.pending >= self.max_pending:
            raise StoreUnavailable(
                f"the CA is busy: {self.pending} requests already wait for its database"
            )
        abandoned = threading.Event()

        def job() -> T:
            if abandoned.is_set():
                raise _Abandoned
            return call()

        self.pending += 1
        work = asyncio.get_running_loop().run_in_executor(self._executor, job)
        work.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(work), deadline)
        except TimeoutError:
            if work.done():  # it finished just as the deadline passed
                return work.result()
            abandoned.set()
            raise StoreUnavailable(
                f"the CA database did not answer within {deadline:g} s"
            ) from None
        except asyncio.CancelledError:
            abandoned.set()
            raise

    def _finished(self, work: asyncio.Future[Any]) -> None:
        self.pending -= 1
        if not work.cancelled():
            work.exception()  # retrieved: a call nobody waits for any more logs nothing

    def shutdown(self) -> None:
        """Wait for the calls under way (a transaction is finished, not torn off); the
        ones not started are dropped."""
        self._executor.shutdown(wait=True, cancel_futures=True)
