"""Catalyst peering over asyncio TCP: a node that dials, listens and redials.

    from trustmesh.io.catalyst import CatalystNode

    node = CatalystNode(CatalystConfig(my_asn=65001, bgp_identifier="node-a"), tls_config)
    session = await node.connect("127.0.0.1", 9179)     # returns once Established
    server = await node.serve(handler, "127.0.0.1", 9179)
    await node.maintain("10.0.0.2", 9179)                # redial with backoff, forever

One node holds what its sessions share: the TLS contexts (built once), the counters,
the collision registry and the resumption tickets. The protocol lives in
:mod:`trustmesh.catalyst` and :mod:`trustmesh.tls`; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from OpenSSL import SSL

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.collision import CollisionRegistry
from trustmesh.catalyst.errors import PeeringFailed
from trustmesh.catalyst.session import (
    CatalystConfig,
    CatalystSession,
    Counters,
    KeepaliveReceived,
    NotificationEvent,
    SessionEstablished,
    State,
)
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.stream import ServerHandle, StreamDriver, serve_stream
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsConfig, TlsContext, TlsEstablished, TlsStream
from trustmesh.tls.stream import DEFAULT_HANDSHAKE_TIMEOUT

__all__ = [
    "DEFAULT_PORT",
    "Backoff",
    "CatalystNode",
    "CatalystServer",
    "Session",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9179  # BGP's 179, in the unprivileged range
DEFAULT_CONNECT_TIMEOUT = 30.0
COLLISION = (m.CEASE, m.CEASE_COLLISION)

EventListener = Callable[["Session", Event], None]


@dataclass
class Backoff:
    """Exponential redial delays: ``initial``, doubling up to ``maximum``, each with up
    to ``jitter`` (a fraction) added so that a fleet does not redial in lockstep."""

    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 0.2
    rng: Callable[[], float] = field(default=random.random, repr=False)
    _failures: int = field(default=0, repr=False)

    def next_delay(self) -> float:
        base = self.initial * 2.0 ** min(self._failures, 62)
        self._failures += 1
        return min(self.maximum, base * (1 + self.jitter * self.rng()))

    def reset(self) -> None:
        self._failures = 0


class Session:
    """One Catalyst session, seen from the application.

    A reader task takes every event from the connection (so keepalives are answered
    and the hold timer runs whether or not anyone is looking) and hands each one to
    the listeners.
    """

    def __init__(
        self,
        driver: StreamDriver[TlsStream],
        core: CatalystSession,
        listeners: tuple[EventListener, ...] = (),
        on_done: Callable[[Session], None] | None = None,
    ) -> None:
        self._driver = driver
        self.core = core
        self.tls: TlsEstablished | None = None
        self.notifications: list[NotificationEvent] = []
        self.keepalives_received = 0
        self._listeners = list(listeners)
        self._on_done = on_done
        loop = asyncio.get_running_loop()
        self._established: asyncio.Future[SessionEstablished] = loop.create_future()
        self._closed: ConnectionClosed | None = None
        self._reader = loop.create_task(self._read())

    @property
    def initiator(self) -> bool:
        return self.core.initiator

    @property
    def state(self) -> State:
        return self.core.state

    @property
    def established(self) -> SessionEstablished | None:
        done = self._established
        return done.result() if done.done() and not done.exception() else None

    @property
    def peer_id(self) -> str | None:
        """The peer's BGP identifier, once its OPEN passed every check."""
        return self.core.peer.bgp_identifier if self.core.peer else None

    @property
    def claimed_id(self) -> str | None:
        """The BGP identifier the peer's OPEN claimed, before (or without) any check."""
        return self.core.offered.bgp_identifier if self.core.offered else None

    @property
    def remote_address(self) -> object:
        return self._driver.get_extra_info("peername")

    @property
    def closed(self) -> ConnectionClosed | None:
        return self._closed

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    async def wait_established(self) -> SessionEstablished:
        """Wait for Established; raise :class:`PeeringFailed` if the session ends first."""
        return await asyncio.shield(self._established)

    async def wait_closed(self) -> ConnectionClosed:
        event = await self._driver.wait_closed()
        await asyncio.shield(self._reader)
        return event

    async def close(self, reason: str = "closed by application") -> ConnectionClosed:
        """Cease (NOTIFICATION 6/2) and wait until the connection is gone."""
        self.cease(reason)
        return await self.wait_closed()

    def cease(self, reason: str) -> None:
        """Send NOTIFICATION 6/2 and close, without waiting (no-op once closed)."""
        self._driver.close(reason)

    def abort(self, reason: str) -> None:
        self._driver.abort(reason)

    def evict(self) -> None:
        """Close with NOTIFICATION 6/7: another session to the peer won the collision."""
        if not self._driver.closed:
            now = asyncio.get_running_loop().time()
            self._driver.act(lambda tls: tls.inner_action(lambda _: self.core.evict(now)))

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _read(self) -> None:
        try:
            async for event in self._driver:
                if isinstance(event, TlsEstablished):
                    self.tls = event
                elif isinstance(event, SessionEstablished):
                    self._established.set_result(event)
                elif isinstance(event, NotificationEvent):
                    self.notifications.append(event)
                elif isinstance(event, KeepaliveReceived):
                    self.keepalives_received += 1
                elif isinstance(event, ConnectionClosed):
                    self._on_closed(event)
                for listener in self._listeners:
                    listener(self, event)
        finally:
            if self._closed is None:  # cancelled: the driver is going away
                self._on_closed(ConnectionClosed("session reader stopped", error=True))
            if self._on_done is not None:
                self._on_done(self)

    def _on_closed(self, event: ConnectionClosed) -> None:
        self._closed = event
        if self._established.done():
            return
        last = self.notifications[-1] if self.notifications else None
        self._established.set_exception(
            PeeringFailed(
                f"{last.direction} NOTIFICATION {last.code}/{last.subcode}: {last.message}"
                if last
                else event.reason,
                notification=(last.code, last.subcode) if last else None,
                direction=last.direction if last else None,
                peer_id=self.peer_id,
            )
        )
        self._established.exception()  # retrieved: nobody may be waiting


class CatalystServer(ServerHandle[TlsStream]):
    """A listening node: each connection runs ``handler(session)`` from the moment TLS
    is up; the session closes when the handler returns."""


class CatalystNode:
    """A Catalyst speaker: one identity, any number of sessions in both directions."""

    def __init__(
        self,
        config: CatalystConfig,
        tls: TlsConfig,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        resume: bool = True,
        counters: Counters | None = None,
    ) -> None:
        self.config = config
        self.server_context = TlsContext(tls, server=True)
        self.client_context = TlsContext(tls, server=False)
        self.counters = counters if counters is not None else Counters()
        self.registry = CollisionRegistry(evict=self._evict)
        self.handshake_timeout = handshake_timeout
        self.resume = resume
        self._sessions: dict[CatalystSession, Session] = {}
        self._tickets: dict[tuple[str, int], SSL.Session] = {}
        self._released: dict[str, asyncio.Event] = {}

    @property
    def sessions(self) -> list[Session]:
        """Every live session, in both directions."""
        return list(self._sessions.values())

    def forget_tickets(self) -> None:
        """Drop resumption tickets, so the next sessions verify certificates afresh
        (after a CRL update, for example)."""
        self._tickets.clear()

    async def connect(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        listener: EventListener | None = None,
    ) -> Session:
        """Dial ``host:port`` and return the session once Established.

        Raises :class:`PeeringFailed` (with the NOTIFICATION, if one ended it) when the
        session ends first or does not reach Established within ``connect_timeout``, and
        ``OSError`` when the TCP connection fails.
        """
        loop = asyncio.get_running_loop()
        ticket = self._tickets.get((host, port)) if self.resume else None
        stream, core = self._new_stream(initiator=True, ticket=ticket)
        holder: list[Session] = []

        def new_driver() -> StreamDriver[TlsStream]:
            driver = StreamDriver(stream)
            holder.append(self._track(driver, core, listener))
            return driver

        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(new_driver, host, port)
                await holder[0].wait_established()
        except BaseException as exc:
            reason = f"no session with {host}:{port} within {connect_timeout:g} s"
            if holder:  # a session that has not ended yet ends now
                holder[0].abort(reason if isinstance(exc, TimeoutError) else "cancelled")
                await holder[0].wait_closed()
            if isinstance(exc, TimeoutError):
                raise PeeringFailed(reason) from None
            raise
        session = holder[0]
        if self.resume and (fresh := stream.session()) is not None:
            self._tickets[(host, port)] = fresh
        return session

    async def serve(
        self,
        handler: Callable[[Session], Awaitable[None]] | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        listener: EventListener | None = None,
        policy: ResourcePolicy | None = None,
    ) -> CatalystServer:
        """Listen for peers. ``handler(session)`` runs for each connection as soon as it
        is accepted (await ``session.wait_established()`` in it); without a handler a
        session lives until the peer or the hold timer ends it. ``listener(session,
        event)`` sees every event of every session, from the first."""

        def new_core() -> TlsStream:
            return self._new_stream(initiator=False)[0]

        def accepted(driver: StreamDriver[TlsStream]) -> None:
            core = driver.core.inner
            assert isinstance(core, CatalystSession)
            self._track(driver, core, listener)

        async def run(driver: StreamDriver[TlsStream]) -> None:
            core = driver.core.inner
            assert isinstance(core, CatalystSession)
            session = self._sessions.get(core)
            if session is None:  # already over
                return
            if handler is not None:
                await handler(session)
            else:
                await session.wait_closed()

        server = await serve_stream(
            new_core, run, host, port, on_accept=accepted, policy=policy, name="catalyst"
        )
        return CatalystServer(server)

    async def maintain(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        handler: Callable[[Session], Awaitable[None]] | None = None,
        *,
        backoff: Backoff | None = None,
        listener: EventListener | None = None,
        on_failure: Callable[[BaseException, float], None] | None = None,
    ) -> None:
        """Keep a session to ``host:port`` up until cancelled: dial, run ``handler``
        (or wait for the session to end), and redial after 1 s, 2 s, 4 s ... up to 60 s
        (``backoff``); a session that reached Established resets the delay.

        After a session loses a collision (6/7), the redial also waits for the session
        that won to end: the peer's own connection already serves. ``on_failure(error,
        delay)`` hears about each failed attempt before the wait.
        """
        delays = backoff if backoff is not None else Backoff()
        while True:
            try:
                session = await self.connect(host, port, listener=listener)
            except (PeeringFailed, OSError) as exc:
                if isinstance(exc, PeeringFailed) and exc.notification == COLLISION:
                    await self._wait_released(exc.peer_id)
                delay = delays.next_delay()
                if on_failure is not None:
                    on_failure(exc, delay)
                await asyncio.sleep(delay)
                continue
            delays.reset()
            try:
                if handler is not None:
                    await handler(session)
                    session.cease("handler finished")
                closed = await session.wait_closed()
            finally:
                session.cease("stopped redialling")  # cancelled: still say goodbye
            if any((n.code, n.subcode) == COLLISION for n in session.notifications):
                await self._wait_released(session.peer_id)
            log.info("session to %s:%s ended (%s); redialling", host, port, closed.reason)
            await asyncio.sleep(delays.next_delay())

    # --- internals ----------------------------------------------------------------------

    def _new_stream(
        self, *, initiator: bool, ticket: SSL.Session | None = None
    ) -> tuple[TlsStream, CatalystSession]:
        core = CatalystSession(
            self.config, initiator=initiator, counters=self.counters, registry=self.registry
        )
        context = self.client_context if initiator else self.server_context
        stream = TlsStream(context, core, session=ticket, handshake_timeout=self.handshake_timeout)
        core.bind(stream)
        return stream, core

    def _track(
        self,
        driver: StreamDriver[TlsStream],
        core: CatalystSession,
        listener: EventListener | None,
    ) -> Session:
        session = Session(driver, core, (listener,) if listener else (), self._untrack)
        self._sessions[core] = session
        return session

    def _untrack(self, session: Session) -> None:
        self._sessions.pop(session.core, None)
        peer = session.peer_id
        if peer is not None and self.registry.holder(peer) is None:
            released = self._released.pop(peer, None)
            if released is not None:
                released.set()

    def _evict(self, core: CatalystSession) -> None:
        session = self._sessions.get(core)
        if session is not None:
            session.evict()

    async def _wait_released(self, peer_id: str | None) -> None:
        """Wait until no session to ``peer_id`` is alive (the collision's winner ended)."""
        if peer_id is None or self.registry.holder(peer_id) is None:
            return
        released = self._released.setdefault(peer_id, asyncio.Event())
        await released.wait()
