"""Catalyst peering over asyncio TCP: a node that dials, listens and redials.

    from trustmesh.io.catalyst import CatalystNode

    node = CatalystNode(CatalystConfig(my_asn=65001, bgp_identifier="node-a"), tls_config)
    session = await node.connect("127.0.0.1", 9179)     # returns once Established
    server = await node.serve(handler, "127.0.0.1", 9179)
    await node.maintain("10.0.0.2", 9179)                # redial with backoff, forever
    await node.keep_crl_current(CrlFile(path), 5.0)     # reload a CRL file when it changes

One node holds what its sessions share: the TLS contexts (built once), the counters,
the collision registry and the resumption tickets. The protocol lives in
:mod:`trustmesh.catalyst` and :mod:`trustmesh.tls`; this module only moves bytes.

Revocation holds for the life of a session: :meth:`CatalystNode.apply_crl` puts a newer
CRL into both TLS contexts (new handshakes refuse a revoked peer with the
``certificate_revoked`` alert) and ends every live session whose peer it revokes with
NOTIFICATION 6/241. :meth:`CatalystNode.keep_crl_current` polls a :class:`CrlFile` or a
:class:`CrlUrl` for new CRLs. Expiry needs nothing here: each session ceases by itself
when a certificate it runs on expires (6/240).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import aiohttp
from cryptography import x509
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
from trustmesh.io.backoff import Backoff, redial
from trustmesh.io.dial import dial
from trustmesh.io.handle import Handle
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.stream import ServerHandle, StreamDriver, serve_stream
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsConfig, TlsConfigError, TlsContext, TlsEstablished, TlsStream
from trustmesh.tls.context import parse_crl
from trustmesh.tls.stream import DEFAULT_HANDSHAKE_TIMEOUT
from trustmesh.tls.tickets import TicketCache

__all__ = [
    "DEFAULT_PORT",
    "Backoff",
    "CatalystNode",
    "CatalystServer",
    "CrlFile",
    "CrlSource",
    "CrlUrl",
    "Session",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9179  # BGP's 179, in the unprivileged range
DEFAULT_CONNECT_TIMEOUT = 30.0
COLLISION = (m.CEASE, m.CEASE_COLLISION)
MAX_CRL_BYTES = 64 * 1024 * 1024  # a CRL with a million revoked serials fits
CRL_FETCH_TIMEOUT = 30.0

EventListener = Callable[["Session", Event], None]


class Session(Handle[TlsStream, SessionEstablished]):
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
        self.core = core
        self.tls: TlsEstablished | None = None
        self.notifications: list[NotificationEvent] = []
        self.keepalives_received = 0
        self._listeners = list(listeners)
        super().__init__(
            driver,
            up=SessionEstablished,
            failure=self._failure_for,
            on_event=self._on_event,
            on_done=(lambda: on_done(self)) if on_done is not None else None,
            name="session",
        )

    @property
    def initiator(self) -> bool:
        return self.core.initiator

    @property
    def state(self) -> State:
        return self.core.state

    @property
    def established(self) -> SessionEstablished | None:
        return self.up_event

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
        return self.driver.get_extra_info("peername")

    @property
    def closed(self) -> ConnectionClosed | None:
        return self.closed_event

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    async def wait_established(self) -> SessionEstablished:
        """Wait for Established; raise :class:`PeeringFailed` if the session ends first."""
        return await self.wait_up()

    async def close(self, reason: str = "closed by application") -> ConnectionClosed:
        """Cease (NOTIFICATION 6/2) and wait until the connection is gone."""
        self.cease(reason)
        return await self.wait_closed()

    def cease(self, reason: str) -> None:
        """Send NOTIFICATION 6/2 and close, without waiting (no-op once closed)."""
        self.driver.close(reason)

    def evict(self) -> None:
        """Close with NOTIFICATION 6/7: another session to the peer won the collision."""
        if not self.driver.closed:
            now = asyncio.get_running_loop().time()
            self.driver.act(lambda tls: tls.inner_action(lambda _: self.core.evict(now)))

    def revoke(self) -> None:
        """Close with NOTIFICATION 6/241: a CRL now revokes the peer's certificate
        (no-op once closed, or before TLS is connected)."""
        if not self.driver.closed:
            now = asyncio.get_running_loop().time()
            self.driver.act(lambda tls: tls.inner_action(lambda _: self.core.revoke(now)))

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, TlsEstablished):
            self.tls = event
        elif isinstance(event, NotificationEvent):
            self.notifications.append(event)
        elif isinstance(event, KeepaliveReceived):
            self.keepalives_received += 1
        for listener in self._listeners:
            listener(self, event)

    def _failure_for(self, event: ConnectionClosed) -> PeeringFailed:
        last = self.notifications[-1] if self.notifications else None
        return PeeringFailed(
            f"{last.direction} NOTIFICATION {last.code}/{last.subcode}: {last.message}"
            if last
            else event.reason,
            notification=(last.code, last.subcode) if last else None,
            direction=last.direction if last else None,
            peer_id=self.peer_id,
        )


class CrlSource(Protocol):
    """Where new CRLs come from, for :meth:`CatalystNode.keep_crl_current`."""

    name: str

    async def poll(self) -> x509.CertificateRevocationList | None:
        """The CRL if it changed since the last poll (the first poll always reads it),
        else None. Raises ``OSError``, ``ValueError`` (not a CRL) or
        ``aiohttp.ClientError``."""

    async def aclose(self) -> None:
        """Release what the source holds."""


class CrlFile:
    """A CRL file (PEM or DER), read again whenever its modification time, size or inode
    changes (an atomic rename counts too)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self._seen: tuple[int, int, int] | None = None

    async def poll(self) -> x509.CertificateRevocationList | None:
        stat = os.stat(self.path)
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if key == self._seen:
            return None
        self._seen = key  # a file that does not parse is not read again until it changes
        return parse_crl(self.path.read_bytes())

    async def aclose(self) -> None:
        return None


class CrlUrl:
    """A CRL fetched over HTTP(S) (PEM or DER, at most 64 MiB); an unchanged answer (304
    to a GET conditional on the last ETag, or the same bytes) is no news."""

    def __init__(self, url: str, *, timeout: float = CRL_FETCH_TIMEOUT) -> None:
        self.url = url
        self.name = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._client: aiohttp.ClientSession | None = None
        self._last: bytes | None = None
        self._validators: dict[str, str] = {}

    async def poll(self) -> x509.CertificateRevocationList | None:
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=self._timeout)
        async with self._client.get(self.url, headers=self._validators) as response:
            if response.status == 304 and self._last is not None:
                return None
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info,
                    response.history,
                    status=response.status,
                    message=f"fetching the CRL from {self.url} got HTTP {response.status}",
                )
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_CRL_BYTES:
                    raise ValueError(f"the CRL at {self.url} is over {MAX_CRL_BYTES} bytes")
            # Only an ETag makes the next GET conditional: Last-Modified has one-second
            # resolution, so a CRL replaced within the second of a fetch would be missed.
            etag = response.headers.get("ETag")
            validators = {"If-None-Match": etag} if etag else {}
        data = bytes(body)
        if data == self._last:
            return None
        crl = parse_crl(data)
        self._last, self._validators = data, validators
        return crl

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: Unix time in seconds (injected for tests); it dates certificate
        checks on resumption, ticket lifetimes and when a session's certificates expire."""
        self.config = config
        self.server_context = TlsContext(tls, server=True)
        self.client_context = TlsContext(tls, server=False)
        self.counters = counters if counters is not None else Counters()
        self.registry = CollisionRegistry(evict=self._evict)
        self.handshake_timeout = handshake_timeout
        self.resume = resume
        self._sessions: dict[CatalystSession, Session] = {}
        self.clock = clock
        self._tickets = TicketCache()
        self._released: dict[str, asyncio.Event] = {}

    @property
    def sessions(self) -> list[Session]:
        """Every live session, in both directions."""
        return list(self._sessions.values())

    def apply_crl(self, crl: x509.CertificateRevocationList) -> list[Session]:
        """Check peers against ``crl`` from now on: both TLS contexts take it (a revoked
        peer's next handshake or resumption is refused, with the ``certificate_revoked``
        alert), and every live session whose peer certificate it revokes ends with
        NOTIFICATION 6/241. Returns those sessions.

        Raises :class:`TlsConfigError`, and changes nothing, when the CRL is not signed
        by a CA of the bundle or is older than the one in use."""
        self.client_context.replace_crl(crl)
        self.server_context.replace_crl(crl)
        ended = [s for s in self.sessions if self._revoked(s)]
        for session in ended:
            log.warning(
                "a new CRL revokes the certificate of %s (%s); ending the session",
                session.peer_id or session.claimed_id or "a peer",
                _address(session.remote_address),
            )
            session.revoke()
        return ended

    async def keep_crl_current(
        self,
        source: CrlSource,
        interval: float,
        *,
        on_update: Callable[[x509.CertificateRevocationList, list[Session]], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Poll ``source`` every ``interval`` seconds until cancelled, and apply each new
        CRL (:meth:`apply_crl`). ``on_update(crl, ended_sessions)`` hears about each one;
        ``on_error(exc)`` about a source that fails or a CRL that is refused (the CRL in
        use stays)."""
        try:
            while True:
                try:
                    crl = await source.poll()
                    if crl is not None:
                        ended = self.apply_crl(crl)
                        if on_update is not None:
                            on_update(crl, ended)
                except (OSError, ValueError, TlsConfigError, aiohttp.ClientError) as exc:
                    log.warning("CRL from %s not applied: %s", source.name, exc)
                    if on_error is not None:
                        on_error(exc)
                await asyncio.sleep(interval)
        finally:
            await source.aclose()

    def forget_tickets(self) -> None:
        """Drop resumption tickets, so the next sessions make full handshakes (a resumed
        session's certificate is checked again anyway, against the CRL and the clock)."""
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
        ticket = self._tickets.get((host, port), self.clock()) if self.resume else None
        stream, core = self._new_stream(initiator=True, ticket=ticket)
        reason = f"no session with {host}:{port} within {connect_timeout:g} s"
        try:
            session = await dial(
                lambda: self._track(StreamDriver(stream), core, listener),
                host,
                port,
                timeout=connect_timeout,
                timeout_reason=reason,
                cancel_reason="cancelled",
            )
        except BaseException as exc:
            self._tickets.forget((host, port))  # the next dial is a full handshake
            if isinstance(exc, TimeoutError):
                raise PeeringFailed(reason) from None
            raise
        if self.resume and (fresh := stream.session()) is not None:
            self._tickets.put((host, port), fresh, stream.ticket_expiry(self.clock()))
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

        async def attempt() -> Session:
            try:
                return await self.connect(host, port, listener=listener)
            except PeeringFailed as exc:
                if exc.notification == COLLISION:
                    await self._wait_released(exc.peer_id)
                raise

        async def use(session: Session) -> bool:
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
            return True  # it reached Established: the delays start afresh

        await redial(
            attempt,
            use,
            backoff=backoff if backoff is not None else Backoff(),
            retry_on=(PeeringFailed, OSError),
            on_failure=on_failure,
        )

    # --- internals ----------------------------------------------------------------------

    def _new_stream(
        self, *, initiator: bool, ticket: SSL.Session | None = None
    ) -> tuple[TlsStream, CatalystSession]:
        core = CatalystSession(
            self.config, initiator=initiator, counters=self.counters, registry=self.registry
        )
        context = self.client_context if initiator else self.server_context
        loop = asyncio.get_running_loop()
        stream = TlsStream(
            context,
            core,
            session=ticket,
            handshake_timeout=self.handshake_timeout,
            unix_offset=self.clock() - loop.time(),
        )
        core.bind(stream)
        return stream, core

    def _track(
        self,
        driver: StreamDriver[TlsStream],
        core: CatalystSession,
        listener: EventListener | None,
    ) -> Session:
        listeners = (self._on_event, listener) if listener else (self._on_event,)
        session = Session(driver, core, listeners, self._untrack)
        self._sessions[core] = session
        return session

    def _on_event(self, session: Session, event: Event) -> None:
        # A client's handshake verified the server before the server accepted us: a CRL
        # applied in between did not see this session. Check it once it is connected.
        if isinstance(event, TlsEstablished) and self._revoked(session):
            log.warning(
                "the CRL revokes the certificate of the peer at %s; ending the session",
                _address(session.remote_address),
            )
            session.revoke()

    def _revoked(self, session: Session) -> bool:
        leaf = session.core.peer_certificate
        return leaf is not None and self.server_context.crl_revokes(leaf)

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


def _address(value: object) -> str | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return f"{value[0]}:{value[1]}"
    return None
