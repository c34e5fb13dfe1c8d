"""A running mesh node: the asyncio driver of :class:`trustmesh.mesh.node.NodeCore`.

    node = MeshNode.from_directory(Path("node-1"), passphrase)
    await node.start()       # links, API, CRL polls, renewal, gossip housekeeping
    await node.publish(anomaly_payload("ab" * 16, "port-scan", 0.8))
    await node.stop()

The policy (who to dial, the link cap, collisions, revocation, gossip) lives in the
sans-IO core; this module owns the sockets, the tasks, the store, the API and the clock,
and carries out the core's actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from trustmesh.api.ca_client import (
    finish_interrupted_rotation,
    forget_previous_key,
    recorded_devices,
    report_attestation,
)
from trustmesh.bundle.store import StoreError
from trustmesh.clock import SYSTEM_CLOCK, Clock
from trustmesh.crypto.keys import KeyKind
from trustmesh.errors import ProtocolError
from trustmesh.io.https import HttpServer, HttpsSite, serve_app, serve_unix_app
from trustmesh.io.listener import Listener
from trustmesh.io.stream import StreamDriver, StreamServer, serve_stream
from trustmesh.io.tasks import TaskSet, within
from trustmesh.keystore.signer import Signer
from trustmesh.keystore.uri import close_signer, open_signer
from trustmesh.mesh import attest as attest_actions
from trustmesh.mesh import dtn as bundle_actions
from trustmesh.mesh import node as core_actions
from trustmesh.mesh.attest import LinkAttestation, LinkAttestationPolicy
from trustmesh.mesh.bundle_codec import MeshBundleCodec
from trustmesh.mesh.dtn import BundleAgent
from trustmesh.mesh.engine import GossipEngine, Received, SeenCache
from trustmesh.mesh.gossip import (
    DEFAULT_TTL_MS,
    GossipMessage,
    crl_payload,
    decode_message,
    sign_message,
)
from trustmesh.mesh.link import CloseCode, MeshLink, join_address, split_address
from trustmesh.mesh.node import Action, NodeCore, PeerInfo
from trustmesh.mesh.peers import PeerBook
from trustmesh.mesh.store import MeshStore
from trustmesh.mesh.trust import MAX_GOSSIP_CRL, CrlUpdate, TrustView
from trustmesh.metrics.exposition import MetricsServer
from trustmesh.metrics.node import NodeMetrics
from trustmesh.node.api import local_app, node_app
from trustmesh.node.batch import StoreBatch
from trustmesh.node.bundles import (
    BUNDLE_STORE_FILE,
    CONTACT_SERVICE,
    GOSSIP_SERVICE,
    SEEK_SERVICE,
    NodeBundles,
    StoreLock,
)
from trustmesh.node.config import NodeConfig, load_config
from trustmesh.node.crl import CrlSource
from trustmesh.node.dashboard import node_dashboard
from trustmesh.node.dialer import Dialer
from trustmesh.node.discovery import certificate_fingerprint
from trustmesh.node.health import health_of, renewal_due
from trustmesh.node.identity import Identity, load_identity, rotate_identity
from trustmesh.node.links import Link, LinkFailed
from trustmesh.node.runfile import API_SOCKET, RUN_FILE, write_run_file
from trustmesh.pki.extensions import attested_platform_of
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsStream
from trustmesh.tpm.attester import DEFAULT_PCRS, TpmAttester

if TYPE_CHECKING:
    from trustmesh.node.mdns import MdnsDiscovery

__all__ = ["RUN_FILE", "STORE_FILE", "Identity", "MeshNode", "PeerInfo", "now_ms"]

log = logging.getLogger("trustmesh.node")

CLOSE_TIMEOUT = 5.0  # for the links' goodbyes at shutdown
MAX_ADDRESSES = 1024  # signed peer records kept, one per node_id (mesh/peers.py)
STORE_FILE = "mesh.db"


def now_ms() -> int:
    return SYSTEM_CLOCK.time_ms()


class MeshNode:
    def __init__(
        self,
        directory: Path,
        config: NodeConfig,
        passphrase: bytes | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        device: Signer | None = None,
        attester: TpmAttester | None = None,
    ) -> None:
        self.directory = directory
        self.config = config
        # The identity key on a token or TPM (None: node.key is the identity), and the
        # TPM that attests at renewal and on links (docs/protocols/keys.md, attestation.md).
        self.device = device
        self.attester = attester
        self._quoting = asyncio.Lock()  # one TPM quote for a link at a time
        self.node_id = config.node_id
        self.clock = clock
        self._passphrase = passphrase
        self.store = MeshStore(directory / STORE_FILE)
        self.trust = TrustView(x509.load_pem_x509_certificates((directory / "ca.crt").read_bytes()))
        self.seen = SeenCache()
        self.engine = GossipEngine(
            self.node_id, self.trust, fanout=config.gossip_fanout, seen=self.seen
        )
        self.identity = load_identity(directory, passphrase, self.trust, device)
        # The address book: signed peer records, the only addresses dialled besides the
        # bootstrap list (mesh-link.md section 8.1).
        self.book = PeerBook(self.trust, self.node_id, capacity=MAX_ADDRESSES)
        # Bundles (docs/protocols/bundles.md): stored, carried and forwarded by the core.
        # A node that ran before announces itself when it starts again (contact).
        self._ran_before = (directory / BUNDLE_STORE_FILE).exists()
        self._bundle_lock = StoreLock(directory)  # one writer: this process
        self.bundle_store = NodeBundles.open_store(
            directory, quota=config.bundle_quota, source_quota=config.bundle_source_quota
        )
        self.bundle_codec = MeshBundleCodec(
            self.node_id,
            self.trust,
            lambda data: self.identity.signer.sign(data),
            lambda: self.identity.chain_der,
        )
        agent: BundleAgent[Link] = BundleAgent(
            self.node_id,
            self.bundle_store,
            self.bundle_codec,
            is_revoked=lambda serial: self.trust.is_revoked(int(serial, 16)),
            copies=config.bundle_copies,
            mesh_services=(CONTACT_SERVICE, GOSSIP_SERVICE, SEEK_SERVICE),
        )
        self.core: NodeCore[Link] = NodeCore(
            config.core_settings(config.advertise or config.listen, MAX_ADDRESSES),
            self.identity.for_core(),
            self.trust,
            self.engine,
            self.book,
            rng=random.Random(),  # noqa: S311 (dial order and jitter, not secrets)
            bundles=agent,
            attestation=LinkAttestation(
                LinkAttestationPolicy(config.link_attestation), can_quote=attester is not None
            ),
        )
        self.bundles = NodeBundles(
            self.node_id,
            self.bundle_store,
            self.bundle_codec,
            agent,
            clock,
            self._run,
            lambda: format(self.identity.certificate.serial_number, "x"),
            linked=lambda node_id: node_id in self.core.links,
            own_record=lambda: self.core.record.encode() if self.core.record else None,
        )
        self.listeners: list[Callable[[str, Any], None]] = []  # (event name, detail)
        self._live: set[Link] = set()  # every link whose connection is open
        self.batch = StoreBatch(self.store, self.seen, record_capacity=MAX_ADDRESSES, clock=clock)
        self._drain_scheduled = False
        self._wake = asyncio.Event()  # the core's next deadline may have moved
        self.crl_source = CrlSource(config.ca_url, directory / "ca.crt")
        self.link_server: StreamServer[TlsStream] | None = None
        self.api_server: HttpServer | None = None
        self.api_site: HttpsSite | None = None
        # The read-only API on D/api.sock (no TLS: the file's 0600 mode is the credential).
        self.local_api: HttpServer | None = None
        # Scheduled renewals by outcome (renewed, failed), for the metrics.
        self.renewals: Counter[str] = Counter()
        self._tasks = TaskSet()
        self.discovery: MdnsDiscovery | None = None  # with ``mdns = true``, once started
        self.dialer = Dialer(
            config,
            clock,
            identity=lambda: self.identity,
            advertised=lambda: self.advertised,
            authorize=lambda chain: self.core.authorize_chain(chain, clock.time_ms()),
            crl_number=lambda: self.trust.crl_number,
            tickets=MAX_ADDRESSES,
            attest=config.link_attestation != "off" or attester is not None,
        )
        # Read at scrape time from the counters above (docs/metrics.md); served on the
        # API and, with ``metrics = "HOST:PORT"``, on a plain-HTTP port of its own.
        self.metrics = NodeMetrics(self)
        self.metrics_server: MetricsServer | None = None
        # /dashboard/ on the API and the local socket (trustmesh.node.dashboard mounts it).
        self.dashboard = node_dashboard(self)

    @classmethod
    def from_directory(
        cls, directory: Path, passphrase: bytes | None = None, *, attest: str | None = None
    ) -> MeshNode:
        """The node in ``directory``, with the identity key and the attesting TPM it
        enrolled with (enrollment.json); ``attest`` (``tpm:<TCTI>``) overrides the TPM."""
        StoreLock.check_free(directory)  # a second `node run` stops here: "already running"
        finish_interrupted_rotation(directory)  # before the key is read
        recorded = recorded_devices(directory)
        attest = attest or recorded.get("attest")
        attester = None if attest is None else TpmAttester.from_spec(attest)
        identity_uri = recorded.get("identity_key")
        device = None
        if identity_uri is not None:
            device = open_signer(identity_uri, kinds={KeyKind.P256})
        try:
            return cls(
                directory, load_config(directory), passphrase, device=device, attester=attester
            )
        except BaseException:
            if device is not None:
                close_signer(device)
            raise

    # --- what the core holds ------------------------------------------------------------

    @property
    def links(self) -> dict[str, Link]:
        return self.core.links

    @property
    def peers(self) -> dict[str, PeerInfo]:
        return self.core.peers

    @property
    def revoked_nodes(self) -> set[str]:
        return self.core.revoked_nodes

    @property
    def dial_target(self) -> int:
        return self.core.dial_target

    @property
    def addresses(self) -> dict[str, str]:
        """node_id -> the address it would be dialled at, for each valid signed record."""
        return self.core.dialable(self.clock.time_ms())

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        # First: a socket a live process serves stops the start before anything listens.
        self.local_api = await serve_unix_app(
            local_app(self, clock=self.clock, metrics=self.metrics.registry),
            self.directory / API_SOCKET,
            policy=self.config.policy,
            name="local API",
            shutdown_timeout=2.0,
        )
        now = self.clock.time_ms()
        self.seen.load(self.store.seen(), now)
        stored = self.store.crl()
        if stored is not None:
            self.apply_crl(stored, source="store")
        # The peer records of the last run, checked again (that CRL included): peers to
        # dial if the bootstrap list is down.
        self.store.forget_peers(self.core.load_records(self.store.peer_records(), now))
        await self.refresh_crl()
        host, port = split_address(self.config.listen, any_port=True)
        self.link_server = await serve_stream(
            lambda: self.dialer.new_stream(initiator=False),
            self._serve_link,
            host,
            port,
            on_accept=self._accepted,
            policy=self.config.policy,
            name="mesh links",
        )
        api_host, api_port = split_address(self.config.api, any_port=True)
        self.api_server = await serve_app(
            node_app(self, clock=self.clock, bundles=self.bundles, metrics=self.metrics.registry),
            api_host,
            api_port,
            context=self.identity.api,
            policy=self.config.policy,
            name="node API",
            shutdown_timeout=2.0,
        )
        self.api_site = self.api_server.site
        if self.config.metrics is not None:
            metrics_host, metrics_port = split_address(self.config.metrics, any_port=True)
            self.metrics_server = MetricsServer(self.metrics.registry, metrics_host, metrics_port)
            await self.metrics_server.start()
        # The listen port is known now: peers are told it.
        self.core.settings = self.config.core_settings(self.advertised, MAX_ADDRESSES)
        self._run(self.core.start(self.clock.time_ms()))
        if self._ran_before and self.core.record is not None:
            self._announce(self.core.record.encode())
        if self.config.mdns:
            await self._start_mdns()
        self._tasks.spawn(self._timer_loop())
        self._tasks.spawn(self.batch.run())
        # node.prev.key goes when the rotation's overlap ends (its certificate expires).
        self._tasks.spawn(forget_previous_key(self.directory))
        write_run_file(self.directory, self.node_id, self.listen_address, self.api_url)
        self._emit("node.started", listen=self.listen_address, api=self.api_url)

    async def quiesce(self) -> None:
        """Stop dialling, fetching and renewing (links stay up): the first half of
        :meth:`stop`. A mesh that shuts down quiesces every node first, so no node dials
        one that is going away."""
        self.core.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        await self._tasks.cancel(CLOSE_TIMEOUT, "background tasks")

    async def stop(self) -> None:
        """Close every link with a CLOSE frame, stop the API, commit the store."""
        await self.quiesce()
        if self.link_server is not None:
            self.link_server.close("node shutting down")
        live = list(self._live)
        for link in live:
            link.close(CloseCode.SHUTDOWN, "node shutting down")
        if not await within(CLOSE_TIMEOUT, *(link.wait_closed() for link in live)):
            for link in live:
                link.abort("no goodbye in time")
            await within(CLOSE_TIMEOUT, *(link.wait_closed() for link in live), what="links")
        if self.link_server is not None:
            await within(CLOSE_TIMEOUT, self.link_server.wait_closed(), what="the link listener")
        if self.api_server is not None:
            await within(CLOSE_TIMEOUT, self.api_server.stop(), what="the API")
        if self.local_api is not None:  # the socket file goes with it
            await within(CLOSE_TIMEOUT, self.local_api.stop(), what="the local API")
        if self.metrics_server is not None:
            await within(CLOSE_TIMEOUT, self.metrics_server.stop(), what="the metrics port")
        await self.crl_source.close()
        self.flush()
        self.store.close()
        self.bundle_store.close()
        self._bundle_lock.release()
        if self.device is not None:
            close_signer(self.device)
        (self.directory / RUN_FILE).unlink(missing_ok=True)
        self._emit("node.stopped")

    async def __aenter__(self) -> MeshNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def listen_address(self) -> str:
        host, port = split_address(self.config.listen, any_port=True)
        if port == 0 and self.link_server is not None:
            port = self.link_server.port
        return join_address(host, port)

    @property
    def metrics_url(self) -> str | None:
        """``http://HOST:PORT/metrics`` while the plain-HTTP metrics port serves."""
        return self.metrics_server.url if self.metrics_server is not None else None

    def running_listeners(self) -> dict[str, Listener]:
        """The running listeners by name (their connections and limit counters)."""
        running: dict[str, Listener] = {}
        if self.link_server is not None:
            running["links"] = self.link_server.listener
        if self.api_site is not None:
            running["api"] = self.api_site.listener
        if self.local_api is not None:
            running["local"] = self.local_api.listener
        if self.metrics_server is not None and self.metrics_server.listener is not None:
            running["metrics"] = self.metrics_server.listener
        return running

    def link_states(self) -> dict[str, int]:
        """Open links by state: ``up`` (in the link table), ``handshake`` (TLS or HELLOs
        under way), ``closing`` (up once but not held: refused, a duplicate, replaced)."""
        states = {"up": len(self.core.links), "handshake": 0, "closing": 0}
        held = set(map(id, self.core.links.values()))
        for link in self._live:
            if not link.was_up:
                states["handshake"] += 1
            elif id(link) not in held:
                states["closing"] += 1
        return states

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

    # --- the core's actions -------------------------------------------------------------------

    def _run(self, actions: list[Action[Link]]) -> None:
        for action in actions:
            match action:
                case (
                    core_actions.SendGossip()
                    | core_actions.SendIHave()
                    | core_actions.SendIWant()
                    | core_actions.SendPeers()
                    | core_actions.SendCrl()
                    | core_actions.CloseLink()
                    | bundle_actions.SendBundleOffer()
                    | bundle_actions.SendBundleWant()
                    | bundle_actions.SendBundle()
                    | bundle_actions.SendBundleAck()
                    | attest_actions.SendAttestChallenge()
                    | attest_actions.SendAttestEvidence()
                ):
                    action.link.carry(action)
                case attest_actions.MakeQuote(link, qualifying):
                    self._tasks.spawn(self._quote_for_core(link, qualifying))
                case attest_actions.ReportAttestation(peer, serial, raw):
                    self._tasks.spawn(self._report_attestation(peer, serial, raw))
                case bundle_actions.BundleForwarded(bundle_id, peer, released):
                    self._emit(
                        "bundle.forwarded",
                        level=logging.INFO if released else logging.DEBUG,
                        bundle_id=bundle_id,
                        peer=peer,
                        released=released,
                    )
                case bundle_actions.BundleDelivered(bundle, service) if service == CONTACT_SERVICE:
                    record = self.bundle_codec.payload_of(bundle.data)
                    self._run(self.core.contact_record(record, self.clock.time_ms()))
                case bundle_actions.BundleDelivered(bundle, service) if service.startswith(
                    SEEK_SERVICE + "/"
                ):
                    if service == f"{SEEK_SERVICE}/{self.node_id}":  # sought: we dial
                        record = self.bundle_codec.payload_of(bundle.data)
                        self._run(self.core.seeker_record(record, self.clock.time_ms()))
                case bundle_actions.BundleDelivered(bundle, service) if service == GOSSIP_SERVICE:
                    self._gossip_from_bundle(bundle.data)
                case bundle_actions.BundleDelivered(bundle, service):
                    self._emit(
                        "bundle.delivered",
                        bundle_id=bundle.bundle_id,
                        source=bundle.source,
                        service=service,
                    )
                case core_actions.Dial(address):
                    self._tasks.spawn(self._dial_for_core(address))
                case core_actions.KeepAnomaly(message):
                    self.batch.keep_anomaly(message)
                case core_actions.SaveCrl(number, der):
                    self.store.save_crl(number, der)
                case core_actions.SavePeerRecords(records):
                    self.batch.keep_records(records)
                case core_actions.ForgetPeers(node_ids):
                    self.batch.forget_records(node_ids)
                case core_actions.FetchCrl():
                    self._tasks.spawn(self._poll_crl())
                case core_actions.Renew():
                    self._tasks.spawn(self._renew_for_core())
                case core_actions.Notify(event, fields, level):
                    self._emit(event, level=level, **fields)
        self._wake.set()

    def _announce(self, record: bytes) -> None:
        """The contact broadcast; a full store only costs us the early contact."""
        try:
            self.bundles.announce(record)
        except StoreError as exc:
            self._emit("bundle.contact_not_sent", level=logging.WARNING, error=str(exc))

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.core.next_deadline()
            wait = 1.0 if deadline is None else (deadline - self.clock.time_ms()) / 1000
            if wait > 0:
                self._wake.clear()
                # asyncio.timeout, not wait_for: a cancel that meets a wake-up must not
                # be swallowed (wait_for can on 3.11), or quiesce would wait forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            self._run(self.core.handle_timer(self.clock.time_ms()))

    # --- publishing -------------------------------------------------------------------------

    def sign(self, payload: dict[str, Any], *, ttl_ms: int | None = None) -> GossipMessage:
        """A message from this node, signed with its key, its chain attached."""
        return sign_message(
            self.identity.signer,
            self.node_id,
            payload,
            now_ms=self.clock.time_ms(),
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
        assert sender is None, "gossip from links goes through the core's inbox"
        started = self.clock.monotonic()
        try:
            received, actions = self.core.publish(message, raw, self.clock.time_ms())
        finally:
            self.metrics.gossip_checked(self.clock.monotonic() - started)
        self._run(actions)
        if received.new and message.origin == self.node_id and message.kind == "anomaly":
            try:  # the nodes that are down get it as a bundle (bundles.md section 8)
                self.bundles.carry_gossip(message.encode(), message.expiry)
            except (StoreError, ProtocolError) as exc:
                self._emit("bundle.gossip_not_carried", level=logging.WARNING, error=str(exc))
        return received

    def _gossip_from_bundle(self, data: bytes) -> None:
        """An anomaly that came as a bundle: into the gossip pipeline, as from the API
        (checked, deduplicated, stored, spread)."""
        try:
            raw = self.bundle_codec.payload_of(data)
            message = decode_message(raw)
            if message.message_id in self.seen:
                return  # gossip brought it first (the usual case): not a gossip duplicate
            self.accept(message, raw, sender=None)
        except ProtocolError as exc:
            self._emit("bundle.gossip_refused", level=logging.DEBUG, error=str(exc))

    # --- links ------------------------------------------------------------------------------

    def _open(self, driver: StreamDriver[TlsStream], address: str | None) -> Link:
        core = driver.core.inner
        assert isinstance(core, MeshLink)
        link = Link(driver, core, address=address, on_event=self._on_event)
        self.core.link_opened(link, initiator=address is not None, address=address)
        self._live.add(link)
        return link

    def _accepted(self, driver: StreamDriver[TlsStream]) -> None:
        self._open(driver, None)

    async def _serve_link(self, driver: StreamDriver[TlsStream]) -> None:
        await driver.wait_closed()

    def _on_event(self, link: Link, event: Event) -> None:
        if isinstance(event, ConnectionClosed):
            self._live.discard(link)
        self._run(self.core.link_event(link, event, self.clock.time_ms()))
        if self.core.gossip_pending and not self._drain_scheduled:
            # The frames of one read are checked together once its events are handed in.
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        started = self.clock.monotonic()
        actions = self.core.drain_gossip(self.clock.time_ms())
        self.metrics.gossip_checked(self.clock.monotonic() - started)
        self._run(actions)

    async def dial(self, address: str) -> Link:
        """Open a link to ``address``, returned once both HELLOs are exchanged (raises
        :class:`LinkFailed` or ``OSError``)."""
        return await self.dialer.dial(address, self._open)

    async def _dial_for_core(self, address: str) -> None:
        """A core's Dial: its LinkUp ends the dial's bookkeeping; a failure is told. An
        address that only mDNS vouches for is dialled at the discovery's rate, and its
        peer must present the advertised certificate (docs/protocols/discovery.md)."""
        check = None
        if self.discovery is not None and not self._vouched(address):
            check = await self.discovery.check_for(address)
        try:
            await self.dialer.dial(address, self._open, check=check)
        except (LinkFailed, OSError) as exc:
            self._run(self.core.dial_failed(address, str(exc), self.clock.time_ms()))
        finally:
            if check is not None and self.discovery is not None:
                self.discovery.dialled(check)

    def _vouched(self, address: str) -> bool:
        """A bootstrap address, or one of a valid signed peer record."""
        return address in self.config.bootstrap or address in self.addresses.values()

    def discovered(self, found: list[tuple[str, str]]) -> None:
        """The (node_id, address) candidates a local discovery holds now: the core
        dials them as it dials the address book's."""
        self._run(self.core.discovered(found, self.clock.time_ms()))

    async def _start_mdns(self) -> None:
        """Advertise the link listener on the LAN and hand the nodes found there to the
        core; a node whose mDNS sockets fail runs on without."""
        from trustmesh.node.mdns import MdnsDiscovery  # zeroconf only when asked for

        host, _ = split_address(self.config.listen, any_port=True)
        discovery = MdnsDiscovery(
            self.node_id,
            host,
            split_address(self.listen_address)[1],
            certificate_fingerprint(self.identity.certificate),
            clock=self.clock,
            changed=self.discovered,
            emit=self._emit,
        )
        try:
            await discovery.start()
        except (OSError, RuntimeError) as exc:  # no socket; zeroconf finds no interface
            self._emit("mdns.failed", level=logging.WARNING, error=str(exc))
            await discovery.stop()
            return
        self.discovery = discovery

    # --- revocation -------------------------------------------------------------------------

    def apply_crl(self, der: bytes, *, source: str) -> CrlUpdate | None:
        """Take a CRL (raises CrlRejected): revoked peers are cut off at once."""
        actions: list[Action[Link]] = []
        update = self.core.apply_crl(der, source, self.clock.time_ms(), actions)
        self._run(actions)
        return update

    async def refresh_crl(self) -> bool:
        """Fetch the CRL from the CA (a 304 when it did not change); True when it was
        newer than ours."""
        number = self.trust.crl_number
        try:
            der = await self.crl_source.fetch()
            sign = self._sign_crl if der is not None and len(der) <= MAX_GOSSIP_CRL else None
            self._run(self.core.crl_fetched(der, self.clock.time_ms(), sign=sign))
        except Exception as exc:  # any failure: the next poll is scheduled all the same
            self._run(self.core.crl_fetch_failed(_why(exc), self.clock.time_ms()))
        return self.trust.crl_number > number

    def _sign_crl(self, der: bytes) -> GossipMessage:
        return self.sign(crl_payload(der))

    async def _poll_crl(self) -> None:
        await self.refresh_crl()

    def flush(self) -> None:
        """Commit the store's pending batch now."""
        self.batch.flush()

    # --- attestation on links (mesh.attest) -------------------------------------------------

    async def _quote_for_core(self, link: Link, qualifying: bytes) -> None:
        """Answer a peer's challenge with a quote of the PCRs our certificate names. One
        quote at a time (the TPM does one anyway), and none for a link gone meanwhile:
        peers that reconnect in a loop queue no work behind a closed link."""
        raw = b""
        async with self._quoting:
            if not link.up:
                return
            if self.attester is not None:
                platform = attested_platform_of(self.identity.certificate)
                pcrs = platform.pcrs if platform is not None else DEFAULT_PCRS
                try:
                    evidence = await asyncio.to_thread(self.attester.quote, qualifying, pcrs)
                    raw = evidence.to_bytes()
                except ProtocolError as exc:
                    self._emit("link.quote_failed", level=logging.WARNING, error=str(exc))
        self._run(self.core.quote_made(link, raw))

    async def _report_attestation(self, peer: str, serial: int, raw: bytes) -> None:
        """Give the CA a peer's failing quote (policy ``revoke``): the CA checks it
        against its own policy and revokes the peer if it fails there too."""
        try:
            answer = await asyncio.to_thread(
                report_attestation,
                self.directory,
                self._passphrase,
                self.config.ca_url,
                serial,
                raw,
            )
        except (ProtocolError, OSError) as exc:
            self._emit(
                "attestation.report_failed", level=logging.WARNING, peer=peer, error=str(exc)
            )
            return
        self._emit("attestation.reported", peer=peer, **answer)

    # --- certificate renewal ----------------------------------------------------------------

    async def _renew_for_core(self) -> None:
        try:
            await self.renew()
        except Exception as exc:  # a disk error too: the retry is scheduled all the same
            self.renewals["failed"] += 1
            self._run(self.core.renew_failed(_why(exc), self.clock.time_ms()))
        else:
            self.renewals["renewed"] += 1

    async def renew(self) -> None:
        """Rotate through the CA; live links keep the old certificate, new links (and
        the API) use the new one."""
        c = self.config
        self.identity = await rotate_identity(
            self.directory, self._passphrase, c.ca_url, self.trust, self.device, self.attester
        )
        self.dialer.tickets.clear()  # a resumed link would present the old certificate
        if self.discovery is not None:
            fingerprint = certificate_fingerprint(self.identity.certificate)
            self._tasks.spawn(self.discovery.readvertise(fingerprint))
        if self.api_site is not None:
            self.api_site.context = self.identity.api
        self._run(self.core.renewed(self.identity.for_core(), self.clock.time_ms()))
        cert = self.identity.certificate
        self._emit(
            "cert.renewed",
            serial=format(cert.serial_number, "x"),
            not_after=cert.not_valid_after_utc.isoformat(),
        )

    # --- health -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return health_of(self)

    def renewal_due(self) -> datetime:
        return renewal_due(self.core.renewal.due_ms)

    def _emit(self, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
        log.log(level, event, extra={"node": self.node_id, "fields": fields})
        for listener in self.listeners:
            listener(event, fields)


def _why(exc: Exception) -> str:
    """A failure's text: a protocol error says it all; anything else is named."""
    return str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
