"""The stream driver over TCP and over the in-memory pipe: data, timers, backpressure,
peer close, and bad input closing only its own connection."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic

import pytest
from toy_protocol import Message, ToyCore

from trustmesh.errors import ConnectionClosedError, ProtocolError
from trustmesh.io import StreamDriver, StreamServer, memory_pipe, open_stream, serve_stream
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.stream import CoreT
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.wire.frames import encode_frame

WAIT = 5.0  # upper bound on any single wait; tests finish far sooner

Handler = Callable[[StreamDriver[ToyCore]], Awaitable[None]]


def send(data: bytes) -> Callable[[ToyCore], list[Event]]:
    return functools.partial(ToyCore.send, data=data)


async def next_message(driver: StreamDriver[ToyCore]) -> bytes:
    async with asyncio.timeout(WAIT):
        while True:
            event = await driver.next_event()
            if isinstance(event, Message):
                return event.data
            assert not isinstance(event, ConnectionClosed), event


async def closed(driver: StreamDriver[ToyCore]) -> ConnectionClosed:
    async with asyncio.timeout(WAIT):
        return await driver.wait_closed()


@pytest.fixture
async def tcp_server() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    servers: list[StreamServer[ToyCore]] = []

    async def start(factory: Callable[[], ToyCore], handler: Handler, **options: Any) -> int:
        server = await serve_stream(factory, handler, "127.0.0.1", 0, **options)
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def drain_events(driver: StreamDriver[Any]) -> None:
    async for _ in driver:
        pass


class ServerSide(Generic[CoreT]):
    """A server handler that hands the test its driver, then runs ``then`` on it."""

    def __init__(
        self, then: Callable[[StreamDriver[CoreT]], Awaitable[object]] = drain_events
    ) -> None:
        self._driver: asyncio.Future[StreamDriver[CoreT]] = (
            asyncio.get_running_loop().create_future()
        )
        self._then = then

    async def __call__(self, driver: StreamDriver[CoreT]) -> None:
        self._driver.set_result(driver)
        await self._then(driver)

    async def driver(self) -> StreamDriver[CoreT]:
        return await asyncio.wait_for(self._driver, WAIT)


async def send_8mb_then_close(driver: StreamDriver[ToyCore]) -> None:
    for _ in range(2000):  # towards a client that never reads
        driver.act(send(b"x" * 4000))
    driver.close("done")
    await driver.wait_closed()


# --- data ----------------------------------------------------------------------------


async def test_memory_pipe_delivers_in_order() -> None:
    a, b = await memory_pipe(ToyCore(), ToyCore(echo=True))
    for i in range(100):
        a.act(send(b"m%d" % i))
    assert [await next_message(b) for _ in range(100)] == [b"m%d" % i for i in range(100)]
    assert [await next_message(a) for _ in range(100)] == [b"m%d" % i for i in range(100)]


async def test_tcp_echo_round_trip(tcp_server: Callable[..., Awaitable[int]]) -> None:
    port = await tcp_server(lambda: ToyCore(echo=True), drain_events)
    client = await open_stream(ToyCore(), "127.0.0.1", port)
    payloads = [bytes([65 + i % 26]) * (i * 13 % 4000 + 1) for i in range(50)]
    for p in payloads:
        client.act(send(p))
    assert [await next_message(client) for _ in payloads] == payloads
    client.act(send(b"PING"))
    assert await next_message(client) == b"PONG"
    client.close()
    assert (await closed(client)).reason == "closed by application"


# --- timers --------------------------------------------------------------------------


async def test_timer_fires_and_closes_idle_connection(
    tcp_server: Callable[..., Awaitable[int]],
) -> None:
    handler: ServerSide[ToyCore] = ServerSide()
    port = await tcp_server(lambda: ToyCore(idle=0.05), handler)
    client = await open_stream(ToyCore(), "127.0.0.1", port)
    server = await handler.driver()
    event = await closed(server)
    assert event.reason == "idle timeout" and event.error
    assert server.core.timer_calls, "the core's timer was never called"
    # The server's goodbye reached the client, which saw an orderly close by its peer.
    client_event = await closed(client)
    assert client_event.by_peer


async def test_timer_is_rearmed_when_the_deadline_moves() -> None:
    loop = asyncio.get_running_loop()
    a, b = await memory_pipe(ToyCore(), ToyCore())
    a.act(functools.partial(ToyCore.set_deadline, deadline=loop.time() + 3600))
    a.act(functools.partial(ToyCore.set_deadline, deadline=loop.time() + 0.01))
    event = await closed(a)
    assert event.reason == "idle timeout"
    assert len(a.core.timer_calls) == 1  # the far deadline was cancelled, not fired
    assert (await closed(b)).by_peer


async def test_timer_cancelled_on_close() -> None:
    loop = asyncio.get_running_loop()
    a, b = await memory_pipe(ToyCore(), ToyCore())
    a.act(functools.partial(ToyCore.set_deadline, deadline=loop.time() + 0.01))
    a.close("done")
    assert (await closed(a)).reason == "done"
    assert (await closed(b)).by_peer
    assert a.core.timer_calls == []


# --- backpressure --------------------------------------------------------------------


async def test_backpressure_in_memory_pauses_and_loses_nothing() -> None:
    a, b = await memory_pipe(ToyCore(), ToyCore(), high_water=8192, max_pending_events=4)
    count, size = 400, 1000
    sent = 0
    paused_seen = False
    # The receiver takes no events yet: it must stop reading, and the sender must see
    # its buffer fill instead of the receiver queueing everything.
    while sent < count:
        a.act(send(sent.to_bytes(4, "big") * (size // 4)))
        sent += 1
        if a.writing_paused:
            paused_seen = True
            break
    assert paused_seen, "sender never saw backpressure"
    await asyncio.sleep(0)  # let queued deliveries run; the receiver stays paused
    assert b.reading_paused
    drained = asyncio.ensure_future(a.drain())

    async def produce_rest() -> None:
        nonlocal sent
        await asyncio.wait_for(drained, WAIT)
        while sent < count:
            a.act(send(sent.to_bytes(4, "big") * (size // 4)))
            sent += 1
            await a.drain()

    producer = asyncio.ensure_future(produce_rest())
    received = [await next_message(b) for _ in range(count)]
    await asyncio.wait_for(producer, WAIT)
    assert [int.from_bytes(m[:4], "big") for m in received] == list(range(count))
    assert not b.reading_paused


async def test_backpressure_over_tcp(tcp_server: Callable[..., Awaitable[int]]) -> None:
    """A receiver that does not take its events makes the sender's writes pause."""
    sender_paused = asyncio.Event()
    received: list[int] = []
    done = asyncio.Event()
    count = 4000  # 4000 x 4000 bytes = 16 MB, more than the loopback buffers hold

    async def slow_receiver(driver: StreamDriver[ToyCore]) -> None:
        await asyncio.wait_for(sender_paused.wait(), WAIT * 4)
        assert driver.reading_paused
        async for event in driver:
            if isinstance(event, Message):
                received.append(int.from_bytes(event.data[:4], "big"))
                if len(received) == count:
                    done.set()

    port = await tcp_server(ToyCore, slow_receiver, max_pending_events=8)
    client = await open_stream(ToyCore(), "127.0.0.1", port, high_water=64 * 1024)
    async with asyncio.timeout(WAIT * 4):
        for i in range(count):
            client.act(send(i.to_bytes(4, "big") * 1000))
            if client.writing_paused:
                sender_paused.set()
            await client.drain()
        await done.wait()
    assert sender_paused.is_set()
    assert received == list(range(count))
    client.close()


async def test_app_that_does_not_read_events_stops_the_reader() -> None:
    a, b = await memory_pipe(ToyCore(), ToyCore(), max_pending_events=5)
    for i in range(50):
        a.act(send(b"%d" % i))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert b.reading_paused
    assert [await next_message(b) for _ in range(50)] == [b"%d" % i for i in range(50)]


# --- peer close ----------------------------------------------------------------------


async def test_peer_close_is_reported_once_and_iteration_ends() -> None:
    a, b = await memory_pipe(ToyCore(), ToyCore())
    a.act(send(b"last words"))
    a.close("bye now")
    events = [e async for e in b]
    assert isinstance(events[0], Message) and events[0].data == b"last words"
    assert isinstance(events[-1], ConnectionClosed) and events[-1].by_peer
    assert len(events) == 2
    with pytest.raises(ConnectionClosedError):
        await b.next_event()
    with pytest.raises(ConnectionClosedError):
        b.act(send(b"too late"))
    with pytest.raises(ConnectionClosedError):
        await b.drain()


async def test_peer_reset_over_tcp(tcp_server: Callable[..., Awaitable[int]]) -> None:
    handler: ServerSide[ToyCore] = ServerSide()
    port = await tcp_server(ToyCore, handler)
    client = await open_stream(ToyCore(), "127.0.0.1", port)
    server = await handler.driver()
    client.abort("testing a reset")
    event = await closed(server)
    assert event.by_peer
    assert (await closed(client)).reason == "testing a reset"


async def test_raw_eof_from_peer(tcp_server: Callable[..., Awaitable[int]]) -> None:
    handler: ServerSide[ToyCore] = ServerSide()
    port = await tcp_server(ToyCore, handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode_frame(b"hi"))
    writer.write_eof()
    server = await handler.driver()
    event = await closed(server)
    assert event.reason == "peer sent EOF" and event.by_peer
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    writer.close()


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\xff" * 10, "protocol error: varint is longer than 9 bytes"),
        (b"\x80\x00", "protocol error: varint is not minimally encoded"),
        (encode_frame(b"x" * 5000, 10_000)[:100], "protocol error: frame of 5000 bytes"),
        (encode_frame(b"!evil"), "protocol error: bad message"),
    ],
)
async def test_bad_input_closes_only_that_connection(
    tcp_server: Callable[..., Awaitable[int]], garbage: bytes, reason: str
) -> None:
    server_events: list[ConnectionClosed] = []

    async def handler(driver: StreamDriver[ToyCore]) -> None:
        server_events.append(await driver.wait_closed())

    port = await tcp_server(lambda: ToyCore(echo=True), handler)
    good = await open_stream(ToyCore(), "127.0.0.1", port)
    good.act(send(b"before"))
    assert await next_message(good) == b"before"

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(garbage)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # the server hung up on it
    writer.close()

    good.act(send(b"after"))
    assert await next_message(good) == b"after"
    assert len(server_events) == 1
    assert server_events[0].reason.startswith(reason)
    assert server_events[0].error
    good.close()


async def test_core_bug_aborts_only_that_connection(
    tcp_server: Callable[..., Awaitable[int]], caplog: pytest.LogCaptureFixture
) -> None:
    port = await tcp_server(lambda: ToyCore(echo=True), drain_events)
    good = await open_stream(ToyCore(), "127.0.0.1", port)
    bad = await open_stream(ToyCore(), "127.0.0.1", port)
    with caplog.at_level(logging.ERROR, logger="trustmesh.io"):
        bad.act(send(b"CRASH"))
        event = await closed(bad)
    assert event.by_peer  # the server dropped it without the protocol's goodbye
    assert "protocol core failed" in caplog.text
    good.act(send(b"still here"))
    assert await next_message(good) == b"still here"
    good.close()


async def test_handler_failure_aborts_its_connection(
    tcp_server: Callable[..., Awaitable[int]], caplog: pytest.LogCaptureFixture
) -> None:
    async def failing(driver: StreamDriver[ToyCore]) -> None:
        await driver.next_event()
        raise RuntimeError("handler bug")

    port = await tcp_server(ToyCore, failing)
    client = await open_stream(ToyCore(), "127.0.0.1", port)
    with caplog.at_level(logging.ERROR, logger="trustmesh.io"):
        client.act(send(b"trigger"))
        event = await closed(client)
    assert event.by_peer
    assert "connection handler failed" in caplog.text


async def test_orderly_close_flushes_pending_data() -> None:
    a, b = await memory_pipe(ToyCore(), ToyCore())
    for i in range(20):
        a.act(send(b"%d" % i))
    a.close("finished")
    got = [e async for e in b]
    assert [e.data for e in got if isinstance(e, Message)] == [b"%d" % i for i in range(20)]
    assert isinstance(got[-1], ConnectionClosed) and got[-1].reason == "peer said bye"


# --- failure modes found in review --------------------------------------------------------


async def bulk_both_ways(
    a: StreamDriver[ToyCore], b: StreamDriver[ToyCore], count: int, size: int
) -> None:
    async def pump(driver: StreamDriver[ToyCore]) -> None:
        for i in range(count):
            driver.act(send(i.to_bytes(4, "big") * (size // 4)))
            await driver.drain()

    async def collect(driver: StreamDriver[ToyCore]) -> list[int]:
        return [int.from_bytes((await next_message(driver))[:4], "big") for _ in range(count)]

    async with asyncio.timeout(WAIT * 4):
        results = await asyncio.gather(pump(a), pump(b), collect(a), collect(b))
    assert results[2] == list(range(count))
    assert results[3] == list(range(count))


async def test_bulk_both_ways_in_memory_does_not_deadlock() -> None:
    a, b = await memory_pipe(ToyCore(), ToyCore(), high_water=8192)
    await bulk_both_ways(a, b, count=400, size=4000)


async def test_bulk_both_ways_over_tcp_does_not_deadlock(
    tcp_server: Callable[..., Awaitable[int]],
) -> None:
    handler: ServerSide[ToyCore] = ServerSide(StreamDriver.wait_closed)
    port = await tcp_server(ToyCore, handler, high_water=16 * 1024)
    client = await open_stream(ToyCore(), "127.0.0.1", port, high_water=16 * 1024)
    server = await handler.driver()
    await bulk_both_ways(client, server, count=2500, size=4000)  # 10 MB each way
    client.close()


async def test_echo_to_a_peer_that_never_reads_stops_reading() -> None:
    a, b = await memory_pipe(ToyCore(), ToyCore(echo=True), high_water=4096)
    a_transport = a._transport  # a reads nothing: pause its transport by hand
    assert a_transport is not None
    a_transport.pause_reading()
    for i in range(200):
        a.act(send(b"%04d" % i * 250))
        await asyncio.sleep(0)
        if b.reading_paused:
            break
    assert b.reading_paused, "the echo side kept reading while its replies piled up"
    assert b._transport is not None
    assert b._transport.get_write_buffer_size() > 4 * 4096
    a_transport.resume_reading()
    assert [await next_message(b) for _ in range(i + 1)] == [
        b"%04d" % j * 250 for j in range(i + 1)
    ]


async def test_abort_ends_an_orderly_close_that_cannot_finish(
    tcp_server: Callable[..., Awaitable[int]],
) -> None:
    handler: ServerSide[ToyCore] = ServerSide(send_8mb_then_close)
    # A write buffer cap above the 8 MB: this test is about the close, not the cap.
    port = await tcp_server(ToyCore, handler, policy=ResourcePolicy(max_write_buffer=16 << 20))
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    server = await handler.driver()
    assert server.closed
    assert not server._transport_gone.done()  # still trying to deliver the goodbye
    server.abort("operator gave up")
    await closed(server)  # returns only once the socket is released
    assert server._transport is not None
    assert server._transport.is_closing()
    writer.close()


async def test_close_timeout_aborts_a_stuck_close(
    tcp_server: Callable[..., Awaitable[int]],
) -> None:
    handler: ServerSide[ToyCore] = ServerSide(send_8mb_then_close)
    port = await tcp_server(
        ToyCore, handler, close_timeout=0.05, policy=ResourcePolicy(max_write_buffer=16 << 20)
    )
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    server = await handler.driver()
    event = await closed(server)  # the linger timer aborts the stuck close
    assert event.reason == "done"
    assert server._transport is not None
    assert server._transport.get_write_buffer_size() == 0
    writer.close()


class FailingFlushCore(ToyCore):
    """A core whose data_to_send fails once its timer has fired."""

    def handle_timer(self, now: float) -> list[Event]:
        self.timer_calls.append(now)
        self._deadline = None
        self.broken = True
        return []

    def data_to_send(self) -> bytes:
        if getattr(self, "broken", False):
            raise ProtocolError("cannot encode the keepalive")
        return super().data_to_send()


async def test_error_while_flushing_after_a_timer_closes_the_connection() -> None:
    loop = asyncio.get_running_loop()
    a, b = await memory_pipe(FailingFlushCore(), ToyCore())
    a.act(functools.partial(ToyCore.set_deadline, deadline=loop.time() + 0.01))
    event = await closed(a)
    assert event.error
    assert "cannot encode the keepalive" in event.reason
    assert (await closed(b)).by_peer


class CountingEofCore(ToyCore):
    def __init__(self) -> None:
        super().__init__()
        self.eofs = 0

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if not data:
            self.eofs += 1
            return []  # stay half-open: keep sending after the peer's EOF
        return super().receive_data(data, now)


async def test_eof_reaches_the_core_once_on_a_half_open_connection(
    tcp_server: Callable[..., Awaitable[int]],
) -> None:
    async def respond(driver: StreamDriver[CountingEofCore]) -> None:
        await driver.next_event()  # the client's request
        for _ in range(3000):  # a reply big enough to pause and resume the transport
            driver.act(functools.partial(ToyCore.send, data=b"r" * 4000))
            await driver.drain()
        driver.close("reply sent")

    handler: ServerSide[CountingEofCore] = ServerSide(respond)
    port = await tcp_server(CountingEofCore, handler, high_water=16 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode_frame(b"request"))
    writer.write_eof()
    total = 0
    async with asyncio.timeout(WAIT * 4):
        while chunk := await reader.read(1 << 16):
            total += len(chunk)
    server = await handler.driver()
    assert server.core.eofs == 1
    assert total > 3000 * 4000
    writer.close()


async def test_memory_pipe_write_to_closed_peer_is_a_reset() -> None:
    a, b = await memory_pipe(ToyCore(), CountingEofCore())
    a.act(lambda core: [ConnectionClosed("quiet close")])  # no goodbye: b stays half-open
    await closed(a)
    b.act(send(b"into the void"))
    event = await closed(b)
    assert event.error
    assert "reset" in event.reason


async def test_close_before_connection_made_aborts_the_transport() -> None:
    from trustmesh.io.pipe import MemoryTransport

    loop = asyncio.get_running_loop()
    driver = StreamDriver(ToyCore())
    driver.close("server shutting down")
    assert driver.closed
    left, right = MemoryTransport(loop, "a"), MemoryTransport(loop, "b")
    left._peer, right._peer = right, left
    left.set_protocol(driver)
    right.set_protocol(StreamDriver(ToyCore()))
    driver.connection_made(left)
    assert left.is_closing()
    assert (await closed(driver)).reason == "server shutting down"


async def test_server_close_says_goodbye_to_every_live_connection() -> None:
    server = await serve_stream(ToyCore, drain_events, "127.0.0.1", 0)
    clients = [await open_stream(ToyCore(), "127.0.0.1", server.port) for _ in range(3)]
    for client in clients:  # every connection is up and served
        client.act(send(b"PING"))
        assert await next_message(client) == b"PONG"
    assert len(server.connections) == 3
    async with server:  # leaving the block closes the server and waits for it
        pass
    assert server.connections == frozenset()
    for client in clients:
        event = await closed(client)
        assert event.by_peer
        assert event.reason == "peer said bye"  # the protocol's goodbye, not a reset
    with pytest.raises(OSError):
        await open_stream(ToyCore(), "127.0.0.1", server.port)


async def test_connect_to_a_closed_port_raises() -> None:
    server = await serve_stream(ToyCore, drain_events, "127.0.0.1", 0)
    port = server.port
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await open_stream(ToyCore(), "127.0.0.1", port)
