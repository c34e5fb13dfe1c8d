"""BRC-103 over Socket.IO, the reference SDKs' own socket binding (python-socketio).

``@bsv/authsocket`` (server) and ``@bsv/authsocket-client`` (client) carry each
AuthMessage as the Socket.IO event ``authMessage`` whose one argument is the message as a
JSON object. Application events travel inside signed general messages: the payload is
the UTF-8 of ``JSON.stringify({eventName, data})`` (:func:`encode_event`,
:func:`decode_event`).

The server (:class:`SocketIoServer`) mounts on an aiohttp app, beside whatever else the
app serves, at ``/socket.io/``; it keeps one :class:`~trustmesh.io.brc103.AsyncPeer` per
Socket.IO connection, as the reference keeps one Peer per socket. Under the listener's
resource policy (``trustmesh.io.limits``):

- Engine.IO sessions count against ``max_connections`` / ``max_per_source``, and those
  not yet proven by a signed BRC-103 message against ``max_unauthenticated`` /
  ``max_unauthenticated_per_source``; at a cap a half-open session makes room (never a
  proven one), else the newcomer is refused (401); a session that has not proven its
  identity within ``handshake_timeout`` is dropped (whatever its transport: polling or
  WebSocket);
- a packet is at most ``max_message`` bytes (Engine.IO's ``maxHttpBufferSize``), parsed
  by the strict JSON reader (no duplicate keys, NaN, deep nesting); binary packets
  (attachments) are refused, as BRC-103 never sends them;
- packets are handled in order, one at a time (no task per message); while the
  connection's peer has ``MAX_PENDING_SENDS`` replies unsent, or ``max_tasks`` tasks
  running, the socket is not read; a client that leaves ``MAX_QUEUED_PACKETS`` packets
  unread for ``write_stall_timeout`` is dropped, and one whose queue holds more than
  ``MAX_QUEUED_PACKETS`` when it sends a packet (or after its POST) is dropped at once;
  packets that only make the server queue an answer are refused: an Engine.IO UPGRADE
  outside an upgrade, a second Socket.IO CONNECT (each drops the session); packets that
  follow a drop in the same poll body are ignored;
- a polling session may upgrade to WebSocket once: a second upgrade request gets 400;
  the upgrade must complete (Engine.IO's probe, then UPGRADE) within
  ``handshake_timeout`` or the session is dropped; the upgraded connection counts as
  authenticated under the listener only once it has upgraded and the session is proven,
  and a drop closes every WebSocket the session had;
- a POST that Engine.IO refuses (a body over ``max_message``, chunked or not; a packet
  it does not know) is answered 400 at once and drops the session (Engine.IO itself
  would hold the POST until the client polled its CLOSE packet);
- more than ``HANDSHAKE_RATE`` initialRequests a second (bursts of ``HANDSHAKE_BURST``)
  drop the connection.

A packet that is not Socket.IO, an ``authMessage`` that is not an AuthMessage, or any
other malformed input raises a typed error (:class:`SocketIoPacketError`,
:class:`~trustmesh.brc103.errors.MalformedMessageError`) and drops that connection only.

The client (:func:`connect`, :class:`SocketIoClient`) speaks WebSocket only, its frames
bounded by ``max_message``, and reads packets with the same strict reader; what the
server sends beside AuthMessages lands in a bounded queue (:attr:`SocketIoClient.plain_events`).
python-socketio's client runs each incoming message as a short task of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import socketio  # type: ignore[import-untyped]
from aiohttp import web
from engineio import packet as eio_packet  # type: ignore[import-untyped]
from engineio.async_drivers import aiohttp as eio_aiohttp  # type: ignore[import-untyped]
from multidict import CIMultiDict, CIMultiDictProxy
from socketio import packet as sio_packet

from trustmesh.brc103.errors import Brc103Error, MalformedMessageError, TransportError
from trustmesh.brc103.messages import (
    MAX_MESSAGE_SIZE,
    AuthMessage,
    MessageType,
    parse_message,
)
from trustmesh.brc103.peer import GeneralMessageReceived, Peer, PeerConfig
from trustmesh.brc103.revocation import RevocationChecker
from trustmesh.brc103.wallet import Wallet
from trustmesh.errors import DecodeError
from trustmesh.io.brc103 import MAX_TASKS, AsyncPeer, MessageHandler
from trustmesh.io.https import mark_authenticated
from trustmesh.io.limits import ResourcePolicy, source_of
from trustmesh.ratelimit import TokenBucket
from trustmesh.wire.jsonwire import strict_loads

log = logging.getLogger(__name__)

AUTH_EVENT = "authMessage"
DEFAULT_PATH = "/socket.io/"
MAX_PACKET = MAX_MESSAGE_SIZE  # Engine.IO maxHttpBufferSize: one packet, or one poll body
MAX_PENDING_SENDS = 16  # replies not yet queued before we stop reading the client
MAX_QUEUED_PACKETS = 64  # packets queued to a client that is not reading them
SESSIONS_PER_CONNECTION = 4
HANDSHAKE_RATE = 2.0  # initialRequests per second per connection, on average
HANDSHAKE_BURST = 10
PING_INTERVAL = 25.0  # Engine.IO's defaults (the reference server's too)
PING_TIMEOUT = 20.0
PeerHandler = Callable[[AsyncPeer], Coroutine[Any, Any, None]]


class SocketIoPacketError(DecodeError):
    """A Socket.IO or Engine.IO packet we refuse: not one, binary, or its JSON."""


class SocketIoEventError(DecodeError):
    """A general message's payload that is not ``{"eventName": NAME, "data": ...}``."""


# --- application events inside general messages --------------------------------------


def encode_event(name: str, data: Any = None) -> bytes:
    """The general-message payload of event ``name``: ``JSON.stringify({eventName,
    data})`` as the reference sockets make it (``data`` left out when None, as
    ``JSON.stringify`` leaves out ``undefined``)."""
    value: dict[str, Any] = {"eventName": name}
    if data is not None:
        value["data"] = data
    return _dumps(value).encode("utf-8")


def decode_event(payload: bytes) -> tuple[str, Any]:
    """``(eventName, data)`` of a general message's payload (``data`` None when absent).
    Raises :class:`SocketIoEventError` for anything else (the reference falls back to
    event ``_unknown``; we refuse it)."""
    try:
        value = strict_loads(payload, max_size=MAX_MESSAGE_SIZE, error=SocketIoEventError)
    except DecodeError as exc:
        raise SocketIoEventError(f"event payload: {exc}") from None
    if not isinstance(value, dict):
        raise SocketIoEventError("an event payload is a JSON object")
    name = value.get("eventName")
    if not isinstance(name, str):
        raise SocketIoEventError("an event payload needs eventName, a string")
    return name, value.get("data")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# --- strict Socket.IO packets ---------------------------------------------------------


class _StrictJson:
    """The ``json`` that python-socketio's packets use: our strict reader."""

    @staticmethod
    def loads(text: str | bytes, **_kwargs: Any) -> Any:
        try:
            raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        except UnicodeEncodeError:
            raise SocketIoPacketError("packet text is not UTF-8") from None
        return strict_loads(raw, max_size=MAX_PACKET, error=SocketIoPacketError)

    @staticmethod
    def dumps(value: Any, **_kwargs: Any) -> str:
        return _dumps(value)


class StrictPacket(sio_packet.Packet):  # type: ignore[misc]
    """A Socket.IO packet read strictly: JSON by the strict reader, no binary packets
    (their attachments would be held until a count the sender chose), every failure a
    :class:`SocketIoPacketError`."""

    json = _StrictJson

    def __init__(self, *args: Any, encoded_packet: Any = None, **kwargs: Any) -> None:
        if encoded_packet is not None and not encoded_packet:
            raise SocketIoPacketError("an empty Socket.IO packet")
        super().__init__(*args, encoded_packet=encoded_packet, **kwargs)

    def decode(self, encoded_packet: Any) -> int:
        if not isinstance(encoded_packet, str):
            raise SocketIoPacketError("binary Socket.IO messages are not used by BRC-103")
        if not encoded_packet or not "0" <= encoded_packet[0] <= "6":
            raise SocketIoPacketError("not a Socket.IO packet")
        try:
            attachments = super().decode(encoded_packet)
        except DecodeError:
            raise
        except (ValueError, TypeError, IndexError) as exc:
            raise SocketIoPacketError(f"not a Socket.IO packet: {exc}") from None
        if attachments or self.packet_type in (sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK):
            raise SocketIoPacketError("binary Socket.IO packets are not used by BRC-103")
        return 0


def auth_message_of(args: tuple[Any, ...]) -> AuthMessage:
    """The AuthMessage an ``authMessage`` event carries (its one argument, a JSON
    object); :class:`MalformedMessageError` for anything else."""
    if len(args) != 1:
        raise MalformedMessageError(f"authMessage takes one argument, not {len(args)}")
    return parse_message(args[0])


# --- the transport --------------------------------------------------------------------


class SocketIoTransport:
    """A :class:`~trustmesh.io.brc103.MessageTransport` over one Socket.IO connection:
    ``send`` emits ``authMessage``; :meth:`deliver` takes what arrived."""

    def __init__(
        self,
        emit: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        handshake_rate: float = HANDSHAKE_RATE,
        handshake_burst: int = HANDSHAKE_BURST,
    ) -> None:
        self._emit = emit
        self._handler: MessageHandler | None = None
        self._handshakes = TokenBucket(handshake_rate, handshake_burst, time.monotonic())
        self.sent = asyncio.Event()  # set whenever a send ends

    def set_handler(self, handler: MessageHandler) -> None:
        self._handler = handler

    async def send(self, message: AuthMessage) -> None:
        try:
            await self._emit(message.to_json())
        finally:
            self.sent.set()

    def deliver(self, args: tuple[Any, ...]) -> None:
        """Hand an ``authMessage``'s arguments to the peer. Raises
        :class:`MalformedMessageError` for one that is not an AuthMessage and
        :class:`TransportError` past the handshake rate: the caller drops the connection."""
        message = auth_message_of(args)
        if message.message_type is MessageType.INITIAL_REQUEST and (
            self._handshakes.take(time.monotonic()) is not None
        ):
            raise TransportError("too many handshakes on one connection")
        if self._handler is not None:
            self._handler(message)


# --- the server -----------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Session:
    """One Engine.IO session (a client, over polling or WebSocket)."""

    source: str
    deadline: asyncio.TimerHandle | None = None
    proven: bool = False
    websocket: web.BaseRequest | None = None  # the request its WebSocket came up on
    connection: _Connection | None = None
    connects: int = 0  # Socket.IO CONNECT packets received
    upgrade: web.BaseRequest | None = None  # its one upgrade from polling (tried or done)
    upgrade_deadline: asyncio.TimerHandle | None = None
    requests: list[web.BaseRequest] = dataclasses.field(default_factory=list)  # WebSockets


@dataclasses.dataclass(eq=False)
class _Connection:
    """The Socket.IO connection on a session, and its peer."""

    sid: str
    eio_sid: str
    transport: SocketIoTransport
    peer: AsyncPeer
    app_task: asyncio.Task[None] | None = None


class _Body:
    """A request body already read, as the stream Engine.IO reads it from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, size: int = -1) -> bytes:
        if size < 0 or size >= len(self._data):
            data, self._data = self._data, b""
        else:
            data, self._data = self._data[:size], self._data[size:]
        return data


class _WithBody:
    """A request whose ``content`` is its body already read (see :class:`_Body`), and
    whose ``Content-Length`` is that body's length: Engine.IO reads that many bytes and
    checks them against ``max_http_buffer_size`` (a chunked body has none to check)."""

    def __init__(self, request: web.Request, body: bytes) -> None:
        self._request = request
        self.content = _Body(body)
        headers = CIMultiDict(request.headers)
        headers.popall("Transfer-Encoding", None)
        headers["Content-Length"] = str(len(body))
        self.headers = CIMultiDictProxy(headers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def _is_upgrade(request: web.BaseRequest) -> bool:
    """Would Engine.IO take this GET as a WebSocket (its own test: ``Connection:
    upgrade`` and ``Upgrade: websocket``)?"""
    connection = [token.strip() for token in request.headers.get("Connection", "").split(",")]
    return (
        "upgrade" in (token.lower() for token in connection)
        and request.headers.get("Upgrade", "").lower() == "websocket"
    )


class _WebSocket(eio_aiohttp.WebSocket):  # type: ignore[misc]
    """Engine.IO's aiohttp WebSocket, telling the owner when its session has upgraded
    (Engine.IO asks for the first packet after the upgrade right after switching)."""

    owner: SocketIoServer

    async def wait(self) -> Any:
        request = self.environ.get("aiohttp.request")
        eio_sid = request.query.get("sid", "") if request is not None else ""
        socket = self.server.sockets.get(eio_sid)
        if socket is not None and socket.upgraded and request is not None:
            self.owner._upgraded(eio_sid, request)
        return await super().wait()


class _Server(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server with three hooks of ours (private methods of 5.18, hence
    the minor pins of python-socketio and python-engineio, checked by
    tests/io/test_brc103_socketio_polling.py): every Engine.IO session is admitted (or
    refused) by the owner, a packet that raises drops its session (and one for a session
    already dropped is ignored), and a session's end is told to the owner."""

    def __init__(self, owner: SocketIoServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner = owner

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> Any:
        if not self._owner._admit(eio_sid, environ):
            return False
        return await super()._handle_eio_connect(eio_sid, environ)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        if eio_sid not in self._owner._sessions:
            return  # what followed a drop (in the same poll body): no manager entries
        try:
            self._owner._check_message(eio_sid, data)
            await super()._handle_eio_message(eio_sid, data)
        except (DecodeError, Brc103Error, ValueError, TypeError) as exc:
            await self._owner._refuse(eio_sid, exc)

    async def _handle_eio_disconnect(self, eio_sid: str, reason: Any = None) -> None:
        try:
            await super()._handle_eio_disconnect(eio_sid, reason)
        finally:
            self._owner._forget(eio_sid)


class SocketIoServer:
    """BRC-103 over Socket.IO for an aiohttp app: :meth:`install` it, and ``on_peer``
    gets each connection's peer once the client connects; the connection ends when the
    client goes or ``on_peer`` returns."""

    def __init__(
        self,
        wallet: Wallet,
        on_peer: PeerHandler,
        config: PeerConfig | None = None,
        *,
        revocation: RevocationChecker | None = None,
        policy: ResourcePolicy | None = None,
        path: str = DEFAULT_PATH,
        max_message: int = MAX_PACKET,
        max_tasks: int | None = None,
        cors_allowed_origins: str | list[str] | None = None,
    ) -> None:
        self.wallet = wallet
        self.on_peer = on_peer
        self.policy = policy or ResourcePolicy()
        self.revocation = revocation
        self.max_tasks = max_tasks or self.policy.max_tasks
        self.path = "/" + path.strip("/") + "/"
        # One client per connection: a few sessions are plenty (a re-handshake or two).
        self.config = dataclasses.replace(
            config or PeerConfig(),
            max_sessions=SESSIONS_PER_CONNECTION,
            max_unproven_sessions=SESSIONS_PER_CONNECTION,
        )
        self.sio = _Server(
            self,
            async_mode="aiohttp",
            serializer=StrictPacket,
            async_handlers=False,  # in order, one at a time: no task per packet
            max_http_buffer_size=max_message,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            cors_allowed_origins=cors_allowed_origins,
            logger=False,
            engineio_logger=False,
        )
        websocket = type("_WebSocket", (_WebSocket,), {"owner": self})
        self.sio.eio._async = {**self.sio.eio._async, "websocket": websocket}
        self.sio.eio.disconnect = self._eio_disconnect
        self.sio.on("connect", self._connect)
        self.sio.on("disconnect", self._disconnect)
        self.sio.on(AUTH_EVENT, self._auth_message)
        self._sessions: dict[str, _Session] = {}
        self._connections: dict[str, _Connection] = {}  # by Socket.IO sid
        self.refused = 0  # connections dropped for what they sent (for tests and logs)
        self._dropping: set[asyncio.Task[None]] = set()

    @property
    def identity_key(self) -> str:
        return self.wallet.identity_key

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def install(self, app: web.Application) -> None:
        """Serve Socket.IO at :attr:`path` of ``app``. Its requests bypass the app's
        other middlewares (a BRC-104 one would refuse them: Socket.IO authenticates
        inside, with BRC-103)."""
        self.sio.attach(app, socketio_path=self.path)
        app.middlewares.insert(0, self._middleware)
        app.on_shutdown.append(self._shutdown)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path != self.path:
            return await handler(request)
        eio_sid = request.query.get("sid", "")
        session = self._sessions.get(eio_sid)
        if session is not None and request.method == "GET" and _is_upgrade(request):
            refusal = self._start_upgrade(eio_sid, session, request)
            if refusal is not None:
                return refusal
        if request.method == "POST" and request.body_exists:
            # A polling client's packets. The listener may have read the body already
            # (under its body deadline); Engine.IO is handed the bytes, not the stream.
            body = await request.read()
            response: web.StreamResponse = await self.sio.handle_request(_WithBody(request, body))
            if session is not None:
                self._check_queue(eio_sid)
        else:
            response = await self.sio.handle_request(request)
        return response

    # --- upgrades from polling to WebSocket -------------------------------------------

    def _start_upgrade(
        self, eio_sid: str, session: _Session, request: web.Request
    ) -> web.StreamResponse | None:
        """A polling session's request to upgrade to WebSocket: one per session, ever
        (the refusal is a 400), and it must complete (Engine.IO's probe, then UPGRADE)
        within ``handshake_timeout`` or the session is dropped. Its connection counts as
        authenticated only once it has upgraded and the session is proven."""
        if session.websocket is not None or session.upgrade is not None:
            log.info("refused a second WebSocket upgrade of one Socket.IO session")
            return web.Response(status=400, text="one upgrade per session")
        session.upgrade = request
        session.requests.append(request)
        session.upgrade_deadline = asyncio.get_running_loop().call_later(
            self.policy.handshake_timeout, self._upgrade_late, eio_sid
        )
        return None

    def _upgrade_late(self, eio_sid: str) -> None:
        session = self._sessions.get(eio_sid)
        if session is not None and session.websocket is None:
            log.info("dropping a Socket.IO session whose WebSocket upgrade did not complete")
            self._drop_soon(eio_sid)

    def _upgraded(self, eio_sid: str, request: web.BaseRequest) -> None:
        """Engine.IO has switched the session to the WebSocket on ``request``."""
        session = self._sessions.get(eio_sid)
        if session is None or session.upgrade is not request or session.websocket is not None:
            return
        session.websocket = request
        if session.upgrade_deadline is not None:
            session.upgrade_deadline.cancel()
            session.upgrade_deadline = None
        if session.proven:
            mark_authenticated(request)

    # --- what a client may make us queue ----------------------------------------------

    def _check_packet(self, eio_sid: str, socket: Any, pkt: Any) -> bool:
        """Every Engine.IO packet from the client, before Engine.IO handles it: False to
        ignore it (its session is gone). A client whose queue already holds more than
        ``MAX_QUEUED_PACKETS`` packets, or that sends UPGRADE outside an upgrade (each
        would queue a NOOP), is dropped."""
        if eio_sid not in self._sessions:
            return False
        if pkt.packet_type == eio_packet.UPGRADE and not socket.upgrading:
            self._refuse_soon(eio_sid, SocketIoPacketError("an UPGRADE packet outside an upgrade"))
            return False
        return self._check_queue(eio_sid)

    def _check_queue(self, eio_sid: str) -> bool:
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is None or socket.queue.qsize() <= MAX_QUEUED_PACKETS:
            return True
        self._refuse_soon(eio_sid, TransportError("too many packets queued to a client"))
        return False

    def _check_message(self, eio_sid: str, data: Any) -> None:
        """A Socket.IO packet, before python-socketio handles it: a second CONNECT (each
        would queue a CONNECT or CONNECT_ERROR) raises."""
        session = self._sessions.get(eio_sid)
        if session is not None and isinstance(data, str) and data[:1] == "0":
            session.connects += 1
            if session.connects > 1:
                raise SocketIoPacketError("a second Socket.IO CONNECT on one session")

    def _refuse_soon(self, eio_sid: str, exc: Exception) -> None:
        self.refused += 1
        log.info("dropping a Socket.IO session that sent %s: %s", type(exc).__name__, exc)
        session = self._sessions.pop(eio_sid, None)
        if session is not None:
            self._drop_soon(eio_sid, session)

    async def _eio_disconnect(self, sid: str | None = None) -> None:
        """Engine.IO's ``disconnect``, which it calls when a request fails (a POST body
        over ``max_message``, an unknown packet): a drop, not Engine.IO's close, which
        waits for the client to read its CLOSE packet (a polling client that never polls
        would hold the failed request open for ever)."""
        for eio_sid in [sid] if sid is not None else list(self.sio.eio.sockets):
            await self._drop(eio_sid)

    async def _shutdown(self, _app: web.Application) -> None:
        for eio_sid in list(self._sessions):
            await self._drop(eio_sid)

    # --- admission and deadlines ------------------------------------------------------

    def _admit(self, eio_sid: str, environ: dict[str, Any]) -> bool:
        """Admit a new Engine.IO session under the policy's caps. At the cap on all
        sessions or on unproven ones, a half-open (unproven) session makes room, chosen
        as the BRC-103 peer chooses (docs/protocols/brc103.md, 5): the oldest of the
        source holding the most, if it holds more than this source will, else this
        source's own oldest; a source at its own cap evicts only its own. Proven
        sessions are never evicted for a newcomer: with none half-open, it is refused."""
        request = environ.get("aiohttp.request")
        source = source_of(getattr(request, "remote", None) or "unknown")
        policy = self.policy
        held = [s for s in self._sessions.values() if s.source == source]
        held_unproven = sum(1 for s in held if not s.proven)
        unproven = sum(1 for s in self._sessions.values() if not s.proven)
        refusal = victim = None
        if len(held) >= policy.max_per_source or (
            held_unproven >= policy.max_unauthenticated_per_source
        ):
            # A source at its cap makes room only from its own half-open sessions.
            victim = self._half_open_victim(source, held_unproven, own=True)
            refusal = "max_per_source" if victim is None else None
        elif len(self._sessions) >= policy.max_connections or unproven >= (
            policy.max_unauthenticated
        ):
            victim = self._half_open_victim(source, held_unproven)
            refusal = "max_connections" if victim is None else None
        if victim is not None:
            log.info("evicting a half-open Socket.IO session for a new one")
            self._drop_soon(victim, self._sessions.pop(victim))
        if refusal is not None:
            log.info("refused a Socket.IO session from %s: %s", source, refusal)
            return False
        session = _Session(source)
        if (
            isinstance(request, web.BaseRequest)
            and request.headers.get("Upgrade", "").lower() == "websocket"
        ):
            session.websocket = request
            session.requests.append(request)
        session.deadline = asyncio.get_running_loop().call_later(
            policy.handshake_timeout, self._late, eio_sid
        )
        self._sessions[eio_sid] = session
        self._watch(eio_sid)
        return True

    def _watch(self, eio_sid: str) -> None:
        """Put :meth:`_check_packet` before Engine.IO's handling of every packet the
        client sends on this session (polling or WebSocket)."""
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is None:
            return
        receive = socket.receive

        async def checked(pkt: Any) -> None:
            if self._check_packet(eio_sid, socket, pkt):
                await receive(pkt)

        socket.receive = checked

    def _half_open_victim(
        self, source: str, held_unproven: int, *, own: bool = False
    ) -> str | None:
        oldest: dict[str, str] = {}  # source -> its oldest unproven session
        counts: dict[str, int] = {}
        for eio_sid, session in self._sessions.items():  # oldest first
            if not session.proven:
                oldest.setdefault(session.source, eio_sid)
                counts[session.source] = counts.get(session.source, 0) + 1
        if own or not counts:
            return oldest.get(source)
        top = max(counts, key=lambda s: counts[s])
        if counts[top] > held_unproven + 1:
            return oldest[top]
        return oldest.get(source) or next(iter(oldest.values()))

    def _late(self, eio_sid: str) -> None:
        session = self._sessions.get(eio_sid)
        if session is not None and not session.proven:
            log.info("dropping a Socket.IO session that did not authenticate in time")
            self._drop_soon(eio_sid)

    def _drop_soon(self, eio_sid: str, session: _Session | None = None) -> None:
        """:meth:`_drop` in a task of its own: from the timer, or from a task of the
        connection's peer (which the drop cancels and waits for)."""
        task = asyncio.get_running_loop().create_task(self._drop(eio_sid, session))
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    def _proven(self, eio_sid: str) -> None:
        session = self._sessions.get(eio_sid)
        if session is None or session.proven:
            return
        session.proven = True
        if session.deadline is not None:
            session.deadline.cancel()
            session.deadline = None
        if session.websocket is not None:
            mark_authenticated(session.websocket)

    def _forget(self, eio_sid: str) -> None:
        session = self._sessions.pop(eio_sid, None)
        if session is not None:
            for timer in (session.deadline, session.upgrade_deadline):
                if timer is not None:
                    timer.cancel()

    async def _refuse(self, eio_sid: str, exc: Exception) -> None:
        self.refused += 1
        log.info("dropping a Socket.IO session that sent %s: %s", type(exc).__name__, exc)
        await self._drop(eio_sid)

    async def _drop(self, eio_sid: str, session: _Session | None = None) -> None:
        """End a session now: no goodbye waited for (a client that does not read would
        hold it), its WebSocket (if any) closed under it."""
        session = session or self._sessions.get(eio_sid)
        if session is not None:
            for timer in (session.deadline, session.upgrade_deadline):
                if timer is not None:
                    timer.cancel()
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is not None:
            with contextlib.suppress(Exception):
                await socket.close(wait=False, abort=True)
            with contextlib.suppress(asyncio.QueueFull):
                socket.queue.put_nowait(None)  # wake a waiting poll or the writer
            self.sio.eio.sockets.pop(eio_sid, None)
        self._forget(eio_sid)
        for request in session.requests if session is not None else ():
            transport = request.transport  # every WebSocket it had, upgraded or not
            if transport is not None:
                transport.close()

    # --- Socket.IO events ---------------------------------------------------------------

    async def _connect(self, sid: str, _environ: dict[str, Any], _auth: Any = None) -> bool:
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        session = self._sessions.get(eio_sid)
        if session is None or session.connection is not None:
            return False  # one Socket.IO connection (one peer) per session
        sio = self.sio

        async def emit(message: dict[str, Any]) -> None:
            await sio.emit(AUTH_EVENT, message, to=sid)
            await self._wait_written(eio_sid)

        transport = SocketIoTransport(emit)
        peer = AsyncPeer(
            Peer(self.wallet, self.config, revocation=self.revocation),
            transport,
            max_tasks=self.max_tasks,
        )
        peer.on_proven(lambda _event: self._proven(eio_sid))
        connection = _Connection(sid, eio_sid, transport, peer)
        session.connection = connection
        self._connections[sid] = connection
        connection.app_task = asyncio.get_running_loop().create_task(self._run_app(connection))
        return True

    async def _run_app(self, connection: _Connection) -> None:
        try:
            await self.on_peer(connection.peer)
        except Exception as exc:
            log.warning("a BRC-103 Socket.IO application ended with an error: %r", exc)
        if connection.sid in self._connections:  # the application is done: hang up
            await self._drop(connection.eio_sid)

    async def _disconnect(self, sid: str, _reason: Any = None) -> None:
        connection = self._connections.pop(sid, None)
        if connection is None:
            return
        task = connection.app_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await connection.peer.close()
        # One Socket.IO connection per session: without it, the session has no use.
        if connection.eio_sid in self._sessions:
            await self._drop(connection.eio_sid)

    async def _auth_message(self, sid: str, *args: Any) -> None:
        connection = self._connections.get(sid)
        if connection is None:
            return
        connection.transport.deliver(args)  # raises: the session is dropped
        peer = connection.peer
        await asyncio.sleep(0)  # let the replies this message queued start
        while peer.pending_sends >= MAX_PENDING_SENDS and sid in self._connections:
            connection.transport.sent.clear()
            await connection.transport.sent.wait()
        await peer.wait_for_room()

    async def _wait_written(self, eio_sid: str) -> None:
        """Hold the sender while the client leaves too many packets unread; drop the
        client when it has not read them within ``write_stall_timeout``."""
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is None or socket.queue.qsize() < MAX_QUEUED_PACKETS:
            return
        try:
            await asyncio.wait_for(socket.queue.join(), self.policy.write_stall_timeout)
        except TimeoutError:
            log.info("dropping a Socket.IO client that stopped reading")
            self._drop_soon(eio_sid)
            raise TransportError("the client stopped reading") from None


async def echo_events(peer: AsyncPeer) -> None:
    """A :class:`SocketIoServer` application (``trustmesh brc103 serve``'s): every
    authenticated event ``X`` with data ``D`` is answered with event ``echo``, data
    ``{"eventName": X, "data": D, "from": <client identity key>}``. A general message that
    is not an event ends the connection."""
    refused = asyncio.Event()

    async def answer(event: GeneralMessageReceived) -> None:
        try:
            name, data = decode_event(event.payload)
        except SocketIoEventError as exc:
            log.info("closing a Socket.IO connection that sent %s", exc)
            refused.set()
            return
        reply = {"eventName": name, "data": data, "from": event.identity_key}
        await peer.send_general(encode_event("echo", reply), identity_key=event.identity_key)

    peer.on_general_message(answer)
    await refused.wait()


# --- the client -----------------------------------------------------------------------


class SocketIoClient:
    """A BRC-103 Socket.IO client, as ``@bsv/authsocket-client``: :meth:`emit` sends an
    application event in a signed general message; :meth:`events` yields what the server
    sends, authenticated. Other (plain, unauthenticated) Socket.IO events land in
    :attr:`plain_events`. Made by :func:`connect`."""

    def __init__(self, sio: socketio.AsyncClient, peer: AsyncPeer) -> None:
        self.sio = sio
        self.peer = peer
        self.server_identity_key: str | None = None
        self._events: asyncio.Queue[tuple[str, Any, str]] = asyncio.Queue(64)
        self.plain_events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(64)
        self.closed = asyncio.Event()
        self.error: Exception | None = None
        peer.on_general_message(self._general)

    def _general(self, event: GeneralMessageReceived) -> None:
        self.server_identity_key = event.identity_key
        try:
            name, data = decode_event(event.payload)
        except SocketIoEventError as exc:
            self.peer.errors.append(exc)
            log.info("ignored a general message that is not an event: %s", exc)
            return
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait((name, data, event.identity_key))

    async def emit(self, name: str, data: Any = None) -> str:
        """Send event ``name`` with ``data`` (handshaking first if needed); return the
        server's identity key."""
        key = await self.peer.send_general(
            encode_event(name, data), identity_key=self.server_identity_key
        )
        self.server_identity_key = key
        return key

    async def next_event(self) -> tuple[str, Any, str]:
        """The next authenticated event: ``(name, data, server identity key)``."""
        return await self._events.get()


@contextlib.asynccontextmanager
async def connect(
    url: str,
    wallet: Wallet,
    config: PeerConfig | None = None,
    *,
    revocation: RevocationChecker | None = None,
    path: str = DEFAULT_PATH,
    connect_timeout: float = 10.0,
    max_message: int = MAX_PACKET,
    max_tasks: int = MAX_TASKS,
) -> AsyncIterator[SocketIoClient]:
    """Connect to the Socket.IO server at ``url`` (over WebSocket, whose frames are
    bounded by ``max_message``) and yield a :class:`SocketIoClient` (not yet
    handshaken: the first ``emit`` does that)."""
    http = aiohttp.ClientSession()
    sio = socketio.AsyncClient(
        reconnection=False,
        serializer=StrictPacket,
        handle_sigint=False,
        request_timeout=connect_timeout,
        http_session=http,
        websocket_extra_options={"max_msg_size": max_message},
    )

    async def emit(message: dict[str, Any]) -> None:
        await sio.emit(AUTH_EVENT, message)

    transport = SocketIoTransport(emit)
    peer = AsyncPeer(Peer(wallet, config, revocation=revocation), transport, max_tasks=max_tasks)
    client = SocketIoClient(sio, peer)

    def on_auth(*args: Any) -> None:
        try:
            transport.deliver(args)
        except (DecodeError, Brc103Error) as exc:
            client.error = exc
            log.info("the Socket.IO server sent %s: %s", type(exc).__name__, exc)
            asyncio.get_running_loop().create_task(sio.disconnect())

    def on_any(event: str, *args: Any) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            client.plain_events.put_nowait((event, args[0] if len(args) == 1 else list(args)))

    def on_disconnect(*_args: Any) -> None:
        client.closed.set()

    sio.on(AUTH_EVENT, on_auth)
    sio.on("*", on_any)
    sio.on("disconnect", on_disconnect)
    try:
        try:
            await sio.connect(
                url, transports=["websocket"], socketio_path=path, wait_timeout=connect_timeout
            )
        except socketio.exceptions.ConnectionError as exc:
            raise TransportError(f"cannot connect to {url}: {exc}") from None
        try:
            yield client
        finally:
            await peer.close()
            await sio.disconnect()
    finally:
        await http.close()
