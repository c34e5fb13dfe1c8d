"""The application's side of one :class:`~trustmesh.io.stream.StreamDriver` connection.

BOTD's :class:`~trustmesh.io.botd.Channel`, Catalyst's
:class:`~trustmesh.io.catalyst.Session` and the mesh node's
:class:`~trustmesh.node.links.Link` are each a :class:`Handle` plus what their protocol
adds (an inbox, listeners, the frames a link sends).

    handle = Handle(driver, up=HandshakeComplete, failure=lambda c: MyError(c.reason))
    event = await handle.wait_up()       # the peer is proven, or MyError
    closed = await handle.wait_closed()  # the socket is released, every event taken
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from trustmesh.errors import ConnectionClosedError
from trustmesh.io.stream import CoreT, StreamDriver
from trustmesh.sansio import Authenticated, ConnectionClosed, Event

__all__ = ["Handle", "UpT"]

UpT = TypeVar("UpT", bound=Authenticated)
log = logging.getLogger("trustmesh.io")

EventHook = Callable[[Event], Awaitable[object] | None]


def _closed_error(event: ConnectionClosed) -> BaseException:
    return ConnectionClosedError(event.reason)


class Handle(Generic[CoreT, UpT]):
    """A reader task takes every event from ``driver``, whether or not the application
    looks, so the core's replies and timers keep running.

    The first ``up`` event (the core's :class:`~trustmesh.sansio.Authenticated` one)
    resolves :meth:`wait_up`; a close before it fails :meth:`wait_up` with
    ``failure(close_event)``. ``on_event(event)`` then sees each event; when it returns
    an awaitable, the reader awaits it before taking the next event, which is how an
    application applies backpressure. ``on_done()`` runs once the reader has stopped,
    with :attr:`closed_event` set. ``name`` goes into the reason given when the reader
    is cancelled before the close event came.
    """

    def __init__(
        self,
        driver: StreamDriver[CoreT],
        *,
        up: type[UpT],
        failure: Callable[[ConnectionClosed], BaseException] = _closed_error,
        on_event: EventHook | None = None,
        on_done: Callable[[], None] | None = None,
        name: str = "handle",
    ) -> None:
        self.driver = driver
        self.closed_event: ConnectionClosed | None = None
        self._up_type = up
        self._failure = failure
        self._event_hook = on_event
        self._done_hook = on_done
        self._name = name
        loop = asyncio.get_running_loop()
        self._up: asyncio.Future[UpT] = loop.create_future()
        # Last: the reader may call the hooks, so everything they use must exist.
        self._reader = loop.create_task(self._read())

    @property
    def up_event(self) -> UpT | None:
        """The event that proved the peer, once it came (the connection may be closed
        since)."""
        up = self._up
        return up.result() if up.done() and up.exception() is None else None

    async def wait_up(self) -> UpT:
        """Wait until the peer is proven; raise ``failure(close_event)`` if the
        connection closes first."""
        return await asyncio.shield(self._up)

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the socket is released and the reader has taken every event."""
        event = await self.driver.wait_closed()
        await asyncio.shield(self._reader)
        return event

    def abort(self, reason: str) -> None:
        """Drop the connection at once, without the protocol's goodbye."""
        self.driver.abort(reason)

    async def _read(self) -> None:
        driver = self.driver
        try:
            while True:
                # Take what one read produced without a coroutine per event; wait only
                # when nothing is queued.
                event = driver.poll_event()
                if event is None:
                    try:
                        event = await driver.next_event()
                    except ConnectionClosedError:
                        break
                if isinstance(event, self._up_type) and not self._up.done():
                    self._up.set_result(event)
                elif isinstance(event, ConnectionClosed):
                    self._set_closed(event)
                try:
                    waiting = self._event_hook(event) if self._event_hook is not None else None
                except Exception:
                    # A bug in the application's handling: this one connection goes (as
                    # the driver does for a core's bug), and its ConnectionClosed still
                    # reaches the application, so nothing is left holding a dead link.
                    log.exception("%s: handling %s failed", self._name, type(event).__name__)
                    self.driver.abort("internal error handling an event")
                    continue
                if waiting is not None:
                    await waiting
                if isinstance(event, ConnectionClosed):
                    break  # the last event
        finally:
            if self.closed_event is None:  # cancelled: the driver is going away
                self._set_closed(ConnectionClosed(f"{self._name} reader stopped", error=True))
            if self._done_hook is not None:
                self._done_hook()

    def _set_closed(self, event: ConnectionClosed) -> None:
        self.closed_event = event
        if not self._up.done():
            self._up.set_exception(self._failure(event))
            self._up.exception()  # retrieved: nobody may be waiting
