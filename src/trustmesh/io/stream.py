"""The asyncio stream driver: runs any :class:`~trustmesh.sansio.StreamCore` over a transport.

It pumps bytes between a transport and the core, arms the core's timer, turns the
core's :class:`~trustmesh.sansio.ConnectionClosed` into closing the transport, and
applies backpressure: ``drain()`` holds writers above the high-water mark, and reading
stops while the application has not taken ``max_pending_events`` events (or their
payloads pass ``max_queued_bytes``) or while the core's unsent output passes
``READ_PAUSE_FACTOR`` high-water marks.

Every connection runs under a :class:`~trustmesh.io.limits.ResourcePolicy`: a peer
whose unsent output passes ``max_write_buffer``, or that keeps writing paused for
``write_stall_timeout``, is dropped; an accepted connection that sends nothing within
``idle_timeout``, or is not authenticated (its core's
:class:`~trustmesh.sansio.Authenticated` event) within ``handshake_timeout``, is
dropped too. No protocol logic lives here; see docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, Protocol, Self, TypeVar, cast

from trustmesh.errors import ConnectionClosedError, ProtocolError
from trustmesh.io.limits import Admission, LimitStats, ResourcePolicy
from trustmesh.io.listener import Listener
from trustmesh.sansio import Authenticated, ConnectionClosed, Event, StreamCore

log = logging.getLogger("trustmesh.io")

CoreT = TypeVar("CoreT", bound=StreamCore)

DEFAULT_HIGH_WATER = 256 * 1024
CLIENT_STATS = LimitStats("outbound connections")  # limits hit on connections we opened
# Reading stops when unsent output passes this many high-water marks. Writers that
# await drain() stay below one mark, so only output the core makes by itself (replies
# to a peer that does not read) gets here; a lower bound would deadlock two peers that
# both send in bulk.
READ_PAUSE_FACTOR = 4
# With ``coalesce_writes``, what the application's actions produce is written once per
# event-loop turn, or as soon as this much of it waits: many small messages, one send().
COALESCE_LIMIT = 256 * 1024
ABANDON_AFTER = 1.0  # at shutdown, seconds an accepted connection has to start or be dropped
DEFAULT_CLOSE_TIMEOUT = 10.0  # an orderly close that has not finished by then is aborted


class StreamDriver(asyncio.BaseProtocol, Generic[CoreT]):
    """One connection: a transport on one side, a sans-IO core on the other.

    An ``asyncio.Protocol`` in all but name: it derives from ``BaseProtocol`` only so
    that :class:`BufferedStreamDriver` can be a ``BufferedProtocol`` (uvloop reads into
    a protocol's buffer only when it is not an ``asyncio.Protocol``).
    """

    def __init__(
        self,
        core: CoreT,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
        max_pending_events: int | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        policy: ResourcePolicy | None = None,
        admission: Admission | None = None,
        coalesce_writes: bool = False,
    ) -> None:
        self.core = core
        self._loop = asyncio.get_running_loop()
        self._policy = policy or (admission.policy if admission else ResourcePolicy())
        self._admission = admission  # our place in a listener's table (accepted only)
        self._stats = admission.stats if admission else CLIENT_STATS
        self._high_water = high_water
        self._max_pending = max_pending_events or self._policy.max_queued_events
        self._queued_bytes = 0  # payload bytes of the events in self._events
        self._close_timeout = close_timeout
        self._guard: asyncio.TimerHandle | None = None  # idle / handshake deadline
        self._stall: asyncio.TimerHandle | None = None  # writing paused too long
        self._heard = False  # any byte from the peer yet
        self._handshake_deadline = 0.0
        self._linger: asyncio.TimerHandle | None = None
        self._eof = False
        self._transport: asyncio.Transport | None = None
        self._events: collections.deque[Event] = collections.deque()
        self._event_ready = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._write_paused = False
        self._reading_paused = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed: asyncio.Future[ConnectionClosed] = self._loop.create_future()
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self._transport_gone: asyncio.Future[None] = self._loop.create_future()
        self._delivered_close = False
        # coalesce_writes: output of application actions not yet handed to the transport
        self._coalesce = coalesce_writes
        self._unsent: list[bytes] = []
        self._unsent_bytes = 0
        # a core that hands out its output as a list of frames (BOTD): see _flush
        self._chunks: Callable[[], list[bytes]] | None = getattr(core, "chunks_to_send", None)
        self._flush_soon: asyncio.Handle | None = None
        # The write buffer can pass max_write_buffer without pausing writing first only if
        # the high-water mark lies above it.
        self._always_check_buffer = high_water >= self._policy.max_write_buffer

    # --- application side -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.done()

    @property
    def policy(self) -> ResourcePolicy:
        """The resource policy this connection runs under."""
        return self._policy

    @property
    def writing_paused(self) -> bool:
        """The transport's send buffer is above the high-water mark."""
        return self._write_paused

    @property
    def reading_paused(self) -> bool:
        """The driver has stopped reading (send buffer full, or events not taken)."""
        return self._reading_paused

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._transport.get_extra_info(name, default) if self._transport else default

    async def wait_connected(self) -> None:
        await asyncio.shield(self._connected)

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the connection is closed and its socket released; return why.

        After an orderly close that waits at most ``close_timeout`` for the peer to take
        the last bytes, then the connection is aborted.
        """
        event = await asyncio.shield(self._closed)
        await asyncio.shield(self._transport_gone)
        return event

    async def next_event(self) -> Event:
        """The next event from the core. The last one is a ``ConnectionClosed``;
        asking again after it raises :class:`ConnectionClosedError`."""
        while not self._events:
            if self._closed.done() and self._delivered_close:
                raise ConnectionClosedError(self._closed.result().reason)
            self._event_ready.clear()
            await self._event_ready.wait()
        return self._take()

    def poll_event(self) -> Event | None:
        """The next event if one is waiting, else ``None`` (without waiting): a reader
        drains what one read produced without a coroutine per event."""
        return self._take() if self._events else None

    def _take(self) -> Event:
        event = self._events.popleft()
        self._queued_bytes -= event.payload_size()
        if isinstance(event, ConnectionClosed):
            self._delivered_close = True
        if self._reading_paused:  # taking events can only make room, never take it
            self._update_reading()
        return event

    def __aiter__(self) -> StreamDriver[CoreT]:
        return self

    async def __anext__(self) -> Event:
        if self._delivered_close:
            raise StopAsyncIteration
        return await self.next_event()

    def act(self, action: Callable[[CoreT], list[Event] | None]) -> None:
        """Run an application action on the core (``lambda core: core.send(b)``), then
        flush what it produced. Raises :class:`ConnectionClosedError` once closed.

        An exception the action raises (a message too large, a channel not ready) goes
        to the caller and the connection stays up: a core validates an action before it
        changes any state.
        """
        if self._closed.done():
            raise ConnectionClosedError(self._closed.result().reason)
        events = action(self.core)
        try:
            self._process(events or (), soon=self._coalesce)
        except Exception as exc:
            self._failed(exc)

    async def drain(self) -> None:
        """Wait until the transport's send buffer is below the low-water mark."""
        if self._closed.done():
            raise ConnectionClosedError(self._closed.result().reason)
        await self._drained.wait()

    def close(self, reason: str = "closed by application") -> None:
        """Ask the core to close the connection the way its protocol says; if it has not
        ended within the close timeout (a core that waits for a goodbye that never
        comes, or that took the request as a no-op), drop it."""
        if not self._closed.done():
            self._guarded(lambda: self.core.close(reason, self._loop.time()))
        if not self._closed.done() and self._linger is None:
            self._linger = self._loop.call_later(
                self._close_timeout, lambda: self.abort(f"{reason}: no goodbye in time")
            )

    def abort(self, reason: str) -> None:
        """Drop the connection at once, without the protocol's goodbye (also ends an
        orderly close that is still sending)."""
        self._finish(ConnectionClosed(reason, error=True), abort=True)
        self._abort_transport()

    # --- asyncio.Protocol -------------------------------------------------------------

    def abandon_if_unstarted(self) -> None:
        """End a connection whose transport never came: asyncio can fail to set up an
        accepted connection (the peer reset it at once) after the protocol was made, and
        then nothing would ever end it."""
        if self._transport is not None or self._connected.done():
            return
        self._connected.set_exception(ConnectionClosedError("the connection never started"))
        self._connected.exception()  # retrieved: nobody may be waiting
        self._finish(ConnectionClosed("the connection never started", error=True), abort=True)
        if not self._transport_gone.done():
            self._transport_gone.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        raw = self._transport = cast(asyncio.Transport, transport)
        if self._connected.done():  # abandoned: too late
            raw.abort()
            return
        self._connected.set_result(None)
        if self._closed.done():  # closed (e.g. by a server shutting down) before it began
            raw.abort()
            return
        raw.set_write_buffer_limits(high=self._high_water)
        if self._admission is not None:
            self._admission.evict = self.abort
            policy = self._policy
            now = self._loop.time()
            self._handshake_deadline = now + policy.handshake_timeout
            self._arm_guard(min(now + policy.idle_timeout, self._handshake_deadline))
        self._guarded(lambda: self.core.start(self._loop.time()))

    def data_received(self, data: bytes) -> None:
        if not self._heard:
            self._heard = True
            if self._guard is not None:  # the idle deadline is over; the handshake's is not
                self._arm_guard(self._handshake_deadline)
        if not self._closed.done():
            self._guarded(lambda: self.core.receive_data(data, self._loop.time()))

    def eof_received(self) -> bool:
        if not self._eof and not self._closed.done():
            self._eof = True
            self._guarded(lambda: self.core.receive_data(b"", self._loop.time()))
        # True keeps a half-open connection: the core has not closed and may still send.
        return not self._closed.done()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._connected.done():
            self._connected.set_exception(ConnectionClosedError("connection failed"))
            self._connected.exception()  # retrieved: nobody may be waiting
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self._closed.done():
            reason = f"connection lost: {exc}" if exc else "peer closed the connection"
            self._finish(ConnectionClosed(reason, error=exc is not None, by_peer=True), abort=True)
        if not self._transport_gone.done():
            self._transport_gone.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._drained.clear()
        if self._stall is None:
            self._stall = self._loop.call_later(
                self._policy.write_stall_timeout, self._on_write_stall
            )
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drained.set()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._update_reading()

    # --- the resource policy ----------------------------------------------------------

    def _arm_guard(self, deadline: float) -> None:
        if self._guard is not None:
            self._guard.cancel()
        self._guard = self._loop.call_at(deadline, self._on_guard)

    def _on_guard(self) -> None:
        self._guard = None
        if self._closed.done():
            return
        if not self._heard:
            self._limit_hit("idle_timeout", "sent nothing")
        else:
            self._limit_hit("handshake_timeout", "not authenticated in time")

    def _on_authenticated(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None
        if self._admission is not None:
            self._admission.authenticated(self._loop.time())

    def _on_write_stall(self) -> None:
        self._stall = None
        if not self._closed.done():
            self._limit_hit("write_stall_timeout", "stopped reading")

    def _limit_hit(self, limit: str, detail: str) -> None:
        peer = self.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self._stats.hit(limit, source, detail)
        self.abort(f"{limit}: the peer {detail}")

    # --- the pump ---------------------------------------------------------------------

    def _guarded(self, step: Callable[[], list[Event]]) -> None:
        """Run one core step and act on it; a core that raises (in the step, or while
        the driver reads its output or timer) closes only its own connection."""
        try:
            self._process(step())
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, ProtocolError):
            log.info("closing connection after protocol error: %s", exc)
            try:
                self._flush()  # whatever the core queued before failing (an alert, a notice)
            except Exception:
                log.exception("protocol core failed while flushing")
            self._finish(ConnectionClosed(f"protocol error: {exc}", error=True), abort=False)
        else:
            log.exception("protocol core failed; closing its connection", exc_info=exc)
            self._finish(ConnectionClosed("internal error", error=True), abort=True)

    def _process(self, events: Iterable[Event], *, soon: bool = False) -> None:
        closing: ConnectionClosed | None = None
        queue = self._events
        for event in events:
            if isinstance(event, ConnectionClosed):
                closing = closing or event
                continue
            if isinstance(event, Authenticated):
                self._on_authenticated()
            queue.append(event)
            self._queued_bytes += event.payload_size()
        self._flush(soon=soon)
        if closing is not None:
            self._finish(closing, abort=False)
            return
        if queue:
            self._event_ready.set()
        self._arm_timer()
        self._update_reading()

    def _flush(self, *, soon: bool = False) -> None:
        """Hand the core's output to the transport. ``soon``: an application action's
        output may wait for the end of this event-loop turn (``coalesce_writes``), up to
        COALESCE_LIMIT bytes, so a burst of messages leaves in one (vectored) write.
        A core with ``chunks_to_send`` hands over its frames unjoined: they go out with
        ``writelines`` (one writev on uvloop), never copied into one buffer."""
        unsent = self._unsent
        if self._chunks is not None:
            chunks = self._chunks()
            if chunks:
                unsent += chunks
                for chunk in chunks:
                    self._unsent_bytes += len(chunk)
        else:
            data = self.core.data_to_send()
            if data:
                unsent.append(data)
                self._unsent_bytes += len(data)
        if not unsent:
            return
        if soon and self._unsent_bytes < COALESCE_LIMIT:
            if self._flush_soon is None:
                self._flush_soon = self._loop.call_soon(self._flush_unsent)
            return
        self._unsent = []
        self._unsent_bytes = 0
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if len(unsent) == 1:
                transport.write(unsent[0])
            else:
                transport.writelines(unsent)
            if (self._write_paused or self._always_check_buffer) and (
                transport.get_write_buffer_size() > self._policy.max_write_buffer
            ):
                self._limit_hit("max_write_buffer", "does not read what we send")

    def _flush_unsent(self) -> None:
        self._flush_soon = None
        if self._unsent and not self._closed.done():
            try:
                self._flush()
            except Exception as exc:
                self._failed(exc)
            self._update_reading()

    def _arm_timer(self) -> None:
        deadline = self.core.get_timer()
        if deadline == self._timer_deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        deadline = self._timer_deadline
        self._timer = None
        self._timer_deadline = None
        if not self._closed.done():
            # A loop with a coarser clock (uvloop's is in milliseconds) may run the timer
            # a little before the deadline it was set for: tell the core the deadline is
            # here, or it would wait for it again and again.
            now = self._loop.time()
            if deadline is not None and now < deadline:
                now = deadline
            self._guarded(lambda: self.core.handle_timer(now))

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._eof or transport.is_closing():
            return  # after EOF, resuming would make the socket report EOF again
        want_pause = (
            len(self._events) >= self._max_pending
            or self._queued_bytes >= self._policy.max_queued_bytes
            or (
                self._write_paused
                and transport.get_write_buffer_size() > READ_PAUSE_FACTOR * self._high_water
            )
        )
        if want_pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    def _finish(self, event: ConnectionClosed, *, abort: bool) -> None:
        if self._closed.done():
            return
        for handle in (self._timer, self._guard, self._stall):
            if handle is not None:
                handle.cancel()
        self._timer = self._guard = self._stall = None
        if self._admission is not None:
            self._admission.release()
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        if self._unsent:  # what the application sent goes before the goodbye
            unsent = self._unsent
            self._unsent = []
            self._unsent_bytes = 0
            transport = self._transport
            if not abort and transport is not None and not transport.is_closing():
                transport.writelines(unsent)
        self._closed.set_result(event)
        self._events.append(event)
        self._event_ready.set()
        self._drained.set()
        transport = self._transport
        if transport is None:
            if not self._connected.done():  # connection_made will abort it on arrival
                return
            self._transport_gone.set_result(None)
        elif abort:
            self._abort_transport()
        else:
            transport.close()  # sends what is buffered, then FIN
            if self._linger is not None:
                self._linger.cancel()
            self._linger = self._loop.call_later(self._close_timeout, self._abort_transport)

    def _abort_transport(self) -> None:
        self._linger = None
        if self._transport is not None and not self._transport_gone.done():
            self._transport.abort()


class BufferedStreamCore(StreamCore, Protocol):
    """A core that keeps its own read buffer (BOTD): the driver reads straight into it."""

    def get_buffer(self, sizehint: int) -> memoryview:
        """Room for the next bytes from the peer."""

    def buffer_updated(self, nbytes: int, now: float) -> list[Event]:
        """``nbytes`` arrived in the room :meth:`get_buffer` gave, at ``now``."""

    @property
    def buffer_capacity(self) -> int:
        """Bytes the read buffer takes now."""

    def trim_buffer(self) -> None:
        """The connection is quiet or ended: release the read buffer."""


BufferedCoreT = TypeVar("BufferedCoreT", bound=BufferedStreamCore)

# A read buffer above this size is trimmed once a connection has had no read for
# TRIM_AFTER seconds: an idle (or half-open) connection keeps no large buffer.
TRIM_ABOVE = 16 * 1024
TRIM_AFTER = 1.0


class BufferedStreamDriver(StreamDriver[BufferedCoreT], asyncio.BufferedProtocol):
    """A :class:`StreamDriver` for a core with its own read buffer: the transport reads
    into it (``asyncio.BufferedProtocol``), with no bytes object per read and no copy
    for frames split across reads. Everything else is the StreamDriver's."""

    def __init__(self, core: BufferedCoreT, **options: Any) -> None:
        super().__init__(core, **options)
        self._reads = 0  # reads since the trim check last ran
        self._trim: asyncio.TimerHandle | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if not self._heard:
            self._heard = True
            if self._guard is not None:  # the idle deadline is over; the handshake's is not
                self._arm_guard(self._handshake_deadline)
        if self._closed.done():
            return
        self._reads += 1
        try:
            self._process(self.core.buffer_updated(nbytes, self._loop.time()))
        except Exception as exc:
            self._failed(exc)
        if self._trim is None and self.core.buffer_capacity > TRIM_ABOVE:
            self._reads = 0
            self._trim = self._loop.call_later(TRIM_AFTER, self._on_trim)

    def _on_trim(self) -> None:
        self._trim = None
        if self._reads and not self._closed.done():  # still busy: look again later
            self._reads = 0
            self._trim = self._loop.call_later(TRIM_AFTER, self._on_trim)
            return
        self.core.trim_buffer()

    def eof_received(self) -> bool:
        self.core.trim_buffer()  # half-open: nothing more will be read
        return super().eof_received()

    def _finish(self, event: ConnectionClosed, *, abort: bool) -> None:
        super()._finish(event, abort=abort)
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        self.core.trim_buffer()


def make_driver(core: CoreT, **options: Any) -> StreamDriver[CoreT]:
    """The driver for ``core``: a :class:`BufferedStreamDriver` when the core keeps its
    own read buffer, else a :class:`StreamDriver`."""
    if all(hasattr(core, name) for name in ("get_buffer", "buffer_updated", "trim_buffer")):
        return cast(StreamDriver[CoreT], BufferedStreamDriver(cast(Any, core), **options))
    return StreamDriver(core, **options)


async def open_stream(
    core: CoreT,
    host: str,
    port: int,
    *,
    local_addr: tuple[str, int] | None = None,
    **driver_options: Any,
) -> StreamDriver[CoreT]:
    """Connect to ``host:port`` over TCP (from ``local_addr`` when given) and run
    ``core`` on the connection."""
    loop = asyncio.get_running_loop()
    _, driver = await loop.create_connection(
        lambda: make_driver(core, **driver_options), host, port, local_addr=local_addr
    )
    return driver


class StreamServer(Generic[CoreT]):
    """A listening socket whose connections each run a fresh core and a handler task.

    :meth:`close` stops accepting and closes every live connection the way its
    protocol says; :meth:`wait_closed` waits until they and their handlers are done.
    """

    def __init__(
        self,
        core_factory: Callable[[], CoreT],
        handler: Callable[[StreamDriver[CoreT]], Awaitable[None]],
        driver_options: dict[str, Any],
        on_accept: Callable[[StreamDriver[CoreT]], None] | None = None,
        *,
        policy: ResourcePolicy | None = None,
        name: str = "stream listener",
    ) -> None:
        self._core_factory = core_factory
        self._handler = handler
        self._driver_options = driver_options
        self._on_accept = on_accept
        self._listener = Listener(self._accept, policy, name=name)
        self._server: Listener | None = None
        self._port: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._drivers: set[StreamDriver[CoreT]] = set()
        self._closing: str | None = None  # the reason, once close() was called

    @property
    def sockets(self) -> tuple[object, ...]:
        return tuple(self._server.sockets) if self._server else ()

    @property
    def port(self) -> int:
        """The port it listens (or listened) on; useful after binding port 0."""
        if self._port is None:
            raise RuntimeError("the server is not listening yet")
        return self._port

    @property
    def connections(self) -> frozenset[StreamDriver[CoreT]]:
        return frozenset(self._drivers)

    @property
    def listener(self) -> Listener:
        """The listening socket, its connection table and its limit counters."""
        return self._listener

    async def listen(self, host: str, port: int) -> None:
        await self._listener.listen(host, port)
        self._server = self._listener
        self._port = self._listener.port

    def _accept(self, admission: Admission) -> StreamDriver[CoreT]:
        driver = make_driver(self._core_factory(), admission=admission, **self._driver_options)
        self._drivers.add(driver)
        if self._on_accept is not None:  # before the transport can deliver a byte
            self._on_accept(driver)
        if self._closing is not None:
            # asyncio hands over connections it accepted just before close(): they end
            # at once too, or wait_closed() would wait for them in vain.
            driver.close(self._closing)
            asyncio.get_running_loop().call_later(ABANDON_AFTER, driver.abandon_if_unstarted)
        task = asyncio.get_running_loop().create_task(self._run(driver))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return driver

    async def _run(self, driver: StreamDriver[CoreT]) -> None:
        try:
            await driver.wait_connected()
            await self._handler(driver)
        except ConnectionClosedError:
            log.debug("handler stopped: its connection closed")
        except Exception:
            log.exception("connection handler failed")
            driver.abort("handler failed")
        finally:
            if not driver.closed:  # the handler returned early: the connection is done too
                driver.close("handler finished")
            await driver.wait_closed()
            self._drivers.discard(driver)

    def close(self, reason: str = "server shutting down") -> None:
        self._closing = reason
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        for driver in list(self._drivers):
            driver.close(reason)
            loop.call_later(ABANDON_AFTER, driver.abandon_if_unstarted)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> StreamServer[CoreT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


class ServerHandle(Generic[CoreT]):
    """Base of the servers a protocol's io module hands out: a :class:`StreamServer`
    seen as its port, its close and an async context."""

    def __init__(self, server: StreamServer[CoreT]) -> None:
        self._server = server

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def connections(self) -> int:
        return len(self._server.connections)

    @property
    def listener(self) -> Listener:
        """The listening socket, its connection table and its limit counters."""
        return self._server.listener

    def close(self, reason: str = "server shutting down") -> None:
        self._server.close(reason)

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def serve_stream(
    core_factory: Callable[[], CoreT],
    handler: Callable[[StreamDriver[CoreT]], Awaitable[None]],
    host: str,
    port: int,
    *,
    on_accept: Callable[[StreamDriver[CoreT]], None] | None = None,
    policy: ResourcePolicy | None = None,
    name: str = "stream listener",
    **driver_options: Any,
) -> StreamServer[CoreT]:
    """Accept TCP connections; each gets a fresh core and its own ``handler`` task.

    A handler that fails is logged and its connection aborted; others go on. When a
    handler returns, its connection is closed. ``on_accept(driver)`` runs synchronously
    for each new connection, before any of its bytes are processed. ``policy`` bounds
    the connections and what each may cost (the defaults when not given).
    """
    server = StreamServer(
        core_factory, handler, driver_options, on_accept, policy=policy, name=name
    )
    await server.listen(host, port)
    return server
