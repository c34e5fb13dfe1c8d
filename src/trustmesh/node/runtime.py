"""A running mesh node (zero-trust-mesh.md sections 1, 2, 5.3 and 6).

    node = MeshNode.from_directory(Path("node-1"), passphrase)
    await node.start()       # links, API, CRL fetch, renewal, gossip housekeeping
    await node.publish(anomaly_payload("ab" * 16, "port-scan", 0.8))
    await node.stop()

The protocol lives in :mod:`trustmesh.mesh` (sans-IO); this module moves bytes, keeps
time, and holds the tables: links by peer, the peer table, the address book.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from trustmesh.api.ca_client import (
    CaClient,
    finish_interrupted_rotation,
    forget_previous_key,
    rotate_node,
)
from trustmesh.crypto.keys import PrivateKey
from trustmesh.errors import ProtocolError
from trustmesh.io.backoff import Backoff
from trustmesh.io.https import HttpServer, HttpsSite, serve_app
from trustmesh.io.stream import StreamDriver, StreamServer, serve_stream
from trustmesh.keystore.filestore import load_key_file
from trustmesh.mesh.engine import GossipEngine, Received, SeenCache
from trustmesh.mesh.errors import BadSignature, GossipRejected
from trustmesh.mesh.gossip import (
    DEFAULT_TTL_MS,
    GossipMessage,
    crl_payload,
    decode_message,
    sign_message,
)
from trustmesh.mesh.link import (
    ALPN,
    CloseCode,
    CrlFrame,
    GossipFrame,
    IHaveFrame,
    IWantFrame,
    LinkClosed,
    LinkConfig,
    LinkUp,
    MeshLink,
    PeerAddress,
    PeersFrame,
    join_address,
    split_address,
)
from trustmesh.mesh.peers import PeerBook, PeerRecord, own_record, own_record_due, records_from_json
from trustmesh.mesh.store import Indicator, MeshStore
from trustmesh.mesh.trust import MAX_GOSSIP_CRL, CrlRejected, CrlUpdate, TrustView
from trustmesh.node.config import NodeConfig, load_config
from trustmesh.node.links import Link, LinkFailed
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsConfig, TlsContext, TlsStream
from trustmesh.tls.tickets import TicketCache

log = logging.getLogger("trustmesh.node")

DIAL_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0  # for the links' goodbyes at shutdown
MAX_ADDRESSES = 1024  # signed peer records kept, one per node_id (mesh/peers.py)
FLUSH_INTERVAL = 0.2  # seconds between store commits
RENEW_AT = 2 / 3  # of a certificate's lifetime
RENEW_RETRY = (5.0, 300.0)  # bounds of the wait after a failed renewal
STORE_FILE = "mesh.db"
RUN_FILE = "run.json"  # where a running node listens (trustmesh.node.client reads it)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class PeerInfo:
    """A row of the peer table (``GET /v1/mesh/peers``)."""

    node_id: str
    address: str | None
    status: str  # "connected" or "disconnected"
    last_seen: int  # Unix ms of the last frame (keepalives included)
    direction: str | None = None
    serial: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "status": self.status,
            "last_seen": datetime.fromtimestamp(self.last_seen / 1e3, UTC).isoformat(),
            "last_seen_ms": self.last_seen,
            "address": self.address,
            "direction": self.direction,
            "serial": format(self.serial, "x") if self.serial is not None else None,
        }


@dataclass
class Identity:
    """What the node presents: its key, its chain, and the TLS contexts built on them."""

    key: PrivateKey
    chain: tuple[x509.Certificate, ...]
    server: TlsContext  # links
    client: TlsContext  # links
    api: TlsContext  # the HTTPS API

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in self.chain)


class MeshNode:
    def __init__(
        self, directory: Path, config: NodeConfig, passphrase: bytes | None = None
    ) -> None:
        self.directory = directory
        self.config = config
        self.node_id = config.node_id
        self._passphrase = passphrase
        self.store = MeshStore(directory / STORE_FILE)
        roots = x509.load_pem_x509_certificates((directory / "ca.crt").read_bytes())
        self.trust = TrustView(roots)
        self.seen = SeenCache()
        self.engine = GossipEngine(
            self.node_id, self.trust, fanout=config.gossip_fanout, seen=self.seen
        )
        self.identity = self._load_identity()
        self.links: dict[str, Link] = {}  # established, by peer node_id
        self.peers: dict[str, PeerInfo] = {}
        # The address book: signed peer records, the only addresses dialled besides the
        # bootstrap list (mesh-link.md section 8.1); ours is signed at start.
        self.book = PeerBook(self.trust, self.node_id, capacity=MAX_ADDRESSES)
        self._record: PeerRecord | None = None
        self.revoked_nodes: set[str] = set()
        self.listeners: list[Callable[[str, Any], None]] = []  # (event name, detail)
        self._pending: set[Link] = set()  # links whose HELLO exchange is not done
        self._live: set[Link] = set()  # every link whose connection is open
        self._dialing: set[str] = set()
        self._links_low = asyncio.Event()  # set when the links fall below the dial target
        self._cooldown: dict[str, tuple[float, Backoff]] = {}
        self._rng = random.Random()  # dial order  # noqa: S311 (not a secret)
        self._indicators: list[Indicator] = []
        self._inbox: dict[Link, list[bytes]] = {}  # gossip frames waiting for their batch
        self._inbox_scheduled = False
        self._server: StreamServer[TlsStream] | None = None
        self._api: HttpServer | None = None
        self.api_site: HttpsSite | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # Resumption tickets of our outgoing links, by address (mesh-link.md 2.4).
        self._tickets = TicketCache(MAX_ADDRESSES)

    @classmethod
    def from_directory(cls, directory: Path, passphrase: bytes | None = None) -> MeshNode:
        finish_interrupted_rotation(directory)  # before the key is read
        return cls(directory, load_config(directory), passphrase)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.seen.load(self.store.seen(), now_ms())
        stored = self.store.crl()
        if stored is not None:
            self._apply_crl(stored, source="store")
        # The peer records of the last run, checked again (that CRL included): peers to
        # dial if the bootstrap list is down.
        self.store.forget_peers(self.book.load(self.store.peer_records(), now_ms()))
        await self.refresh_crl()
        host, port = split_address(self.config.listen, any_port=True)
        self._server = await serve_stream(
            lambda: self._new_stream(initiator=False),
            self._serve_link,
            host,
            port,
            on_accept=self._accepted,
            policy=self.config.policy,
            name="mesh links",
        )
        await self._start_api()
        self._refresh_record()  # now that the listen port is known
        self._tasks = [
            asyncio.create_task(self._maintain(address)) for address in self.config.bootstrap
        ]
        self._tasks += [
            asyncio.create_task(self._crl_loop()),
            asyncio.create_task(self._digest_loop()),
            asyncio.create_task(self._flush_loop()),
            asyncio.create_task(self._renewal_loop()),
            # node.prev.key goes when the rotation's overlap ends (its certificate expires).
            asyncio.create_task(forget_previous_key(self.directory)),
        ]
        self._write_run_file()
        self._emit("node.started", listen=self.listen_address, api=self.api_url)

    async def quiesce(self) -> None:
        """Stop dialling, fetching and renewing (links stay up): the first half of
        :meth:`stop`. A mesh that shuts down quiesces every node first, so no node dials
        one that is going away."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await _within(CLOSE_TIMEOUT, *self._tasks, what="background tasks")

    async def stop(self) -> None:
        """Close every link with a CLOSE frame, stop the API, commit the store."""
        await self.quiesce()
        if self._server is not None:
            self._server.close("node shutting down")
        live = list(self._live)
        for link in live:
            link.close(CloseCode.SHUTDOWN, "node shutting down")
        if not await _within(CLOSE_TIMEOUT, *(link.wait_closed() for link in live)):
            for link in live:
                link.abort("no goodbye in time")
            await _within(CLOSE_TIMEOUT, *(link.wait_closed() for link in live), what="links")
        if self._server is not None:
            await _within(CLOSE_TIMEOUT, self._server.wait_closed(), what="the link listener")
        if self._api is not None:
            await _within(CLOSE_TIMEOUT, self._api.stop(), what="the API")
        self.flush()
        self.store.close()
        (self.directory / RUN_FILE).unlink(missing_ok=True)
        self._emit("node.stopped")

    async def __aenter__(self) -> MeshNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _write_run_file(self) -> None:
        """Where this process really listens (ports given as 0 are known only now)."""
        api = self.api_site.port if self.api_site is not None else 0
        host = split_address(self.config.api, any_port=True)[0]
        state = {
            "pid": os.getpid(),
            "node_id": self.node_id,
            "listen": self.listen_address,
            "api": join_address(host, api),
        }
        tmp = self.directory / f"{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(state) + "\n")
        os.replace(tmp, self.directory / RUN_FILE)

    @property
    def listen_address(self) -> str:
        host, port = split_address(self.config.listen, any_port=True)
        if port == 0 and self._server is not None:
            port = self._server.port
        return join_address(host, port)

    @property
    def advertised(self) -> str:
        """The address peers are told to dial: ``advertise``, or where we listen."""
        return self.config.advertise or self.listen_address

    @property
    def api_url(self) -> str:
        host, port = split_address(self.config.api, any_port=True)
        if self.api_site is not None:
            port = self.api_site.port
        return f"https://{join_address(host, port)}"

    # --- publishing -------------------------------------------------------------------------

    def sign(self, payload: dict[str, Any], *, ttl_ms: int | None = None) -> GossipMessage:
        """A message from this node, signed with its key, its chain attached."""
        return sign_message(
            self.identity.key,
            self.node_id,
            payload,
            now_ms=now_ms(),
            ttl_ms=ttl_ms if ttl_ms is not None else DEFAULT_TTL_MS,
            chain=self.identity.chain_der,
        )

    def publish(self, payload: dict[str, Any], *, ttl_ms: int | None = None) -> Received:
        """Sign ``payload`` and gossip it."""
        message = self.sign(payload, ttl_ms=ttl_ms)
        return self.accept(message, message.encode(), sender=None)

    def accept_raw(self, raw: bytes) -> Received:
        """A signed message from the API (anyone's, verified like gossip from a link)."""
        return self.accept(decode_message(raw), raw, sender=None)

    def accept(self, message: GossipMessage, raw: bytes, *, sender: Link | None) -> Received:
        received = self.engine.receive(
            message,
            raw,
            sender=sender.peer_id if sender is not None else None,
            peers=list(self.links),
            now_ms=now_ms(),
        )
        self._deliver(received)
        return received

    # --- links ------------------------------------------------------------------------------

    def _new_stream(self, *, initiator: bool, session: SSL.Session | None = None) -> TlsStream:
        core = MeshLink(
            LinkConfig(
                self.node_id,
                self.advertised,
                self.config.hold_time,
                hello_timeout=self.config.hello_timeout,
                min_hold_time=self.config.min_hold_time,
                allow_zero_hold=self.config.allow_zero_hold,
            ),
            initiator=initiator,
            authorize=self._authorize,
            crl_number=lambda: self.trust.crl_number,
        )
        context = self.identity.client if initiator else self.identity.server
        stream = TlsStream(
            context,
            core,
            session=session,
            handshake_timeout=DIAL_TIMEOUT,
            unix_offset=now_ms() / 1000 - asyncio.get_running_loop().time(),
        )
        core.bind(stream)
        return stream

    def _authorize(self, chain: Any) -> str:
        return self.trust.identity_of(chain, now_ms=now_ms()).node_id

    def _accepted(self, driver: StreamDriver[TlsStream]) -> None:
        core = driver.core.inner
        assert isinstance(core, MeshLink)
        self._track(Link(driver, core, address=None, on_event=self._on_event))

    def _track(self, link: Link) -> None:
        self._pending.add(link)
        self._live.add(link)

    async def _serve_link(self, driver: StreamDriver[TlsStream]) -> None:
        await driver.wait_closed()

    async def dial(self, address: str) -> Link:
        """Open a link to ``address`` and return it once both HELLOs are exchanged
        (raises :class:`LinkFailed` or ``OSError``). The last link's ticket to the
        address is offered; if the peer refuses that resumption, one full handshake
        follows at once, so the failure says what the peer's checks say."""
        ticket = self._tickets.get(address, now_ms() / 1000)
        try:
            return await self._dial(address, ticket)
        except LinkFailed as exc:
            if ticket is None or "(resumed session)" not in str(exc):
                raise
        return await self._dial(address, None)

    async def _dial(self, address: str, ticket: SSL.Session | None) -> Link:
        host, port = split_address(address)
        stream = self._new_stream(initiator=True, session=ticket)
        core = stream.inner
        assert isinstance(core, MeshLink)
        loop = asyncio.get_running_loop()
        holder: list[Link] = []

        def protocol() -> StreamDriver[TlsStream]:
            driver = StreamDriver(stream)
            link = Link(driver, core, address=address, on_event=self._on_event)
            self._track(link)
            holder.append(link)
            return driver

        try:
            async with asyncio.timeout(DIAL_TIMEOUT):
                await loop.create_connection(protocol, host, port)
                await holder[0].wait_up()
        except TimeoutError:
            if holder:
                holder[0].abort("no HELLO in time")
            raise LinkFailed(f"no link with {address} within {DIAL_TIMEOUT:g} s") from None
        except BaseException:
            if holder:
                holder[0].abort("dial cancelled")
            raise
        finally:
            if not (holder and holder[0].up):
                self._tickets.forget(address)  # the next dial is a full handshake
            if holder and holder[0].closed_event is not None:
                # Its socket is closed before we go on (bounded: this may run on cancel).
                await _within(CLOSE_TIMEOUT, asyncio.shield(holder[0].wait_closed()))
        fresh = stream.session()
        if fresh is not None:  # resume the next link to this address
            self._tickets.put(address, fresh, stream.ticket_expiry(now_ms() / 1000))
        return holder[0]

    async def _maintain(self, address: str) -> None:
        """Keep a link to a bootstrap address while the node has too few links,
        redialling with backoff."""
        backoff = Backoff(initial=0.5, maximum=30.0)
        while True:
            if len(self.links) >= self.dial_target:
                self._links_low.clear()
                await self._links_low.wait()
                continue
            existing = self._link_at(address)
            if existing is not None:
                await existing.wait_closed()
                continue
            try:
                link = await self.dial(address)
            except (LinkFailed, OSError) as exc:
                delay = backoff.next_delay()
                self._emit("link.dial_failed", address=address, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                continue
            closed = await link.wait_closed()
            if isinstance(closed, LinkClosed) and closed.code == CloseCode.SHUTDOWN:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())

    @property
    def addresses(self) -> dict[str, str]:
        """node_id -> the address it would be dialled at, for each valid signed record."""
        return dict(self.book.dialable(now_ms()))

    @property
    def dial_target(self) -> int:
        """Links the node dials out for: half its cap, so that there is always room for
        newcomers to link in."""
        return max(1, self.config.max_links // 2)

    def _link_at(self, address: str) -> Link | None:
        for link in self.links.values():
            if address in (link.address, link.listen):
                return link
        return None

    def _topup(self) -> None:
        """Dial known peers until the links (and dials in flight) reach the dial target."""
        if self._stopping:
            return
        room = self.dial_target - len(self.links) - len(self._dialing)
        clock = time.monotonic()

        def usable(address: str) -> bool:
            if address in self._dialing or address == self.advertised:
                return False
            return self._cooldown.get(address, (0.0, None))[0] <= clock

        # Only addresses from valid signed records (unexpired, certificate unrevoked), in
        # random order: in book order every newcomer would dial the oldest, fullest nodes.
        candidates = list(self.book.dialable(now_ms(), usable))
        self._rng.shuffle(candidates)
        for node_id, address in candidates:
            if room <= 0:
                break
            if node_id in self.links or node_id in self.revoked_nodes:
                continue
            room -= 1
            self._dialing.add(address)
            self._tasks.append(asyncio.create_task(self._dial_learned(address)))

    async def _dial_learned(self, address: str) -> None:
        try:
            await self.dial(address)
        except (LinkFailed, OSError) as exc:
            self._cool_down(address)  # the one place a failed dial is counted
            log.debug("dial %s failed: %s", address, exc)
        finally:
            self._dialing.discard(address)

    def _cool_down(self, address: str) -> None:
        """Wait before dialling ``address`` again: 1 s, doubling up to a minute."""
        backoff = self._cooldown.get(address, (0.0, Backoff(initial=1.0, maximum=60.0)))[1]
        self._cooldown[address] = (time.monotonic() + backoff.next_delay(), backoff)

    # --- link events ------------------------------------------------------------------------

    def _on_event(self, link: Link, event: Event) -> None:
        peer = link.peer_id
        if peer is not None and peer in self.peers and link.up:
            self.peers[peer].last_seen = now_ms()
        try:
            if isinstance(event, LinkUp):
                self._on_up(link, event)
            elif isinstance(event, GossipFrame):
                self._on_gossip(link, event.raw)
            elif isinstance(event, IHaveFrame):
                assert peer is not None
                wanted = self.engine.on_ihave(peer, event.ids, now_ms())
                if wanted:
                    link.send_iwant(wanted)
            elif isinstance(event, IWantFrame):
                assert peer is not None
                for held in self.engine.on_iwant(peer, event.ids, now_ms()):
                    link.send_gossip(self.engine.wire_for(peer, held))
            elif isinstance(event, CrlFrame):
                self._on_crl_frame(link, event.der)
            elif isinstance(event, PeersFrame):
                self._learn(link, event)
            elif isinstance(event, ConnectionClosed):
                self._on_closed(link, event)
        except ProtocolError as exc:  # a peer's frame this node cannot use: refuse the link
            link.close(CloseCode.PROTOCOL, str(exc))

    def _on_up(self, link: Link, event: LinkUp) -> None:
        self._pending.discard(link)
        peer = event.peer_id
        current = self.links.get(peer)
        if current is not None and current.up:
            keep, drop = _collision(self.node_id, current, link)
            drop.close(CloseCode.DUPLICATE, "a link to this peer already exists")
            if keep is current:
                return
        elif len(self.links) >= self.config.max_links:
            self._send_peers(link, exclude=peer)
            link.close(CloseCode.LINK_CAP, f"at the cap of {self.config.max_links} links")
            return
        self.links[peer] = link
        self.revoked_nodes.discard(peer)  # re-enrolled: this certificate just checked out
        address = event.listen or link.address  # HELLO listen is shown, never dialled
        self.peers[peer] = PeerInfo(
            peer, address, "connected", now_ms(), link.direction, link.serial
        )
        self._send_peers(link, exclude=peer)
        ids = self.engine.ihave_for(peer, now_ms())
        if ids:
            link.send_ihave(ids)
        if self.trust.crl_der is not None and event.crl_number < self.trust.crl_number:
            link.send_crl(self.trust.crl_der)
        self._emit("link.up", peer=peer, direction=link.direction, address=address)

    def _on_closed(self, link: Link, event: ConnectionClosed) -> None:
        self._pending.discard(link)
        self._live.discard(link)
        refused = isinstance(event, LinkClosed) and event.code != CloseCode.SHUTDOWN
        if link.address is not None and link.was_up:
            if refused:
                # At its cap, a duplicate, or worse: not at once, and each refusal in a
                # row waits longer (the peer's HELLO came before its refusal, so HELLO
                # must not reset the backoff).
                self._cool_down(link.address)
            else:
                self._cooldown.pop(link.address, None)  # a link that ran its course
        if not link.was_up and event.reason.startswith("TLS failed"):
            # Refused at the handshake, by us or by the peer: say which check and why
            # (a revoked certificate: "certificate revoked" on both sides).
            self._emit(
                "link.tls_failed",
                direction=link.direction,
                address=link.address,
                reason=event.reason,
                level=logging.INFO,
            )
        peer = link.peer_id
        if peer is None or self.links.get(peer) is not link:
            return
        del self.links[peer]
        if len(self.links) < self.dial_target:
            self._links_low.set()
        self.engine.forget_peer(peer)
        info = self.peers.get(peer)
        if info is not None:
            info.status = "disconnected"
        self._emit("link.down", peer=peer, reason=event.reason)
        if not self._stopping:
            self._topup()

    def _on_gossip(self, link: Link, raw: bytes) -> None:
        """Queue a gossip frame; the frames of one read are checked together, once the
        read's events are all handed out (the engine's batch is faster per message)."""
        inbox = self._inbox.setdefault(link, [])
        inbox.append(raw)
        if not self._inbox_scheduled:
            self._inbox_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._inbox_scheduled = False
        inbox, self._inbox = self._inbox, {}
        for link, raws in inbox.items():
            results = self.engine.receive_batch(
                raws, sender=link.peer_id, peers=list(self.links), now_ms=now_ms()
            )
            for result in results:
                if isinstance(result, Received):
                    self._deliver(result)
                elif self._refuse(link, result):
                    break  # the link is closed: the rest of its frames are moot

    def _refuse(self, link: Link, error: ProtocolError) -> bool:
        """Answer a gossip frame the engine refused; True when that ends the link."""
        if isinstance(error, BadSignature):
            link.close(CloseCode.BAD_SIGNATURE, str(error))
            self._emit("gossip.bad_signature", peer=link.peer_id, error=str(error))
            return True
        if isinstance(error, CrlRejected):
            link.close(CloseCode.REFUSED, str(error))
            return True
        if not isinstance(error, GossipRejected):  # malformed
            link.close(CloseCode.PROTOCOL, f"malformed gossip: {error}")
            return True
        log.debug("gossip from %s dropped: %s", link.peer_id, error)  # expired, revoked, rate
        return False

    def _deliver(self, received: Received) -> None:
        message = received.message
        if not received.new or message is None:
            self._emit("gossip.duplicate", level=logging.DEBUG, message_id=received.message_id)
            return
        for peer in received.forward_to:
            target = self.links.get(peer)
            if target is not None:
                target.send_gossip(self.engine.wire_for(peer, received))
        if message.kind == "anomaly":
            indicator = Indicator.from_message(message, now_ms())
            self._indicators.append(indicator)
            self._emit("gossip.anomaly", message_id=message.message_id, origin=message.origin)
        if received.crl is not None:
            self._after_crl(received.crl, source=f"gossip from {message.origin}")

    def _learn(self, link: Link, frame: PeersFrame) -> None:
        """Keep the PEERS frame's signed records that check out (mesh/peers.py). Its
        unsigned ``peers`` entries are never dialled."""
        now = now_ms()
        learned = self.book.receive(records_from_json(frame.records), now)
        if learned.accepted:
            self.store.save_peer_records(learned.accepted, capacity=self.book.capacity, now_ms=now)
        if learned.rejected:
            log.debug("peer records from %s refused: %s", link.peer_id, dict(learned.rejected))
        self._topup()

    def _send_peers(self, link: Link, *, exclude: str) -> None:
        """PEERS: our own record, then the valid records of our other linked peers (and
        their addresses, unsigned, for version-1 nodes that do not read records)."""
        linked = self.book.valid([n for n in self.links if n != exclude], now_ms())
        records = [self._record, *linked] if self._record is not None else linked
        peers = [PeerAddress(r.node_id, r.addresses[0]) for r in linked]
        link.send_peers(peers, [r.encode() for r in records])

    def _refresh_record(self, *, force: bool = False) -> None:
        """Sign a new record of our own when half the last one's life has passed (or our
        certificate changed), and give it to every link."""
        now = now_ms()
        if not force and not own_record_due(self._record, now):
            return
        cert = self.identity.certificate
        self._record = own_record(
            self.identity.key,
            self.node_id,
            [self.advertised],
            previous=self._record,
            now_ms=now,
            not_after_ms=int(cert.not_valid_after_utc.timestamp() * 1000),
            chain=self.identity.chain_der,
        )
        if self._record is not None:
            for link in self.links.values():
                link.send_peers([], [self._record.encode()])

    # --- revocation -------------------------------------------------------------------------

    def _on_crl_frame(self, link: Link, der: bytes) -> None:
        try:
            self._apply_crl(der, source=f"link from {link.peer_id}")
        except CrlRejected as exc:
            link.close(CloseCode.REFUSED, str(exc))

    def _apply_crl(self, der: bytes, *, source: str) -> CrlUpdate | None:
        update = self.trust.apply_crl(der)
        if update is not None:
            self._after_crl(update, source=source)
        return update

    def _after_crl(self, update: CrlUpdate, *, source: str) -> None:
        """A newer CRL: keep it, cut off every revoked peer, pass it on."""
        assert self.trust.crl_der is not None
        self.store.save_crl(update.number, self.trust.crl_der)
        for peer, link in list(self.links.items()):
            if link.serial is not None and self.trust.is_revoked(link.serial):
                link.close(CloseCode.REVOKED, "your certificate is revoked")
                self._forget_node(peer)
        for link in list(self._pending):
            if link.serial is not None and self.trust.is_revoked(link.serial):
                link.close(CloseCode.REVOKED, "your certificate is revoked")
        for peer, info in list(self.peers.items()):
            if info.serial is not None and self.trust.is_revoked(info.serial):
                self._forget_node(peer)
        for link in self.links.values():
            link.send_crl(self.trust.crl_der)
        self.store.forget_peers(self.book.prune(now_ms()))  # records of revoked nodes
        self._emit("crl.updated", number=update.number, revoked=len(update.revoked), source=source)

    def _forget_node(self, node_id: str) -> None:
        self.revoked_nodes.add(node_id)
        self.peers.pop(node_id, None)
        if self.links.pop(node_id, None) is not None and len(self.links) < self.dial_target:
            self._links_low.set()  # the bootstrap redial and top-up find a replacement
            self._topup()
        if self.book.remove(node_id):
            self.store.forget_peer(node_id)
        self.engine.forget_peer(node_id)
        self._emit("peer.revoked", peer=node_id)

    async def refresh_crl(self) -> bool:
        """Fetch the CRL from the CA; True when it was newer than ours."""
        client = CaClient(self.config.ca_url, self.directory / "ca.crt", timeout=10.0)
        try:
            crl = await asyncio.to_thread(client.crl)
            der = crl.public_bytes(serialization.Encoding.DER)
            if not self.trust.is_newer_crl(der):
                return False
            if self.links and len(der) <= MAX_GOSSIP_CRL:
                # Gossip it, signed by us: the engine applies it as it would a peer's,
                # and the mesh learns it faster than by everyone's own fetch. (If we are
                # the one revoked, or it is too big to gossip, it is applied below and
                # only pushed over links: mesh-link.md section 9.1.)
                with contextlib.suppress(ProtocolError):
                    received = self.publish(crl_payload(der))
                    if received.crl is not None:
                        return True
            return self._apply_crl(der, source="CA") is not None
        except ProtocolError as exc:
            self._emit("crl.fetch_failed", error=str(exc), level=logging.WARNING)
            return False

    async def _crl_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.crl_interval)
            await self.refresh_crl()

    # --- housekeeping -----------------------------------------------------------------------

    async def _digest_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.digest_interval)
            now = now_ms()
            for peer, link in list(self.links.items()):
                ids = self.engine.ihave_for(peer, now)
                if ids:
                    link.send_ihave(ids)
            self.store.forget_peers(self.book.prune(now))  # expired records
            self._refresh_record()
            self._topup()

    async def _flush_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()
            ticks += 1
            if ticks % 300 == 0:
                self.seen.prune(now_ms())
                # Age limits pass even with no traffic (mesh/store.py; nothing new: prune only).
                self.store.save([], [], capacity=self.seen.capacity, now_ms=now_ms())

    def flush(self) -> None:
        seen = self.seen.take_pending()
        indicators, self._indicators = self._indicators, []
        if seen or indicators:
            self.store.save(seen, indicators, capacity=self.seen.capacity, now_ms=now_ms())

    # --- certificate renewal ----------------------------------------------------------------

    def renewal_due(self) -> datetime:
        cert = self.identity.certificate
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return start + (end - start) * RENEW_AT

    async def _renewal_loop(self) -> None:
        while True:
            wait = (self.renewal_due() - datetime.now(UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self.renew()
            except ProtocolError as exc:
                left = self.identity.certificate.not_valid_after_utc - datetime.now(UTC)
                retry = min(max(left.total_seconds() / 10, RENEW_RETRY[0]), RENEW_RETRY[1])
                self._emit(
                    "cert.renew_failed", error=str(exc), retry_in=retry, level=logging.WARNING
                )
                await asyncio.sleep(retry)

    async def renew(self) -> None:
        """Rotate through the CA's ``/v1/rotate``; live links keep the old certificate,
        new links (and the API) use the new one."""
        await asyncio.to_thread(
            rotate_node, self.directory, passphrase=self._passphrase, ca_url=self.config.ca_url
        )
        self.identity = self._load_identity()
        self._tickets.clear()  # a resumed link would present the old certificate
        if self.api_site is not None:
            self.api_site.context = self.identity.api
        self._refresh_record(force=True)  # signed with the new key, the new chain
        cert = self.identity.certificate
        self._emit(
            "cert.renewed",
            serial=format(cert.serial_number, "x"),
            not_after=cert.not_valid_after_utc.isoformat(),
        )

    def _load_identity(self) -> Identity:
        key = load_key_file(self.directory / "node.key", self._passphrase)
        chain = tuple(x509.load_pem_x509_certificates((self.directory / "node.crt").read_bytes()))
        for issuer in chain[1:]:
            self.trust.add_issuer(issuer)
        config = TlsConfig(
            cert_file=self.directory / "node.crt",
            key_file=self.directory / "node.key",
            ca_file=self.directory / "ca.crt",
            alpn=(ALPN,),
            key_passphrase=self._passphrase,
            is_revoked=self.trust.is_revoked,
        )
        # The API asks for a client certificate but lets the handshake finish without
        # one, so that the answer is a JSON 401 or 403, not a TLS alert.
        api = dataclasses.replace(config, alpn=(), is_revoked=None, client_auth="request")
        return Identity(
            key,
            chain,
            TlsContext(config, server=True),
            TlsContext(config, server=False),
            TlsContext(api, server=True),
        )

    # --- API --------------------------------------------------------------------------------

    async def _start_api(self) -> None:
        from trustmesh.node.api import node_app

        host, port = split_address(self.config.api, any_port=True)
        self._api = await serve_app(
            node_app(self),
            host,
            port,
            context=self.identity.api,
            policy=self.config.policy,
            name="node API",
            shutdown_timeout=2.0,
        )
        self.api_site = self._api.site

    def health(self) -> dict[str, Any]:
        cert = self.identity.certificate
        stats = self.engine.stats
        return {
            "node_id": self.node_id,
            "status": "ok",
            "links": len(self.links),
            "peers": len(self.peers),
            "listen": self.listen_address,
            "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "renewal_due": self.renewal_due().isoformat(),
            "crl_number": self.trust.crl_number if self.trust.crl_der else None,
            "revoked_serials": len(self.trust.revoked),
            "seen": len(self.seen),
            "gossip": {
                "accepted": stats.accepted,
                "duplicates": stats.duplicates,
                "forwarded": stats.forwarded,
                "rejected": dict(stats.rejected),
            },
            "limits": self._limit_counts(),
        }

    def _limit_counts(self) -> dict[str, dict[str, int]]:
        """How often each resource limit was hit, per listener (docs/limits.md)."""
        counts: dict[str, dict[str, int]] = {}
        if self._server is not None:
            counts["links"] = self._server.listener.stats.snapshot()
        if self.api_site is not None:
            counts["api"] = self.api_site.listener.stats.snapshot()
        return counts

    def _emit(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        log.log(level, event, extra={"node": self.node_id, "fields": fields})
        for listener in self.listeners:
            listener(event, fields)


async def _within(seconds: float, *waits: Awaitable[object], what: str = "") -> bool:
    """Wait for all of ``waits`` (their errors ignored) for at most ``seconds``; say so
    (if ``what``) when they do not finish, rather than hang a shutdown."""
    if not waits:
        return True
    futures = [asyncio.ensure_future(w) for w in waits]
    _, pending = await asyncio.wait(futures, timeout=seconds)
    for future in futures:
        if future.done() and not future.cancelled():
            future.exception()  # retrieved: a shutdown reports nothing more
    if pending and what:
        log.warning("shutdown: %d of %s did not finish within %g s", len(pending), what, seconds)
    return not pending


def _collision(me: str, first: Link, second: Link) -> tuple[Link, Link]:
    """Two links to one peer: keep the one dialled by the smaller node_id, or if one
    side dialled both, the one from the dialler's lower TCP port. Both ends see the
    same facts, so both keep the same link."""

    def rank(link: Link) -> tuple[str, int]:
        return (me if link.initiator else str(link.peer_id), link.dialler_port)

    return (first, second) if rank(first) <= rank(second) else (second, first)
