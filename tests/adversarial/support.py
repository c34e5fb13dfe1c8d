"""Attack primitives for tests/adversarial: hostile clients, a watch on what a server
holds while it is attacked, and an honest client that keeps asking to be served.

Not a test module. Every attacker connects from 127.0.0.1 (``ATTACKER``); the honest
client binds 127.0.0.2 (``HONEST``), a source of its own in the listener's table. Waits
are bounded by ``asyncio.timeout`` on the event awaited (a read returning ``b""`` or a
reset), never by sleeping a fixed time; the only sleeps here pace an attacker (slowloris)
or the watch's samples.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.listener import Listener
from trustmesh.io.stream import StreamDriver
from trustmesh.sansio import ConnectionClosed, Event, StreamCore
from trustmesh.wire.varint import encode_uvarint

ATTACKER = "127.0.0.1"
HONEST = "127.0.0.2"
WAIT = 5.0  # bound on any wait that should take milliseconds
SLACK = 0.75  # how late (seconds) a deadline may fire on a busy 2-core machine
READ_SLACK = 256 * 1024  # what one read may add before a reader pauses (asyncio reads 256 KiB)
SMALL_RCVBUF = 4096  # a slow reader's receive buffer: the server's output backs up at once

# Small limits, so that every deadline passes in well under a second.
POLICY = ResourcePolicy(
    max_connections=64,
    max_per_source=24,
    max_unauthenticated=32,
    max_unauthenticated_per_source=8,
    handshake_timeout=0.6,
    idle_timeout=0.3,
    max_write_buffer=128 * 1024,
    write_stall_timeout=0.5,
    max_queued_events=32,
    max_queued_bytes=128 * 1024,
    max_tasks=8,
    handshake_rate=40.0,
    handshake_burst=24,
    backlog=256,
    accept_retry=0.1,
    header_timeout=0.5,
    body_timeout=0.5,
    keepalive_timeout=1.0,  # longer than the head deadlines, as in the defaults
    request_rate=20.0,
    request_burst=40,
)

EventT = TypeVar("EventT", bound=Event)


def now() -> float:
    return asyncio.get_running_loop().time()


# --- raw connections --------------------------------------------------------------------


@dataclass
class Conn:
    """One attacker's TCP connection and when it was opened (loop time)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened: float
    closed_after: float | None = None  # seconds from opening until the server ended it

    async def send(self, data: bytes) -> bool:
        """Write and drain; False when the connection is already gone (an attacker's
        bytes to a server that hung up are not an error)."""
        if self.writer.is_closing():
            return False
        self.writer.write(data)
        try:
            await self.writer.drain()
        except ConnectionError:
            return False
        return True

    async def wait_server_close(self, within: float) -> float:
        """Read (and drop) until the server ends the connection: EOF or a reset. Fails
        unless that happens within ``within`` seconds of opening. Returns the seconds
        since opening."""
        if self.closed_after is not None:
            return self.closed_after
        async with asyncio.timeout_at(self.opened + within):
            with contextlib.suppress(ConnectionError):
                while await self.reader.read(65536):
                    pass
        self.closed_after = now() - self.opened
        return self.closed_after

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def _socket(local: str, rcvbuf: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((local, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def attacker_tls() -> ssl.SSLContext:
    """A TLS 1.3 client context that checks nothing (an attacker's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


async def open_conn(
    port: int,
    *,
    host: str = ATTACKER,
    local: str = ATTACKER,
    rcvbuf: int | None = None,
    tls: ssl.SSLContext | None = None,
) -> Conn:
    """A TCP connection to ``host:port`` from ``local`` (optionally with a small
    receive buffer, set before connecting so that the window stays small), in TLS when
    ``tls`` is given (the handshake done before it returns)."""
    sock = _socket(local, rcvbuf)
    started = now()  # the server's deadlines run from its accept, TLS included
    try:
        async with asyncio.timeout(WAIT):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(
                sock=sock,
                ssl=tls,
                server_hostname=host if tls is not None else None,
                limit=rcvbuf or 2**16,
            )
    except BaseException:
        sock.close()
        raise
    return Conn(reader, writer, started)


class Attack:
    """The attacker's connections, closed on exit whatever happened. A connection the
    server resets before the connect call returns (refused at accept, on loopback) is
    only counted, in ``reset_at_connect``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[Conn] = []
        self.reset_at_connect = 0

    async def __aenter__(self) -> Attack:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.gather(*(c.aclose() for c in self.conns))

    async def _connect(self, flight: bytes | None = None, **options: Any) -> Conn | None:
        try:
            conn = await open_conn(self.port, **options)
        except ConnectionError:
            self.reset_at_connect += 1
            return None
        self.conns.append(conn)
        if flight is not None:
            await conn.send(flight)
        return conn

    async def open(self, n: int = 1, **options: Any) -> list[Conn]:
        """``n`` connections at once."""
        opened = await asyncio.gather(*(self._connect(**options) for _ in range(n)))
        return [c for c in opened if c is not None]

    async def open_idle(self, n: int) -> list[Conn]:
        """``n`` connections that send nothing."""
        return await self.open(n)

    async def first_flight(self, flights: Sequence[bytes]) -> list[Conn]:
        """One connection per flight; each sends its flight, then nothing more (a
        ClientHello, a BOTD Init...)."""
        opened = await asyncio.gather(*(self._connect(f) for f in flights))
        return [c for c in opened if c is not None]

    async def flood(self, n: int, flight: Callable[[], bytes] | None = None) -> list[Conn]:
        """``n`` connections opened as fast as the loop goes (each sending
        ``flight()`` first when given)."""
        flights = [flight() if flight is not None else None for _ in range(n)]
        opened = await asyncio.gather(*(self._connect(f) for f in flights))
        return [c for c in opened if c is not None]

    async def wait_all_closed(self, within: float, conns: Iterable[Conn] | None = None) -> float:
        """Every connection (all of them by default) ends within ``within`` seconds of
        its opening; return the latest, in seconds after opening."""
        chosen = list(self.conns if conns is None else conns)
        times = await asyncio.gather(*(c.wait_server_close(within) for c in chosen))
        return max(times, default=0.0)


async def trickle(conn: Conn, data: bytes, interval: float, *, chunk: int = 1) -> int:
    """Slowloris: send ``data`` ``chunk`` bytes every ``interval`` seconds until it is all
    sent or the server closes; return the bytes sent. Each byte keeps an idle deadline
    happy; only a deadline on the whole (handshake, header) can end it."""
    sent = 0
    while sent < len(data) and not conn.reader.at_eof():
        if conn.writer.is_closing():
            break
        try:
            conn.writer.write(data[sent : sent + chunk])
            await conn.writer.drain()
        except ConnectionError:
            break
        sent += chunk
        await asyncio.sleep(interval)  # the attacker's pace, not a wait for the server
    return sent


# --- byte strings an attacker sends -------------------------------------------------------


def client_hello(alpn: Sequence[str] = (), server_name: str | None = None) -> bytes:
    """The first flight of a real TLS client (the stdlib's OpenSSL, in memory BIOs): a
    ClientHello the server must answer with its own flight and key exchange."""
    context = attacker_tls()
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    return hello


def garbage(seed: int = 15, size: int = 4096) -> list[bytes]:
    """Bytes that are no protocol's: random, an HTTP request, zeros, all ones."""
    rng = random.Random(seed)
    return [
        rng.randbytes(size),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(size),
        b"\xff" * size,
    ]


def oversized_prefix(size: int = 1 << 30) -> bytes:
    """A uvarint length prefix announcing a ``size``-byte frame, and a little of it."""
    return encode_uvarint(size) + os.urandom(64)


def oversized_tls_record() -> bytes:
    """A TLS handshake record header announcing 65,535 bytes (the limit is 16 KiB + 256)."""
    return b"\x16\x03\x01\xff\xff" + os.urandom(64)


def http_request(
    method: str = "GET",
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    content_length: int | None = None,
) -> bytes:
    """One HTTP/1.1 request (``content_length`` may announce more than ``body``)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or content_length is not None or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_response(reader: asyncio.StreamReader) -> HttpResponse:
    """One HTTP/1.1 response with a Content-Length (what aiohttp sends for JSON)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    size = int(headers.get("content-length", "0"))
    body = await reader.readexactly(size) if size else b""
    return HttpResponse(int(status_line.split()[1]), headers, body)


def ws_upgrade(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return http_request(
        "GET",
        path,
        [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
        ],
    )


def ws_frame(payload: bytes, *, opcode: int = 0x1, announce: int | None = None) -> bytes:
    """A masked client frame (the mask is zero, so the payload goes as it is);
    ``announce`` claims another length than the payload's."""
    size = len(payload) if announce is None else announce
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return header + b"\0\0\0\0" + payload


async def ws_read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame: (opcode, payload)."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(size)


# --- a real core driven by hand ---------------------------------------------------------


class Tap:
    """A StreamCore around another that can slip raw bytes into its output: inside a
    TlsStream, an authenticated peer's bytes that no honest core would send."""

    def __init__(self, inner: StreamCore) -> None:
        self.inner = inner
        self._extra = bytearray()

    def inject(self, data: bytes) -> list[Event]:
        self._extra += data
        return []

    def start(self, now: float) -> list[Event]:
        return self.inner.start(now)

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        return self.inner.receive_data(data, now)

    def handle_timer(self, now: float) -> list[Event]:
        return self.inner.handle_timer(now)

    def get_timer(self) -> float | None:
        return self.inner.get_timer()

    def data_to_send(self) -> bytes:
        out = self.inner.data_to_send() + bytes(self._extra)
        self._extra.clear()
        return out

    def close(self, reason: str, now: float) -> list[Event]:
        return self.inner.close(reason, now)


class Silent:
    """A StreamCore that never sends a byte: inside TLS, a peer that completes TLS and
    then says nothing (no Catalyst OPEN, no mesh HELLO)."""

    def start(self, now: float) -> list[Event]:
        return []

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        return [] if data else [ConnectionClosed("peer closed", by_peer=True)]

    def handle_timer(self, now: float) -> list[Event]:
        return []

    def get_timer(self) -> float | None:
        return None

    def data_to_send(self) -> bytes:
        return b""

    def close(self, reason: str, now: float) -> list[Event]:
        return [ConnectionClosed(reason)]


class CoreClient:
    """A real protocol core (BOTD, TLS around Catalyst or a mesh link) driven by hand
    over a socket: it reads only when asked, so it can authenticate honestly and then
    misbehave (stop reading, send what no core sends)."""

    def __init__(self, core: StreamCore, conn: Conn) -> None:
        self.core = core
        self.conn = conn
        self.closed: ConnectionClosed | None = None
        self.eof = False

    @classmethod
    async def open(
        cls, core: StreamCore, port: int, *, local: str = ATTACKER, rcvbuf: int | None = None
    ) -> CoreClient:
        conn = await open_conn(port, local=local, rcvbuf=rcvbuf)
        client = cls(core, conn)
        try:
            await client.act(lambda c: c.start(now()))
        except BaseException:
            await conn.aclose()
            raise
        return client

    async def aclose(self) -> None:
        await self.conn.aclose()

    async def __aenter__(self) -> CoreClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def act(self, action: Callable[[Any], list[Event] | None]) -> list[Event]:
        """Run ``action(core)`` and send what it produced."""
        events = action(self.core) or []
        self._note(events)
        await self.flush()
        return events

    async def flush(self) -> None:
        data = self.core.data_to_send()
        if data:
            await self.conn.send(data)

    async def inject(self, data: bytes) -> None:
        """Raw bytes on the socket, past the core."""
        await self.conn.send(data)

    async def read_events(self) -> list[Event]:
        """One read from the socket, fed to the core (EOF or a reset as ``b""``)."""
        try:
            data = await self.conn.reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
        events = self.core.receive_data(data, now()) if self.closed is None else []
        self._note(events)
        await self.flush()
        return events

    async def until(self, kind: type[EventT], within: float = WAIT) -> EventT:
        """Read until the core yields a ``kind`` event; fail if the connection ends first."""
        async with asyncio.timeout(within):
            while True:
                events = await self.read_events()
                for event in events:
                    if isinstance(event, kind):
                        return event
                    assert not isinstance(event, ConnectionClosed), event
                assert not self.eof, f"the server closed before {kind.__name__}"

    async def until_closed(self, within: float = WAIT) -> ConnectionClosed | None:
        """Read until the server ends the connection (its goodbye fed to the core)."""
        async with asyncio.timeout(within):
            while not self.eof:
                await self.read_events()
        return self.closed

    def _note(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, ConnectionClosed) and self.closed is None:
                self.closed = event


# --- what the server holds --------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """What one server-side connection holds: bytes not yet sent to the peer, bytes of
    events the driver queued for the application, and bytes the application itself
    holds for the peer (a BOTD channel's inbox, a request body)."""

    unsent: int
    queued: int
    app: int = 0


def driver_held(driver: StreamDriver[Any], app: int = 0) -> Held:
    transport = driver._transport
    unsent = 0
    if transport is not None and not transport.is_closing():
        unsent = transport.get_write_buffer_size()
    return Held(unsent, driver._queued_bytes, app)


@dataclass
class Peaks:
    connections: int = 0
    table_total: int = 0
    unauthenticated: int = 0
    attacker_held: int = 0  # the attacker's places in the table
    attacker_unauthenticated: int = 0
    unsent: int = 0  # the largest per connection
    queued: int = 0  # the largest per connection
    app: int = 0  # the largest per connection
    total_bytes: int = 0  # unsent + queued + app over all connections
    samples: int = 0


@dataclass
class Watch:
    """Samples a server every few milliseconds while an attack runs, and keeps the
    peaks: connections, table places, and the bytes each connection holds."""

    policy: ResourcePolicy
    held: Callable[[], Iterable[Held]]
    listener: Listener | None = None
    app_slack: int = 0  # what the application may hold past max_queued_bytes
    interval: float = 0.005
    peaks: Peaks = field(default_factory=Peaks)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watch:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sample()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)  # the sampling rate, not a wait
            self.sample()

    def sample(self) -> None:
        p = self.peaks
        p.samples += 1
        held = list(self.held())
        p.connections = max(p.connections, len(held))
        for h in held:
            p.unsent = max(p.unsent, h.unsent)
            p.queued = max(p.queued, h.queued)
            p.app = max(p.app, h.app)
        p.total_bytes = max(p.total_bytes, sum(h.unsent + h.queued + h.app for h in held))
        if self.listener is not None:
            table = self.listener.table
            p.table_total = max(p.table_total, table.total)
            p.unauthenticated = max(p.unauthenticated, table.unauthenticated)
            p.attacker_held = max(p.attacker_held, table.per_source(ATTACKER))
            pending = table._pending.get(ATTACKER)
            p.attacker_unauthenticated = max(p.attacker_unauthenticated, len(pending or ()))

    def check(self, *, unsent_slack: int = 0, queued_slack: int = 0) -> Peaks:
        """The server held no more than the policy allows: unsent output up to
        max_write_buffer (plus ``unsent_slack``: an HTTP response written in one piece),
        queued events up to max_queued_bytes plus one read (asyncio reads 256 KiB before
        the driver can pause; plus ``queued_slack``: an HTTP request body, which the app
        bounds), and as much again in the application (plus ``app_slack``: the message
        it was taking when it filled)."""
        p, policy, app_slack = self.peaks, self.policy, self.app_slack
        assert p.samples >= 2
        assert p.unsent <= policy.max_write_buffer + unsent_slack, p
        assert p.queued <= policy.max_queued_bytes + READ_SLACK + queued_slack, p
        assert p.app <= policy.max_queued_bytes + app_slack, p
        if self.listener is not None:
            assert p.table_total <= policy.max_connections, p
            assert p.unauthenticated <= policy.max_unauthenticated, p
            assert p.attacker_held <= policy.max_per_source, p
            assert p.attacker_unauthenticated <= policy.max_unauthenticated_per_source, p
            assert p.connections <= policy.max_connections, p
        per_connection = (
            policy.max_write_buffer
            + unsent_slack
            + queued_slack
            + 2 * policy.max_queued_bytes
            + READ_SLACK
            + app_slack
        )
        assert p.total_bytes <= policy.max_connections * per_connection, p
        return p


# --- the honest client --------------------------------------------------------------------


class Honest:
    """An honest client from 127.0.0.2 that runs ``exchange`` again and again while an
    attack runs (``async with``). Every exchange must succeed; at least one must have
    finished before the attack's end (the exit of the block)."""

    def __init__(self, exchange: Callable[[], Awaitable[None]], *, pause: float = 0.1) -> None:
        self._exchange = exchange
        self._pause = pause
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.served: list[float] = []  # when each exchange finished (loop time)
        self.attack_over: float | None = None
        self._changed = asyncio.Event()

    async def rounds(self, n: int = 2) -> AsyncIterator[int]:
        """``n`` attack rounds; each lasts (its body, then a wait) until the honest client
        has been served once more since it began: the attack runs while it is served."""
        for index in range(n):
            goal = len(self.served) + 1
            yield index
            await self.wait_served(goal)

    async def wait_served(self, n: int = 1, within: float = WAIT) -> None:
        """Until ``n`` exchanges have succeeded (fails if the loop ends first)."""
        async with asyncio.timeout(within):
            while len(self.served) < n:
                assert self._task is not None
                if self._task.done():
                    self._task.result()  # its failure, if it failed
                    raise AssertionError("the honest client stopped")
                self._changed.clear()
                await self._changed.wait()

    async def __aenter__(self) -> Honest:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        self.attack_over = now()
        self._stop.set()
        assert self._task is not None
        if exc_type is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            return
        async with asyncio.timeout(WAIT):
            await self._task  # an honest exchange that failed raises here
        assert self.served, "the honest client was never served"
        assert self.served[0] <= self.attack_over, "served only after the attack"

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            self._changed.set()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            async with asyncio.timeout(WAIT):
                await self._exchange()
            self.served.append(now())
            self._changed.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._pause):
                    await self._stop.wait()
