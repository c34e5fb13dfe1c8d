"""The generic driver handle over the in-memory pipe: the up future, the close before
it, every event to the hook in order, backpressure from the hook, and a cancelled
reader."""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from toy_protocol import Message, ToyCore

from trustmesh.errors import ConnectionClosedError
from trustmesh.io import memory_pipe
from trustmesh.io.handle import Handle
from trustmesh.sansio import Authenticated, ConnectionClosed, Event

WAIT = 5.0  # upper bound on any single wait; tests finish far sooner
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Up(Authenticated):
    """The toy peer said UP: the test's stand-in for a finished handshake."""


class UpCore(ToyCore):
    """A toy core whose ``UP`` message is its :class:`Authenticated` event."""

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        events = super().receive_data(data, now)
        return [Up() if isinstance(e, Message) and e.data == b"UP" else e for e in events]


class NotUp(Exception):
    def __init__(self, closed: ConnectionClosed) -> None:
        super().__init__(closed.reason)
        self.closed = closed


def send(data: bytes) -> Callable[[ToyCore], list[Event]]:
    return functools.partial(ToyCore.send, data=data)


async def within(awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(WAIT):
        return await awaitable


class Recorder:
    """The ``on_event`` and ``on_done`` hooks, recording what they see."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.arrived = asyncio.Event()
        self.done = 0

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.arrived.set()

    def on_done(self) -> None:
        self.done += 1


async def test_up_resolves_then_every_event_reaches_the_hook_in_order() -> None:
    here, peer = await memory_pipe(UpCore(), ToyCore())
    seen = Recorder()
    handle = Handle(here, up=Up, failure=NotUp, on_event=seen, on_done=seen.on_done)
    assert handle.up_event is None
    peer.act(send(b"UP"))
    peer.act(send(b"after"))
    assert await within(handle.wait_up()) == Up()
    assert handle.up_event == Up()
    peer.close("bye")
    closed = await within(handle.wait_closed())
    assert closed.reason == "peer said bye" and closed.by_peer
    assert handle.closed_event is closed
    assert seen.events == [Up(), Message(b"after"), closed]
    assert seen.done == 1
    assert handle.up_event == Up()  # it stays known after the close


async def test_a_close_before_up_fails_wait_up_with_the_factory_error() -> None:
    here, peer = await memory_pipe(UpCore(), ToyCore())
    handle = Handle(here, up=Up, failure=NotUp)
    peer.close("not today")
    with pytest.raises(NotUp) as failed:
        await within(handle.wait_up())
    assert failed.value.closed.reason == "peer said bye"
    assert handle.up_event is None
    assert handle.closed_event is failed.value.closed


async def test_the_default_failure_is_connection_closed_error() -> None:
    here, _ = await memory_pipe(UpCore(), ToyCore())
    handle: Handle[ToyCore, Up] = Handle(here, up=Up)
    handle.abort("given up")
    with pytest.raises(ConnectionClosedError, match="given up"):
        await within(handle.wait_up())
    closed = await within(handle.wait_closed())
    assert closed.reason == "given up" and closed.error


async def test_an_unawaited_failure_is_not_reported_as_never_retrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    here, _ = await memory_pipe(UpCore(), ToyCore())
    handle = Handle(here, up=Up, failure=NotUp)
    handle.abort("nobody asked")
    await within(handle.wait_closed())
    del handle
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_an_awaitable_from_the_hook_holds_the_next_event_back() -> None:
    here, peer = await memory_pipe(UpCore(), ToyCore())
    gate = asyncio.Event()
    seen: list[bytes] = []

    def hold_first(event: Event) -> Awaitable[object] | None:
        if isinstance(event, Message):
            seen.append(event.data)
            if len(seen) == 1:
                return gate.wait()
        return None

    handle = Handle(here, up=Up, on_event=hold_first)
    peer.act(lambda core: core.send(b"one") + core.send(b"two") + core.send(b"PING"))
    # The PONG comes from the core as soon as PING arrives, so "two" (sent before
    # PING) is in the driver by then: only the hook's awaitable holds it back.
    pong = await within(peer.next_event())
    assert pong == Message(b"PONG")
    assert seen == [b"one"]
    gate.set()
    peer.close()
    await within(handle.wait_closed())
    assert seen == [b"one", b"two"]


async def test_a_cancelled_reader_still_closes_the_handle() -> None:
    here, peer = await memory_pipe(UpCore(), ToyCore())
    seen = Recorder()
    handle = Handle(here, up=Up, failure=NotUp, on_event=seen, on_done=seen.on_done, name="toy")
    peer.act(send(b"hello"))
    await within(seen.arrived.wait())  # the reader runs: a cancel now reaches its finally
    reader: asyncio.Task[Any] = handle._reader
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(reader)
    with pytest.raises(NotUp, match="toy reader stopped"):
        await within(handle.wait_up())
    assert handle.closed_event == ConnectionClosed("toy reader stopped", error=True)
    assert seen.events == [Message(b"hello")]  # the hook sees only what the core said
    assert seen.done == 1
    handle.abort("test over")
    await within(here.wait_closed())


async def test_a_hook_that_raises_drops_its_connection_and_still_sees_the_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the application's handling of one event aborts that connection; the
    ConnectionClosed still reaches the hook, so the application holds no dead link."""
    here, peer = await memory_pipe(UpCore(), ToyCore())
    seen = Recorder()

    def buggy(event: Event) -> None:
        seen(event)
        if isinstance(event, Message) and event.data == b"boom":
            raise KeyError("a bug")

    handle = Handle(here, up=Up, failure=NotUp, on_event=buggy, on_done=seen.on_done)
    peer.act(send(b"UP"))
    peer.act(send(b"boom"))
    closed = await within(handle.wait_closed())
    assert closed.error
    assert isinstance(seen.events[-1], ConnectionClosed)
    assert any("handling Message failed" in r.getMessage() for r in caplog.records)
