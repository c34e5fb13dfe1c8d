"""The asyncio driver of the BRC-103 peer, over any message transport.

A transport moves whole AuthMessages (in memory, over a WebSocket, ...). The driver
feeds what arrives to the sans-IO :class:`~trustmesh.brc103.peer.Peer`, sends what the
peer queues, arms its timer, and turns events into awaitable results: a handshake to
wait for, general messages for listeners and an async iterator.

A message the peer refuses is dropped and reported to ``on_error`` (BRC-103 has no error
message of its own); it never disturbs other sessions.

The work a peer does beside its reader (sending a reply, running an async listener) runs
as at most ``max_tasks`` tasks; more waits its turn in order, and a transport's reader
stops reading while the peer is at that cap (:meth:`AsyncPeer.wait_for_room`), so a
client cannot make us hold one task per message it sends, and no message it sent is
dropped for it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from trustmesh.brc103.certificates import VerifiableCertificate
from trustmesh.brc103.errors import Brc103Error, HandshakeTimeoutError, TransportError
from trustmesh.brc103.messages import (
    AuthMessage,
    MessageType,
    RequestedCertificates,
    parse_message_bytes,
)
from trustmesh.brc103.peer import (
    CertificatesReceived,
    CertificatesRequested,
    Event,
    GeneralMessageReceived,
    HandshakeCompleted,
    HandshakeFailed,
    HeldMessagesDropped,
    Peer,
)
from trustmesh.errors import DecodeError
from trustmesh.io.limits import ResourcePolicy

log = logging.getLogger(__name__)
MAX_INBOX = 1024  # general messages waiting for receive() when no listener takes them
MAX_ERRORS = 100
PROVING_EVENTS = (HandshakeCompleted, GeneralMessageReceived, CertificatesReceived)
MAX_TASKS = ResourcePolicy().max_tasks  # sends and async listeners running per peer
MessageHandler = Callable[[AuthMessage], None]
GeneralListener = Callable[[GeneralMessageReceived], Awaitable[None] | None]


class MessageTransport(Protocol):
    """Carries whole AuthMessages. ``send`` returns once the message is handed over;
    incoming ones go to the handler given to ``set_handler``."""

    async def send(self, message: AuthMessage) -> None: ...

    def set_handler(self, handler: MessageHandler) -> None: ...


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class PeerTimer:
    """Runs a sans-IO peer's timer on the event loop: re-armed after every step at the
    peer's next deadline, its events handed to ``on_events``."""

    def __init__(
        self, peer: Peer, clock: Callable[[], int], on_events: Callable[[list[Event]], None]
    ) -> None:
        self._peer = peer
        self._clock = clock
        self._on_events = on_events
        self._handle: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        self.cancel()
        deadline = self._peer.get_timer()
        if deadline is not None:
            delay = max(0.0, (deadline - self._clock()) / 1000)
            self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._on_events(self._peer.handle_timer(self._clock()))
        self.arm()


class AsyncPeer:
    def __init__(
        self,
        peer: Peer,
        transport: MessageTransport,
        *,
        clock: Callable[[], int] = monotonic_ms,
        on_error: Callable[[AuthMessage, Exception], None] | None = None,
        handshake_timeout: float = 10.0,
        max_tasks: int = MAX_TASKS,
    ) -> None:
        if max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")
        self.peer = peer
        self.max_tasks = max_tasks
        self.handshake_timeout = handshake_timeout
        self.transport = transport
        self._clock = clock
        self._on_error = on_error
        self._handshakes: dict[str, asyncio.Future[str]] = {}
        self._listeners: list[GeneralListener] = []
        self._certificate_listeners: list[Callable[[CertificatesReceived], None]] = []
        self._request_listeners: list[Callable[[CertificatesRequested], None]] = []
        self._proven_listeners: list[Callable[[Event], None]] = []
        self._inbox: asyncio.Queue[GeneralMessageReceived] = asyncio.Queue(MAX_INBOX)
        self.timer = PeerTimer(peer, clock, self._dispatch)
        self._tasks: set[asyncio.Future[None]] = set()
        # Work made while max_tasks tasks run, started in order as they finish.
        self._queued: collections.deque[Awaitable[None]] = collections.deque()
        self._room = asyncio.Event()  # set whenever a task finishes
        self._send_lock = asyncio.Lock()  # sends leave in the order they were made
        self.pending_sends = 0  # sends made and not yet handed to the transport
        # The latest refusals, for logs and tests (a hostile peer must not grow this).
        self.errors: collections.deque[Exception] = collections.deque(maxlen=MAX_ERRORS)
        transport.set_handler(self._on_message)

    @property
    def identity_key(self) -> str:
        return self.peer.identity_key

    @property
    def tasks_in_flight(self) -> int:
        """Background work made and not yet done: running tasks and work queued for them."""
        return len(self._tasks) + len(self._queued)

    def has_room(self) -> bool:
        """May the transport hand us another message (fewer than ``max_tasks`` in flight)?"""
        return self.tasks_in_flight < self.max_tasks

    async def wait_for_room(self) -> None:
        """Return once fewer than ``max_tasks`` tasks are in flight: a transport's reader
        awaits this before it reads the next message."""
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    # --- the application's side -------------------------------------------------------

    async def handshake(self, *, identity_key: str | None = None) -> str:
        """Start a handshake and wait for it; return the peer's verified identity key."""
        message = self.peer.initiate(self._clock(), peer_identity_key=identity_key)
        assert message.initial_nonce is not None
        nonce = message.initial_nonce
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._handshakes[nonce] = waiter
        self.timer.arm()
        try:
            await self._send(message)
            return await asyncio.wait_for(asyncio.shield(waiter), self.handshake_timeout)
        except TimeoutError:
            self.peer.forget(nonce)
            raise HandshakeTimeoutError("no initialResponse in time") from None
        finally:
            self._handshakes.pop(nonce, None)

    async def session_with(self, identity_key: str | None) -> str:
        """The peer identity of an authenticated session, handshaking if there is none."""
        if identity_key is not None and self.peer.has_session(identity_key):
            return identity_key
        return await self.handshake(identity_key=identity_key)

    async def send_general(self, payload: bytes, *, identity_key: str | None = None) -> str:
        """Send ``payload`` to ``identity_key`` (or to whoever answers a new handshake);
        return the identity key it went to."""
        identity_key = await self.session_with(identity_key)
        await self._send(self.peer.create_general(payload, identity_key=identity_key))
        return identity_key

    async def request_certificates(
        self, requested: RequestedCertificates, *, identity_key: str
    ) -> None:
        await self._send(self.peer.create_certificate_request(requested, identity_key=identity_key))

    def on_general_message(self, listener: GeneralListener) -> None:
        self._listeners.append(listener)

    def on_certificates(self, listener: Callable[[CertificatesReceived], None]) -> None:
        self._certificate_listeners.append(listener)

    def on_certificates_requested(self, listener: Callable[[CertificatesRequested], None]) -> None:
        self._request_listeners.append(listener)

    def on_proven(self, listener: Callable[[Event], None]) -> None:
        """Hear of every event that proves the other side holds its identity key: our
        handshake answered (signed), or a signed message or certificates from it."""
        self._proven_listeners.append(listener)

    async def receive(self) -> GeneralMessageReceived:
        """The next general message that no listener took (wrap in ``asyncio.timeout``)."""
        return await self._inbox.get()

    async def send_certificates(
        self, certificates: list[VerifiableCertificate], *, identity_key: str
    ) -> None:
        """Answer a :class:`CertificatesRequested` with certificates the application chose."""
        await self._send(
            self.peer.create_certificate_response(certificates, identity_key=identity_key)
        )

    async def close(self) -> None:
        self.transport.set_handler(_ignore)  # nothing arriving after close is processed
        self.timer.cancel()
        for waiter in self._handshakes.values():
            if not waiter.done():
                waiter.set_exception(TransportError("the peer was closed"))
        queued, self._queued = list(self._queued), collections.deque()
        for work in queued:
            _discard(work)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._room.set()

    # --- the transport's side ---------------------------------------------------------

    def _on_message(self, message: AuthMessage) -> None:
        try:
            events = self.peer.receive(message, self._clock())
        except (Brc103Error, DecodeError) as exc:
            self._report(message, exc)
            return
        self._flush()
        self._dispatch(events)
        self.timer.arm()

    def _report(self, message: AuthMessage, exc: Exception) -> None:
        self.errors.append(exc)
        if message.message_type is MessageType.INITIAL_RESPONSE:
            # A refused answer to our handshake fails it now, not at the timeout.
            waiter = self._handshakes.get(message.your_nonce or "")
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        log.info("refused a %s from %s: %s", message.message_type, message.identity_key, exc)
        if self._on_error is not None:
            self._on_error(message, exc)

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(
                event, HandshakeCompleted | GeneralMessageReceived | CertificatesReceived
            ):
                for proven_listener in self._proven_listeners:
                    self._call(proven_listener, event)
            if isinstance(event, HandshakeCompleted):
                waiter = self._handshakes.get(event.session_nonce)
                if waiter is not None and not waiter.done():
                    waiter.set_result(event.identity_key)

            elif isinstance(event, GeneralMessageReceived):
                if not self._listeners:
                    try:
                        self._inbox.put_nowait(event)
                    except asyncio.QueueFull:  # nobody reads: drop, and say so
                        self._report(event.message, TransportError("the inbox is full"))
                for listener in self._listeners:
                    result = self._call(listener, event)
                    if result is not None:
                        self._spawn(result)
            elif isinstance(event, CertificatesReceived):
                for cert_listener in self._certificate_listeners:
                    self._call(cert_listener, event)
            elif isinstance(event, CertificatesRequested):
                for request_listener in self._request_listeners:
                    self._call(request_listener, event)
            elif isinstance(event, HandshakeFailed):
                waiter = self._handshakes.get(event.session_nonce)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(event.error)
            elif isinstance(event, HeldMessagesDropped):
                for held in event.messages:
                    self._report(held, event.error)

    def _call(self, listener: Callable[[Any], Any], event: Event) -> Any:
        """Run one listener; one that raises is recorded and the others still run."""
        try:
            return listener(event)
        except Exception as exc:
            log.warning("a BRC-103 listener failed: %s", exc)
            self.errors.append(exc)
            return None

    def _flush(self) -> None:
        for message in self.peer.messages_to_send():
            self._spawn(self._send(message))

    async def _send(self, message: AuthMessage) -> None:
        self.pending_sends += 1
        try:
            async with self._send_lock:
                await self.transport.send(message)
        finally:
            self.pending_sends -= 1

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` (a send, an async listener) beside the peer, as one of at most
        ``max_tasks`` tasks (else once one finishes, in order); a failure is logged and
        recorded, never fatal to the driver."""
        if len(self._tasks) >= self.max_tasks or self._queued:
            self._queued.append(work)
            return
        self._start(work)

    def _start(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        while self._queued and len(self._tasks) < self.max_tasks:
            self._start(self._queued.popleft())
        self._room.set()
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, Exception):
            log.warning("BRC-103 background work failed: %s", exc)
            self.errors.append(exc)


def _ignore(_message: AuthMessage) -> None:
    return None


def _discard(work: Awaitable[None]) -> None:
    """Drop work that never started (a coroutine is closed, so it warns of nothing)."""
    close = getattr(work, "close", None)
    if callable(close):
        close()


class MemoryTransport:
    """One end of an in-memory channel. Messages pass through their JSON wire form, so
    both ends see exactly what a network peer would; delivery happens on the next loop
    iteration, after ``send`` has returned."""

    def __init__(self) -> None:
        self._handler: MessageHandler | None = None
        self.other: MemoryTransport | None = None
        self.sent: list[bytes] = []

    @classmethod
    def pair(cls) -> tuple[MemoryTransport, MemoryTransport]:
        a, b = cls(), cls()
        a.other, b.other = b, a
        return a, b

    def set_handler(self, handler: MessageHandler) -> None:
        self._handler = handler

    async def send(self, message: AuthMessage) -> None:
        assert self.other is not None
        wire = message.to_bytes()
        self.sent.append(wire)
        asyncio.get_running_loop().call_soon(self.other.deliver_bytes, wire)

    def deliver_bytes(self, wire: bytes) -> None:
        if self._handler is None:
            return
        try:
            message = parse_message_bytes(wire)
        except DecodeError as exc:
            log.info("dropped a malformed AuthMessage: %s", exc)
            return
        self._handler(message)
