"""HTTPS for aiohttp apps on trustmesh's own TLS layer (pyOpenSSL, TLS 1.3 only).

aiohttp's sites speak TLS through the stdlib ``ssl`` module. :class:`HttpsSite` puts
:class:`~trustmesh.tls.TlsStream` underneath instead, so an API server gets the same
TLS as every other trustmesh link (one context built once, post-quantum groups, the
client's certificate chain) and can *request* client certificates without failing the
handshake: the application then answers 401 with a JSON body, which a TLS alert is not.

Handlers find the peer's chain (leaf first, as presented, not verified) with
``request.transport.get_extra_info(PEER_CHAIN)``; see :func:`peer_chain`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from cryptography import x509

from trustmesh.io.limits import Admission, ResourcePolicy
from trustmesh.io.listener import Listener
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls.context import TlsContext
from trustmesh.tls.stream import TlsEstablished, TlsStream

log = logging.getLogger("trustmesh.io.https")

PEER_CHAIN = "trustmesh_peer_chain"  # get_extra_info key: tuple[x509.Certificate, ...]
CONNECTION = "trustmesh_http_connection"  # get_extra_info key: the connection object


def connection_policy(request: web.BaseRequest) -> ResourcePolicy:
    """The resource policy of the listener this request came in on (the defaults when it
    was not served by :class:`HttpsSite`)."""
    connection = _connection(request)
    return connection.policy if connection is not None else ResourcePolicy()


def mark_authenticated(request: web.BaseRequest) -> None:
    """The protocol running over this (upgraded) request's connection has authenticated
    its peer: end its handshake deadline and protect it from eviction."""
    connection = _connection(request)
    if connection is not None:
        connection.authenticated()


def _connection(request: web.BaseRequest) -> _HttpsConnection | None:
    transport = request.transport
    connection = transport.get_extra_info(CONNECTION) if transport is not None else None
    return connection if isinstance(connection, _HttpsConnection) else None


def peer_chain(request: web.Request) -> tuple[x509.Certificate, ...]:
    """The client's certificate chain on this request's connection (empty without one)."""
    transport = request.transport
    chain = transport.get_extra_info(PEER_CHAIN) if transport is not None else None
    return tuple(chain) if chain else ()


class _Plaintext:
    """The StreamCore inside TLS: plaintext in goes to the HTTP protocol, the HTTP
    protocol's writes come out."""

    def __init__(self, connection: _HttpsConnection) -> None:
        self._connection = connection
        self._out = bytearray()

    def queue(self, data: bytes | bytearray | memoryview) -> None:
        self._out += data  # one copy, into the buffer TLS encrypts from

    def start(self, now: float) -> list[Event]:
        return []

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if not data:
            return [ConnectionClosed("peer closed the connection", by_peer=True)]
        self._connection.deliver(data)
        return []

    def handle_timer(self, now: float) -> list[Event]:
        return []

    def get_timer(self) -> float | None:
        return None

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def close(self, reason: str, now: float) -> list[Event]:
        return [ConnectionClosed(reason)]


class _HttpsConnection(asyncio.Protocol):
    """One accepted TCP connection: TLS on the socket (unless plain HTTP), an aiohttp
    protocol on top, and the policy's deadlines around it (see :class:`HttpsSite`)."""

    def __init__(
        self,
        context: TlsContext | None,
        app_factory: Callable[[], asyncio.BaseProtocol],
        admission: Admission,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._app_factory = app_factory
        self._admission = admission
        self._policy = admission.policy
        self._inner = _Plaintext(self)
        self._tls = (
            TlsStream(context, self._inner, handshake_timeout=self._policy.handshake_timeout)
            if context is not None
            else None
        )
        self._raw: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._pending: list[bytes] = []  # plaintext that came with the handshake's end
        self._chain: tuple[x509.Certificate, ...] = ()
        self._timer: asyncio.TimerHandle | None = None  # TLS's own handshake timer
        self._deadline: asyncio.TimerHandle | None = None  # the policy's current deadline
        self._deadline_kind = ""
        self._requests = 0  # requests being handled
        self._heard = False
        self._stall: asyncio.TimerHandle | None = None
        self._closed = False
        self.transport = _PlaintextTransport(self)

    # --- the socket side ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._raw = cast(asyncio.Transport, transport)
        self._admission.evict = lambda reason: self._drop("evicted", reason)
        now = self._loop.time()
        # Until the first request head: nothing at all for idle_timeout, and not done by
        # handshake_timeout after the accept.
        self._handshake_deadline = now + self._policy.handshake_timeout
        self._arm("idle_timeout", min(now + self._policy.idle_timeout, self._handshake_deadline))
        if self._tls is None:
            self._start_app()
            return
        self._step(lambda now: self._tls.start(now) if self._tls else [])
        deadline = self._tls.get_timer()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def data_received(self, data: bytes) -> None:
        if not self._heard:
            self._heard = True
            if self._deadline_kind == "idle_timeout":
                self._arm("handshake_timeout", self._handshake_deadline)
        if self._tls is None:
            self.deliver(data)
        else:
            self._step(lambda now: self._tls.receive_data(data, now) if self._tls else [])

    def eof_received(self) -> bool:
        if self._tls is None:
            return False
        self._step(lambda now: self._tls.receive_data(b"", now) if self._tls else [])
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._admission.release()
        for handle in (self._timer, self._deadline, self._stall):
            if handle is not None:
                handle.cancel()
        if self._app is not None:
            app, self._app = self._app, None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._stall is None:
            self._stall = self._loop.call_later(
                self._policy.write_stall_timeout,
                lambda: self._drop("write_stall_timeout", "the client stopped reading"),
            )
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._app is not None:
            self._app.resume_writing()

    # --- the HTTP side ------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        if self._requests == 0 and self._deadline_kind == "keepalive_timeout":
            # A new request begins: its head must be complete within header_timeout.
            self._arm("header_timeout", self._loop.time() + self._policy.header_timeout)
        if self._app is None:
            self._pending.append(data)
        else:
            self._app.data_received(data)

    @property
    def policy(self) -> ResourcePolicy:
        return self._policy

    def request_started(self, *, upgrade: bool = False) -> None:
        """aiohttp has parsed a request head (the handler wrapper tells us). A request
        proves the client speaks HTTP; an upgrade (WebSocket) proves nothing yet: its
        protocol has ``handshake_timeout`` from now to authenticate
        (:func:`mark_authenticated`)."""
        self._requests += 1
        if upgrade:
            self._arm("handshake_timeout", self._loop.time() + self._policy.handshake_timeout)
            return
        self._cancel_deadline()
        self._admission.authenticated(self._loop.time())

    def authenticated(self) -> None:
        if self._deadline_kind == "handshake_timeout":
            self._cancel_deadline()
        self._admission.authenticated(self._loop.time())

    def request_finished(self) -> None:
        self._requests -= 1
        if self._requests == 0 and not self._closed:
            self._arm("keepalive_timeout", self._loop.time() + self._policy.keepalive_timeout)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            return
        if self._tls is None:
            if self._raw is not None and not self._raw.is_closing():
                self._raw.write(data)
            return
        self._inner.queue(data)
        self._flush()

    def close(self) -> None:
        if self._tls is None:
            self._finish(ConnectionClosed("closed by the HTTP server"))
            return
        self._step(
            lambda now: self._tls.close("closed by the HTTP server", now) if self._tls else []
        )
        if not self._closed:
            # The TLS session had already ended without saying so to us: the socket
            # must still close, or the HTTP server's shutdown waits for it in vain.
            self._finish(ConnectionClosed("closed by the HTTP server"))

    def abort(self) -> None:
        self._closed = True
        if self._raw is not None:
            self._raw.abort()

    def extra_info(self, name: str, default: Any) -> Any:
        if name == PEER_CHAIN:
            return self._chain
        if name == CONNECTION:
            return self
        if name == "sslcontext":
            # aiohttp: a truthy value means the scheme is https
            return self._tls.context if self._tls is not None else None
        if name == "ssl_object":
            return None
        return self._raw.get_extra_info(name, default) if self._raw else default

    @property
    def raw(self) -> asyncio.Transport | None:
        return self._raw

    @property
    def closing(self) -> bool:
        return self._closed or self._raw is None or self._raw.is_closing()

    # --- deadlines ------------------------------------------------------------------------

    def _arm(self, kind: str, deadline: float) -> None:
        self._cancel_deadline()
        self._deadline_kind = kind
        self._deadline = self._loop.call_at(deadline, self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._deadline_kind = ""

    def _on_deadline(self) -> None:
        kind, self._deadline, self._deadline_kind = self._deadline_kind, None, ""
        if kind == "keepalive_timeout":  # an idle client: an ordinary end, not an attack
            self.close()
            return
        self._drop(kind, "sent nothing" if kind == "idle_timeout" else "too slow")

    def _drop(self, limit: str, detail: str) -> None:
        if self._closed:
            return
        peer = self._raw.get_extra_info("peername") if self._raw is not None else None
        self._admission.stats.hit(limit, self._admission.source, detail)
        log.debug("dropping HTTP connection from %s: %s (%s)", peer, limit, detail)
        self.abort()

    # --- the pump -----------------------------------------------------------------------

    def _step(self, step: Callable[[float], list[Event]]) -> None:
        if self._closed:
            return
        events = step(self._loop.time())
        closing: ConnectionClosed | None = None
        for event in events:
            if isinstance(event, TlsEstablished):
                self._established(event)
            elif isinstance(event, ConnectionClosed):
                closing = closing or event
        self._flush()
        if closing is not None:
            self._finish(closing)

    def _established(self, event: TlsEstablished) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._chain = event.peer_chain
        self._start_app()

    def _start_app(self) -> None:
        # A Protocol, or a StreamDriver (a BaseProtocol with the same methods).
        app = cast(asyncio.Protocol, self._app_factory())
        assert hasattr(app, "data_received")
        self._app = app
        app.connection_made(self.transport)
        pending, self._pending = self._pending, []
        for data in pending:
            app.data_received(data)

    def _flush(self) -> None:
        if self._tls is None:
            return
        data = self._tls.data_to_send()
        if data and self._raw is not None and not self._raw.is_closing():
            self._raw.write(data)

    def _finish(self, event: ConnectionClosed) -> None:
        if self._closed:
            return
        self._closed = True
        if event.error:
            log.debug("HTTPS connection closed: %s", event.reason)
        if self._raw is not None:
            self._raw.close()  # connection_lost follows, and tells the HTTP protocol

    def _on_timer(self) -> None:
        self._timer = None
        self._step(lambda now: self._tls.handle_timer(now) if self._tls else [])


class _PlaintextTransport(asyncio.Transport):
    """What the aiohttp protocol sees: a transport whose bytes go through TLS."""

    def __init__(self, connection: _HttpsConnection) -> None:
        super().__init__()
        self._connection = connection

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._connection.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._connection.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self._connection.close()

    def abort(self) -> None:
        self._connection.abort()

    def is_closing(self) -> bool:
        return self._connection.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._connection.extra_info(name, default)

    def pause_reading(self) -> None:
        if self._connection.raw is not None:
            self._connection.raw.pause_reading()

    def resume_reading(self) -> None:
        if self._connection.raw is not None:
            self._connection.raw.resume_reading()

    def is_reading(self) -> bool:
        raw = self._connection.raw
        return raw is not None and raw.is_reading()

    def get_write_buffer_size(self) -> int:
        raw = self._connection.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._connection.raw is not None:
            self._connection.raw.set_write_buffer_limits(high, low)


class HttpsSite(web.BaseSite):
    """An aiohttp site that serves a runner's app over trustmesh TLS (or plain HTTP when
    ``context`` is None), under a resource policy.

    ``context`` is a server :class:`TlsContext`; assign :attr:`context` to switch
    certificates (a renewed one) for new connections while live ones keep theirs.

    The policy's deadlines: a new connection must send a byte within ``idle_timeout``
    and finish TLS and its first request head within ``handshake_timeout``; a later
    request head must be complete ``header_timeout`` after its first byte; a body may
    make no progress for ``body_timeout`` (408); an idle connection closes after
    ``keepalive_timeout``; a client that leaves a response unread for
    ``write_stall_timeout`` is dropped. Connections count in the listener's table, and a
    request in progress marks its connection as one to keep.

    With ``path``, it listens on a Unix socket there instead of ``host:port``
    (:meth:`Listener.listen_unix`: mode 0600, removed when the site stops).
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        context: TlsContext | None,
        *,
        policy: ResourcePolicy | None = None,
        name: str = "https",
        handshake_timeout: float | None = None,
        path: Path | None = None,
    ) -> None:
        policy = policy or ResourcePolicy()
        if handshake_timeout is not None:
            policy = policy.replace(handshake_timeout=handshake_timeout)
        super().__init__(runner, backlog=policy.backlog)
        self._host = host
        self._port = port
        self._path = path
        self.context = context
        self.policy = policy
        self._listener: Listener | None = None
        self._label = name

    @property
    def port(self) -> int:
        return self._listener.port if self._listener is not None else self._port

    @property
    def listener(self) -> Listener:
        """The listening socket, its connection table and its limit counters."""
        if self._listener is None:
            raise RuntimeError("the site is not started")
        return self._listener

    @property
    def name(self) -> str:
        scheme = "https" if self.context is not None else "http"
        if self._path is not None:
            return f"{scheme}+unix://{self._path}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        if not getattr(server.request_handler, "_trustmesh_deadlines", False):
            server.request_handler = _with_deadlines(server.request_handler, self.policy)
        listener = Listener(
            lambda admission: _HttpsConnection(self.context, server, admission),
            self.policy,
            name=self._label,
        )
        if self._path is not None:
            await listener.listen_unix(self._path)
        else:
            await listener.listen(self._host, self._port)
        self._listener = listener
        self._server = _ListenerServer(listener)


class _ListenerServer(asyncio.AbstractServer):
    """The Listener as the asyncio server aiohttp's site expects to close."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def close(self) -> None:
        self._listener.close()

    async def wait_closed(self) -> None:
        await self._listener.wait_closed()

    def is_serving(self) -> bool:
        return self._listener.is_serving()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def start_serving(self) -> None:
        return None  # a Listener serves from the moment it listens

    async def serve_forever(self) -> None:
        await self._listener.wait_stopped()


RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _with_deadlines(handler: RequestHandler, policy: ResourcePolicy) -> RequestHandler:
    """Wrap aiohttp's request handler: tell the connection a request began and ended,
    and read the body under ``body_timeout`` before the application sees it."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        connection = _connection(request)
        if connection is not None:
            upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
            connection.request_started(upgrade=upgrade)
        try:
            if request.body_exists:
                refused = await _read_body(request, policy)
                if refused is not None:
                    return refused
            return await handler(request)
        finally:
            if connection is not None:
                connection.request_finished()

    handle._trustmesh_deadlines = True  # type: ignore[attr-defined]
    return handle


async def _read_body(request: web.BaseRequest, policy: ResourcePolicy) -> web.Response | None:
    """Read (and cache) the whole body: a 408 if ``body_timeout`` passes with no
    progress, or if the whole body takes longer than ``header_timeout + body_timeout``
    (a body trickled a byte at a time); a 413 if it is larger than the application
    allows (at once when its Content-Length says so)."""
    limit = request.client_max_size if isinstance(request, web.Request) else 0
    declared = request.content_length
    if limit and declared is not None and declared > limit:
        return _refuse(413, "too_large", f"the body may be at most {limit} bytes")
    reading = asyncio.ensure_future(request.read())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + policy.header_timeout + policy.body_timeout
    seen = request.content.total_bytes
    try:
        while True:
            wait = min(policy.body_timeout, deadline - loop.time())
            done, _ = await asyncio.wait({reading}, timeout=max(wait, 0.0))
            if done:
                reading.result()
                return None
            progress = request.content.total_bytes
            if progress == seen:
                return _refuse(408, "timeout", f"no body bytes for {policy.body_timeout:g} s")
            if loop.time() >= deadline:
                return _refuse(408, "timeout", "the body is arriving too slowly")
            seen = progress
    except web.HTTPRequestEntityTooLarge as exc:
        return _refuse(413, "too_large", exc.text or "the body is too large")
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading


def _refuse(status: int, code: str, message: str) -> web.Response:
    """A JSON error after which the connection closes (the rest of the body is moot)."""
    response = web.json_response({"error": code, "message": message}, status=status)
    response.force_close()
    return response


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    *,
    context: TlsContext | None,
    policy: ResourcePolicy | None = None,
    name: str = "https",
    shutdown_timeout: float = 5.0,
) -> HttpServer:
    """Serve ``app`` on ``host:port`` (HTTPS with ``context``, else plain HTTP) under
    ``policy``; stop it with :meth:`HttpServer.stop`."""
    policy = policy or ResourcePolicy()
    runner = await _runner(app, policy, shutdown_timeout)
    site = HttpsSite(runner, host, port, context, policy=policy, name=name)
    return await _start(runner, site)


async def serve_unix_app(
    app: web.Application,
    path: Path,
    *,
    policy: ResourcePolicy | None = None,
    name: str = "http",
    shutdown_timeout: float = 5.0,
) -> HttpServer:
    """Serve ``app`` in plain HTTP on a Unix socket at ``path`` (mode 0600; a stale one
    replaced, a live one refused: :meth:`Listener.listen_unix`) under ``policy``; stop it
    with :meth:`HttpServer.stop`, which removes the socket file."""
    policy = policy or ResourcePolicy()
    runner = await _runner(app, policy, shutdown_timeout)
    site = HttpsSite(runner, "", 0, None, policy=policy, name=name, path=path)
    return await _start(runner, site)


async def _runner(
    app: web.Application, policy: ResourcePolicy, shutdown_timeout: float
) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=policy.keepalive_timeout,
        lingering_time=0,  # after a refused body, close at once: the rest is not read
    )
    await runner.setup()
    return runner


async def _start(runner: web.AppRunner, site: HttpsSite) -> HttpServer:
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return HttpServer(runner, site)


class HttpServer:
    """A running :func:`serve_app`."""

    def __init__(self, runner: web.AppRunner, site: HttpsSite) -> None:
        self.runner = runner
        self.site = site

    @property
    def port(self) -> int:
        return self.site.port

    @property
    def listener(self) -> Listener:
        return self.site.listener

    async def stop(self) -> None:
        await self.runner.cleanup()
