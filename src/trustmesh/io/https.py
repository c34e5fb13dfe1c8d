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
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from cryptography import x509

from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls.context import TlsContext
from trustmesh.tls.stream import DEFAULT_HANDSHAKE_TIMEOUT, TlsEstablished, TlsStream

log = logging.getLogger("trustmesh.io.https")

PEER_CHAIN = "trustmesh_peer_chain"  # get_extra_info key: tuple[x509.Certificate, ...]


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
    """One accepted TCP connection: TLS on the socket, an aiohttp protocol on top."""

    def __init__(
        self,
        context: TlsContext,
        app_factory: Callable[[], asyncio.BaseProtocol],
        handshake_timeout: float,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._app_factory = app_factory
        self._inner = _Plaintext(self)
        self._tls = TlsStream(context, self._inner, handshake_timeout=handshake_timeout)
        self._raw: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._pending: list[bytes] = []  # plaintext that came with the handshake's end
        self._chain: tuple[x509.Certificate, ...] = ()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.transport = _PlaintextTransport(self)

    # --- the socket side ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        self._step(lambda now: self._tls.start(now))
        deadline = self._tls.get_timer()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def data_received(self, data: bytes) -> None:
        self._step(lambda now: self._tls.receive_data(data, now))

    def eof_received(self) -> bool:
        self._step(lambda now: self._tls.receive_data(b"", now))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._app is not None:
            app, self._app = self._app, None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # --- the HTTP side ------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        if self._app is None:
            self._pending.append(data)
        else:
            self._app.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            return
        self._inner.queue(data)
        self._flush()

    def close(self) -> None:
        self._step(lambda now: self._tls.close("closed by the HTTP server", now))
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
        if name == "sslcontext":
            return self._tls.context  # aiohttp: a truthy value means the scheme is https
        if name == "ssl_object":
            return None
        return self._raw.get_extra_info(name, default) if self._raw else default

    @property
    def raw(self) -> asyncio.Transport | None:
        return self._raw

    @property
    def closing(self) -> bool:
        return self._closed or self._raw is None or self._raw.is_closing()

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
        app = self._app_factory()
        assert isinstance(app, asyncio.Protocol)
        self._app = app
        app.connection_made(self.transport)
        pending, self._pending = self._pending, []
        for data in pending:
            app.data_received(data)

    def _flush(self) -> None:
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
        self._step(lambda now: self._tls.handle_timer(now))


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
    """An aiohttp site that serves a runner's app over trustmesh TLS.

    ``context`` is a server :class:`TlsContext`; assign :attr:`context` to switch
    certificates (a renewed one) for new connections while live ones keep theirs.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        context: TlsContext,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self.context = context
        self._handshake_timeout = handshake_timeout
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"https://{host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        app_factory = self._runner.server
        assert app_factory is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HttpsConnection(self.context, app_factory, self._handshake_timeout),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
        self._bound_port = int(self._server.sockets[0].getsockname()[1])
