"""The CA API's worker threads for store calls: a bounded number admitted at once, a
deadline per call, and a call whose caller gave up before it started never runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from trustmesh.api.store_workers import StoreWorkers
from trustmesh.pki.errors import StoreUnavailable

WAIT = 10.0


async def test_calls_beyond_the_bound_are_refused_at_once() -> None:
    workers = StoreWorkers(threads=2, max_pending=2)
    release = threading.Event()
    try:
        held = [asyncio.create_task(workers.run(lambda: release.wait(WAIT), deadline=WAIT))]
        held.append(asyncio.create_task(workers.run(lambda: release.wait(WAIT), deadline=WAIT)))
        await asyncio.sleep(0)  # both admitted (run's first step)
        assert workers.pending == 2
        with pytest.raises(StoreUnavailable, match="busy"):
            await workers.run(lambda: "never", deadline=WAIT)
        release.set()
        assert await asyncio.gather(*held) == [True, True]
        assert workers.pending == 0
        assert await workers.run(lambda: "again", deadline=WAIT) == "again"
    finally:
        release.set()
        await asyncio.to_thread(workers.shutdown)


async def test_a_call_whose_caller_gave_up_never_runs() -> None:
    workers = StoreWorkers(threads=1, max_pending=8)
    release, ran = threading.Event(), threading.Event()
    try:
        first = asyncio.create_task(workers.run(lambda: release.wait(WAIT), deadline=WAIT))
        await asyncio.sleep(0)
        with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.05 s"):
            await workers.run(ran.set, deadline=0.05)  # queued behind the first
        release.set()
        assert await first is True
        await asyncio.to_thread(workers.shutdown)  # every queued job has had its turn
        assert not ran.is_set()
        assert workers.pending == 0
    finally:
        release.set()
