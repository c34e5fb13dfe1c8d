"""An in-memory, in-order byte pipe with TCP-like flow control, for tests and simulations.

Two :class:`MemoryTransport` objects are joined back to back. Written bytes reach the
peer on the next loop iteration, unless the peer has paused reading; unread bytes count
against the writer's buffer, so backpressure behaves as it does on a socket.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, cast

from trustmesh.io.stream import CoreT, StreamDriver


class MemoryTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        super().__init__()
        self._loop = loop
        self._name = name
        self._peer: MemoryTransport | None = None
        self._protocol: asyncio.Protocol | None = None
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_size = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._write_paused = False
        self._reading = True
        self._closing = False
        self._eof_sent = False
        self._lost = False
        self._delivery_scheduled = False

    # --- asyncio.Transport ------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname"):
            return ("memory", self._name)
        return default

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        # A Protocol, or a StreamDriver (a BaseProtocol with the same methods).
        assert hasattr(protocol, "data_received")
        self._protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            if self._peer is not None:
                self._peer._schedule_delivery()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self._outbox_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or not data:
            return
        self._outbox.append(bytes(data))
        self._outbox_size += len(data)
        if not self._write_paused and self._outbox_size > self._high:
            self._write_paused = True
            assert self._protocol is not None
            self._protocol.pause_writing()
        self._schedule_delivery()

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        self._schedule_delivery()  # the outbox drains first, then EOF and close

    def abort(self) -> None:
        if self._lost:
            return
        self._outbox.clear()
        self._outbox_size = 0
        peer = self._peer
        self._connection_lost(None)
        if peer is not None:
            peer._connection_lost(ConnectionResetError("connection reset by peer"))

    # --- delivery ---------------------------------------------------------------------

    def _schedule_delivery(self) -> None:
        if not self._delivery_scheduled and not self._lost:
            self._delivery_scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._delivery_scheduled = False
        peer = self._peer
        if self._lost or peer is None:
            return
        if peer._lost:
            if self._outbox:  # writing to a connection the peer has closed: a reset, as TCP
                self._outbox.clear()
                self._outbox_size = 0
                self._connection_lost(ConnectionResetError("connection reset by peer"))
            return
        assert peer._protocol is not None
        while self._outbox and peer._reading and not peer._lost:
            chunk = self._outbox.popleft()
            self._outbox_size -= len(chunk)
            peer._protocol.data_received(chunk)
        if self._write_paused and self._outbox_size <= self._low and not self._lost:
            self._write_paused = False
            assert self._protocol is not None
            self._protocol.resume_writing()
        if self._closing and not self._outbox and not self._eof_sent and not peer._lost:
            self._eof_sent = True
            keep_open = peer._protocol.eof_received()
            if not keep_open:
                peer._connection_lost(None)
            self._connection_lost(None)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        protocol = self._protocol
        if protocol is not None:
            self._loop.call_soon(protocol.connection_lost, exc)


async def memory_pipe(
    initiator: CoreT, responder: CoreT, **driver_options: Any
) -> tuple[StreamDriver[CoreT], StreamDriver[CoreT]]:
    """Connect two cores through an in-memory pipe; return their drivers."""
    loop = asyncio.get_running_loop()
    a = MemoryTransport(loop, "initiator")
    b = MemoryTransport(loop, "responder")
    a._peer, b._peer = b, a
    driver_a = StreamDriver(initiator, **driver_options)
    driver_b = StreamDriver(responder, **driver_options)
    a.set_protocol(driver_a)
    b.set_protocol(driver_b)
    driver_b.connection_made(b)
    driver_a.connection_made(a)
    return driver_a, driver_b
