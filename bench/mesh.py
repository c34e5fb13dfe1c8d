"""Mesh: gossip verification on one node, and coverage of a loopback mesh.

- gossip_verify_per_s: signed gossip messages verified, deduped and queued per second by
  one :class:`trustmesh.mesh.engine.GossipEngine` (``receive_raw``: parse, lifetime,
  seen-cache, rate limit, the origin's certificate, the P-256 ECDSA signature, marked
  seen, kept for ``iwant``, 3 of 4 peers picked to forward to), in the steady state of a
  link: the origin's certificate was proven once, so its messages come without the chain
  (docs/protocols/mesh-link.md section 6.1), and the frames of one TLS read are checked
  as a batch (``receive_batch``, 32 messages: under one 16 KiB TLS record), as the node
  does. Anchor: the signature checks alone,
  ``EllipticCurvePublicKey.verify`` (``cryptography``, ECDSA with SHA-256) on the same
  messages' signatures and signing inputs. Goal: ratio >= 0.8 (issue 22).
- gossip_verify_chain_per_s: the same, every message carrying its origin's chain (leaf
  and issuing CA), as the first messages from an origin on a link do; the chain's
  verification is cached, and so is the decoding of its base64 text. Same anchor.
  Goal: ratio >= 0.75 (issue 22).
- coverage_ms_20: milliseconds from ``publish`` on node-1 until all 20 nodes of a
  :class:`trustmesh.node.local.LocalMesh` hold the anomaly (real TLS 1.3 links on
  127.0.0.1, one process, digests every 0.2 s). No goal. Anchor: one round trip of a
  message of the same size over a stdlib asyncio TLS 1.3 mTLS connection on the same
  loopback, between two of the mesh's nodes' certificates; the ratio is the coverage time
  in round trips.
- coverage_msgs_per_node: gossip messages each node received for one anomaly (accepted
  plus duplicates over all nodes, the origin's own publish left out, over the node count).
  Anchor: one delivery to every node but the origin, ``(n - 1) / n``; the ratio is the
  traffic over that floor. No goal.
- coverage_dups_per_node: the duplicates among them, per node. Anchor:
  coverage_msgs_per_node; the ratio is the share of deliveries that were duplicates.
- link_bulk_mib_per_s: MiB/s of 64 KiB bundles (BUNDLE frames) over one mesh link on
  127.0.0.1: MeshLink inside TlsStream (TLS 1.3 mTLS, node certificates from a
  throwaway CA) on the io stream driver, from ``send_bundle`` until the receiver's
  driver yields the last BundleFrame. Anchor: bare pyOpenSSL TLS 1.3 on the same
  ``SSL.Context`` objects (so the same certificates, groups and cipher), pumped through
  memory BIOs by a minimal asyncio protocol, the same 64 KiB messages behind a 4-byte
  length prefix, the receiver only counting plaintext. Rounds alternate, anchor first.
  Goal: ratio >= 0.8.

Verification: a fresh engine per round (its seen-cache empty, so every message is new)
over one trust view whose chain cache was warmed before the timing, as a running node's
is; the messages are pre-signed and encoded before the timing, each a distinct anomaly
carrying its origin's chain (leaf and issuing CA, DER). Every round checks its engine's
counts (all accepted, none duplicate or rejected, three forwards each). Engine and anchor
rounds alternate, anchor first.

Coverage: the mesh is started and connected, one anomaly goes out as a warm-up, then each
round measures the anchor's round trips (their median) and then one publish (from just
before ``publish`` until every node's seen-cache holds the id, checked on every node
event). After coverage a round waits until the nodes have received every push sent (the
sum of the engines' ``forwarded``) before reading the counts; any rejected message fails
the run. Medians over the rounds are reported; wherever subject and anchor rounds
alternate, the ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import statistics
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from bench.harness import Comparison, Result, compare_rates
from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.io.stream import StreamDriver, open_stream
from trustmesh.mesh.engine import GossipEngine, Received
from trustmesh.mesh.gossip import anomaly_payload, sign_message
from trustmesh.mesh.link import ALPN as LINK_ALPN
from trustmesh.mesh.link import BundleFrame, LinkConfig, LinkUp, MeshLink
from trustmesh.mesh.trust import TrustView, node_id_of
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsConfig, TlsContext
from trustmesh.tls.stream import READ_CHUNK, TlsStream

HOST = "127.0.0.1"
PASSPHRASE = b"bench"
DER = serialization.Encoding.DER

# --- gossip_verify_per_s ----------------------------------------------------------------------
MESSAGES = 2000  # messages per verification round
VERIFY_ROUNDS = 9
RECEIVER = "node-a"
ORIGIN = "node-b"
SENDER = "node-c"
PEERS = (SENDER, "node-d", "node-e", "node-f")
FANOUT = 3  # the engine's default: 3 of the 3 peers that are neither sender nor origin
GENEROUS_RATE = 1e9  # the per-peer rate limit never triggers
# Gossip frames arrive on a link in TLS reads; a node checks the frames of one read as a
# batch. 32 chain-less messages are about 13 KB: less than one 16 KiB TLS record.
BATCH = 32
GENEROUS_BURST = 10**9

# --- coverage ---------------------------------------------------------------------------------
NODES = 20
COVERAGE_ROUNDS = 7
DIGEST_INTERVAL = 0.2  # seconds between a node's ihave digests
ROUND_TRIPS = 20  # anchor round trips per round
CONNECT_TIMEOUT = 30.0  # seconds for the mesh to connect
COVERAGE_TIMEOUT = 30.0  # seconds for one anomaly to reach every node
SETTLE_TIMEOUT = 10.0  # seconds for the pushes still in flight after coverage to land
SETTLE_POLL = 0.002  # duplicates raise no node event: the counts are polled

# --- link_bulk_mib_per_s ----------------------------------------------------------------------
BULK_MESSAGE = 64 * 1024  # bytes of each bundle (and each anchor message)
BULK_MESSAGES = 512  # messages per round: 32 MiB
BULK_ROUNDS = 5
BULK_TIMEOUT = 60.0


class BenchFailure(RuntimeError):
    """A measurement that did not do the work the benchmark asked for."""


# --- gossip verification --------------------------------------------------------------------


@dataclass(frozen=True)
class GossipLoad:
    """Messages signed by one origin before the timing: the encoded messages (what the
    engine parses) and each one's signature and signing input (what the anchor checks)."""

    trust: TrustView
    public_key: ec.EllipticCurvePublicKey
    now_ms: int
    message_ids: list[str]
    raws: list[bytes]  # without the chain (the origin's certificate is known)
    raws_with_chain: list[bytes]
    signed: list[tuple[bytes, bytes]]
    proof: bytes  # one more message, with the chain: proves the certificate to an engine


def gossip_load(workdir: Path, count: int = MESSAGES) -> GossipLoad:
    """A real CA on disk, an origin with a P-256 key and a CA-issued certificate, and
    ``count`` distinct anomalies it signed, each carrying its chain."""
    with CertificateAuthority.init(workdir / "ca", PASSPHRASE) as ca:
        key = PrivateKey.generate(KeyKind.P256)
        leaf = ca.issue(x509.load_pem_x509_csr(make_csr(key, ORIGIN).encode()), ORIGIN)
        chain = (leaf.public_bytes(DER), ca.issuing_cert.public_bytes(DER))
        trust = TrustView(roots=[ca.root_cert], issuers=[ca.issuing_cert])
    public_key = leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise BenchFailure("the origin's certificate does not hold its P-256 key")
    now = int(time.time() * 1000)
    trust.identity(chain, now_ms=now)  # a running node has verified a known origin's chain
    messages = [
        sign_message(
            key,
            ORIGIN,
            anomaly_payload(
                hashlib.sha256(i.to_bytes(8, "big")).hexdigest(),
                "bench/beacon",
                0.75,
                {"seq": i},
            ),
            now_ms=now,
            chain=chain,
        )
        for i in range(count + 1)
    ]
    proof = messages.pop()
    return GossipLoad(
        trust=trust,
        public_key=public_key,
        now_ms=now + 1,
        message_ids=[m.message_id for m in messages],
        raws=[m.encode(with_chain=False) for m in messages],
        raws_with_chain=[m.encode() for m in messages],
        signed=[(m.signature, m.signed_bytes()) for m in messages],
        proof=proof.encode(),
    )


def engine_round(load: GossipLoad, *, with_chain: bool = False) -> float:
    """A fresh engine takes every message from one peer; messages per second."""
    engine = GossipEngine(
        RECEIVER,
        load.trust,
        fanout=FANOUT,
        rate=GENEROUS_RATE,
        burst=GENEROUS_BURST,
        rng=random.Random(0),  # which peers to forward to: no secret
    )
    now, peers = load.now_ms, list(PEERS)
    engine.receive_raw(load.proof, sender=SENDER, peers=peers, now_ms=now)  # before the clock
    raws = load.raws_with_chain if with_chain else load.raws
    batches = [raws[i : i + BATCH] for i in range(0, len(raws), BATCH)]
    receive = engine.receive_batch
    start = time.perf_counter()
    for batch in batches:
        for result in receive(batch, sender=SENDER, peers=peers, now_ms=now):
            if not isinstance(result, Received):
                raise result
    elapsed = time.perf_counter() - start
    count = len(raws)
    stats = engine.stats
    accepted, forwarded = stats.accepted - 1, stats.forwarded - FANOUT  # less the proof
    if accepted != count or stats.duplicates or stats.rejected:
        raise BenchFailure(
            f"the engine accepted {accepted} of {count} messages, "
            f"{stats.duplicates} duplicates, rejected {stats.rejected}"
        )
    if forwarded != FANOUT * count:
        raise BenchFailure(f"the engine forwarded {forwarded}, not {FANOUT * count}")
    if not all(mid in engine.seen for mid in load.message_ids):
        raise BenchFailure("the engine's seen-cache lacks a message it accepted")
    return count / elapsed


def verify_round(load: GossipLoad) -> float:
    """The anchor: only the ECDSA checks of the same messages; verifications per second."""
    verify, algorithm = load.public_key.verify, ec.ECDSA(hashes.SHA256())
    start = time.perf_counter()
    for signature, data in load.signed:
        verify(signature, data, algorithm)  # raises InvalidSignature on a bad one
    elapsed = time.perf_counter() - start
    return len(load.signed) / elapsed


# --- coverage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    accepted: int
    duplicates: int
    forwarded: int
    rejected: int

    @property
    def received(self) -> int:
        return self.accepted + self.duplicates

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.accepted - other.accepted,
            self.duplicates - other.duplicates,
            self.forwarded - other.forwarded,
            self.rejected - other.rejected,
        )


@dataclass(frozen=True)
class Coverage:
    """One anomaly's spread: the time to reach every node, and the messages it took."""

    seconds: float
    messages_per_node: float
    duplicates_per_node: float


class EchoLoopback:
    """The coverage anchor: a stdlib asyncio TLS 1.3 echo server and one connected client,
    mutually authenticated with two of the mesh's node certificates."""

    def __init__(self, server_dir: Path, client_dir: Path) -> None:
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.server_ctx.load_cert_chain(server_dir / "node.crt", server_dir / "node.key")
        self.server_ctx.load_verify_locations(server_dir / "ca.crt")
        self.server_ctx.verify_mode = ssl.CERT_REQUIRED
        self.client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.client_ctx.load_cert_chain(client_dir / "node.crt", client_dir / "node.key")
        self.client_ctx.load_verify_locations(client_dir / "ca.crt")
        self.client_ctx.check_hostname = False  # node certificates name node_ids
        self.server: asyncio.Server | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.echoed = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._echo, HOST, 0, ssl=self.server_ctx)
        port = self.server.sockets[0].getsockname()[1]
        self.reader, self.writer = await asyncio.open_connection(HOST, port, ssl=self.client_ctx)
        tls = self.writer.get_extra_info("ssl_object")
        if not isinstance(tls, ssl.SSLObject) or tls.version() != "TLSv1.3":
            raise BenchFailure("the anchor's connection is not TLS 1.3")

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def round_trip(self, message: bytes) -> float:
        """Seconds to send ``message`` (length-prefixed) and read it back."""
        assert self.reader is not None
        assert self.writer is not None
        frame = struct.pack(">I", len(message)) + message
        start = time.perf_counter()
        self.writer.write(frame)
        back = await self.reader.readexactly(len(frame))
        elapsed = time.perf_counter() - start
        if back != frame:
            raise BenchFailure("the echo server sent back other bytes")
        return elapsed

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack(">I", header)[0])
                writer.write(header + body)
                self.echoed += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class CoverageRig:
    """A :class:`LocalMesh` of ``nodes`` nodes, and the round-trip anchor."""

    def __init__(
        self, workdir: Path, nodes: int = NODES, *, digest_interval: float = DIGEST_INTERVAL
    ) -> None:
        if nodes < 2:
            raise ValueError("coverage needs at least two nodes")
        self.mesh = LocalMesh(
            workdir / "mesh", nodes, node_settings={"digest_interval": digest_interval}
        )
        self.anchor: EchoLoopback | None = None
        self.published: list[str] = []  # message ids, the warm-up's first
        self.size = 0  # bytes of the last published message, as encoded on the wire

    @property
    def nodes(self) -> list[MeshNode]:
        return self.mesh.nodes

    async def start(self) -> None:
        await self.mesh.start()
        await self.mesh.wait_for(
            self.mesh.connected, CONNECT_TIMEOUT, what=f"a connected mesh of {self.mesh.count}"
        )
        self.anchor = EchoLoopback(self.mesh.workdir / "node-1", self.mesh.workdir / "node-2")
        await self.anchor.start()
        await self.publish()  # warm-up: every node's chain cache learns node-1

    async def stop(self) -> None:
        if self.anchor is not None:
            await self.anchor.stop()
        await self.mesh.stop()

    def counts(self) -> Counts:
        stats = [n.engine.stats for n in self.nodes]
        return Counts(
            sum(s.accepted for s in stats),
            sum(s.duplicates for s in stats),
            sum(s.forwarded for s in stats),
            sum(sum(s.rejected.values()) for s in stats),
        )

    async def publish(self) -> Coverage:
        """node-1 publishes one new anomaly; how long until every node holds it, and how
        many messages the nodes received for it."""
        before = self.counts()
        index = len(self.published)
        payload = anomaly_payload(
            hashlib.sha256(b"coverage %d" % index).hexdigest(), "bench/coverage", 0.9
        )
        nodes = self.nodes
        start = time.perf_counter()
        received = nodes[0].publish(payload)
        message_id = received.message_id
        await self.mesh.wait_for(
            lambda: all(message_id in n.seen for n in nodes),
            COVERAGE_TIMEOUT,
            what=f"anomaly {message_id} on all {len(nodes)} nodes",
        )
        seconds = time.perf_counter() - start
        self.published.append(message_id)
        self.size = len(received.raw)
        spent = await self._settle(before) - before
        if spent.rejected:
            raise BenchFailure(f"the nodes rejected {spent.rejected} messages")
        if spent.accepted != len(nodes):
            raise BenchFailure(f"{spent.accepted} nodes took the anomaly, not {len(nodes)}")
        delivered = spent.received - 1  # node-1's own publish is no delivery
        return Coverage(seconds, delivered / len(nodes), spent.duplicates / len(nodes))

    async def round_trip_ms(self, count: int = ROUND_TRIPS) -> float:
        """The median of ``count`` anchor round trips of a message the size of the last
        published one, in milliseconds."""
        assert self.anchor is not None
        message = bytes(self.size)
        return 1e3 * statistics.median(
            [await self.anchor.round_trip(message) for _ in range(count)]
        )

    async def _settle(self, before: Counts) -> Counts:
        """Wait until every push sent since ``before`` has been received (as new, as a
        duplicate, or rejected) by its peer; return the counts then."""
        async with asyncio.timeout(SETTLE_TIMEOUT):
            while True:
                now = self.counts()
                spent = now - before
                if spent.received - 1 + spent.rejected >= spent.forwarded:
                    return now
                await asyncio.sleep(SETTLE_POLL)


# --- the run ------------------------------------------------------------------------------


def run(
    messages: int = MESSAGES,
    verify_rounds: int = VERIFY_ROUNDS,
    nodes: int = NODES,
    coverage_rounds: int = COVERAGE_ROUNDS,
    bulk_rounds: int = BULK_ROUNDS,
    bulk_messages: int = BULK_MESSAGES,
    *,
    quick: bool = False,
) -> list[Result]:
    """Every figure; ``quick``: a small, fast run (fewer messages, rounds and nodes)."""
    if quick:
        messages, verify_rounds, nodes, coverage_rounds = 256, 3, 4, 2
        bulk_rounds, bulk_messages = 2, 64
    with tempfile.TemporaryDirectory() as tmp:
        load = gossip_load(Path(tmp), messages)
        engine = compare_rates(
            lambda: engine_round(load), lambda: verify_round(load), rounds=verify_rounds
        )
        chain = compare_rates(
            lambda: engine_round(load, with_chain=True),
            lambda: verify_round(load),
            rounds=verify_rounds,
        )
        coverage, coverage_ms, size = _coverage(Path(tmp), nodes, coverage_rounds)
        link_bulk, cipher = bulk(Path(tmp), bulk_rounds, bulk_messages)
    messages_per_node = statistics.median(c.messages_per_node for c in coverage)
    return [
        Result.of(
            "gossip_verify_per_s",
            engine,
            "msg/s",
            "P-256 ECDSA verify alone (cryptography), same messages",
        ),
        Result.of(
            "gossip_verify_chain_per_s",
            chain,
            "msg/s",
            "P-256 ECDSA verify alone (cryptography), same messages",
        ),
        Result.of(
            f"coverage_ms_{nodes}",
            coverage_ms,
            "ms",
            f"asyncio TLS 1.3 mTLS loopback round trip ({size} B), ms",
        ),
        Result(
            "coverage_msgs_per_node",
            messages_per_node,
            "msg/node",
            f"one delivery per node but the origin, {nodes - 1}/{nodes}",
            (nodes - 1) / nodes,
        ),
        Result(
            "coverage_dups_per_node",
            statistics.median(c.duplicates_per_node for c in coverage),
            "dup/node",
            "coverage_msgs_per_node",
            messages_per_node,
        ),
        Result.of(
            "link_bulk_mib_per_s",
            link_bulk,
            "MiB/s",
            f"bare pyOpenSSL TLS 1.3 on the same loopback and contexts ({cipher}),"
            f" {BULK_MESSAGE // 1024} KiB messages",
        ),
    ]


def _coverage(workdir: Path, nodes: int, rounds: int) -> tuple[list[Coverage], Comparison, int]:
    """The coverage rounds, each the anchor's round trips then one publish; returns the
    rounds, coverage in ms against the round trip in ms, and the message size."""

    async def measure() -> tuple[list[Coverage], Comparison, int]:
        rig = CoverageRig(workdir, nodes)
        try:
            await rig.start()
            coverage, rtts = [], []
            for _ in range(rounds):
                rtts.append(await rig.round_trip_ms())
                coverage.append(await rig.publish())
            ms = [1e3 * c.seconds for c in coverage]
            return coverage, Comparison.of(ms, rtts), rig.size
        finally:
            await rig.stop()

    return asyncio.run(measure())


# --- bulk over a link ---------------------------------------------------------------------


def link_pki(workdir: Path) -> tuple[Path, Path]:
    """Two node directories (node.crt with the issuing CA, node.key, ca.crt) from a
    throwaway CA, as a node's ``load_identity`` reads them."""
    dirs = []
    with CertificateAuthority.init(workdir / "link-ca", PASSPHRASE) as ca:
        for name in ("bulk-a", "bulk-b"):
            key = PrivateKey.generate(KeyKind.P256)
            leaf = ca.issue(x509.load_pem_x509_csr(make_csr(key, name).encode()), name)
            directory = workdir / name
            directory.mkdir()
            chain = leaf.public_bytes(serialization.Encoding.PEM)
            chain += ca.issuing_cert.public_bytes(serialization.Encoding.PEM)
            (directory / "node.crt").write_bytes(chain)
            (directory / "ca.crt").write_bytes(
                ca.root_cert.public_bytes(serialization.Encoding.PEM)
            )
            pem = key.to_cryptography().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            (directory / "node.key").touch(mode=0o600)
            (directory / "node.key").write_bytes(pem)
            dirs.append(directory)
    return dirs[0], dirs[1]


def _tls_contexts(directory: Path) -> tuple[TlsContext, TlsContext]:
    config = TlsConfig(
        cert_file=directory / "node.crt",
        key_file=directory / "node.key",
        ca_file=directory / "ca.crt",
        alpn=(LINK_ALPN,),
    )
    return TlsContext(config, server=True), TlsContext(config, server=False)


class BulkLink:
    """Two nodes' mesh links over loopback TCP: MeshLink inside TlsStream (TLS 1.3 mTLS,
    the node's contexts) on the io stream driver, as a node's links run; one side sends
    BUNDLE frames, the other takes them as BundleFrame events."""

    def __init__(self, server_dir: Path, client_dir: Path) -> None:
        self.server_ctx = _tls_contexts(server_dir)[0]
        self.client_ctx = _tls_contexts(client_dir)[1]
        self.sender: StreamDriver[TlsStream] | None = None
        self.receiver: StreamDriver[TlsStream] | None = None
        self._accepted: asyncio.Future[StreamDriver[TlsStream]] | None = None
        self._server: asyncio.Server | None = None

    @staticmethod
    def _stream(context: TlsContext, node_id: str, *, initiator: bool) -> TlsStream:
        link = MeshLink(
            LinkConfig(node_id, hold_time=0, allow_zero_hold=True),
            initiator=initiator,
            authorize=lambda chain: node_id_of(chain[0]),
        )
        stream = TlsStream(context, link)
        link.bind(stream)
        return stream

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._accepted = loop.create_future()
        accepted = self._accepted

        def accept() -> StreamDriver[TlsStream]:
            driver = StreamDriver(self._stream(self.server_ctx, "bulk-a", initiator=False))
            if not accepted.done():
                accepted.set_result(driver)
            return driver

        self._server = await loop.create_server(accept, HOST, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.sender = await open_stream(
            self._stream(self.client_ctx, "bulk-b", initiator=True), HOST, port
        )
        self.receiver = await accepted
        for driver in (self.sender, self.receiver):
            async with asyncio.timeout(BULK_TIMEOUT):
                while not isinstance(await driver.next_event(), LinkUp):
                    pass
        tls = self.sender.core._conn
        if tls.get_protocol_version_name() != "TLSv1.3":
            raise BenchFailure("the link is not TLS 1.3")

    async def stop(self) -> None:
        for driver in (self.sender, self.receiver):
            if driver is not None:
                driver.close("bench done")
                await driver.wait_closed()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def cipher(self) -> str:
        assert self.sender is not None
        return str(self.sender.core._conn.get_cipher_name())

    async def round(self, message: bytes, count: int) -> float:
        """Send ``count`` bundles of ``message``; MiB per second until the last arrived."""
        sender, receiver = self.sender, self.receiver
        assert sender is not None
        assert receiver is not None

        def send(tls: TlsStream) -> list[Event]:
            return tls.inner_action(lambda link: link.send_bundle(1, message))  # type: ignore[attr-defined]

        async def take() -> int:
            got = 0
            while got < count:
                event = await receiver.next_event()
                if isinstance(event, BundleFrame):
                    if len(event.data) != len(message):
                        raise BenchFailure("a bundle arrived with another size")
                    got += 1
                elif isinstance(event, ConnectionClosed):
                    raise BenchFailure(f"the link closed: {event.reason}")
            return got

        start = time.perf_counter()
        taker = asyncio.ensure_future(take())
        for _ in range(count):
            sender.act(send)
            if sender.writing_paused:
                await sender.drain()
        async with asyncio.timeout(BULK_TIMEOUT):
            await taker
        return count * len(message) / (time.perf_counter() - start) / (1 << 20)


class BareTls(asyncio.Protocol):  # the anchor of link_bulk_mib_per_s
    """The anchor: pyOpenSSL TLS 1.3 on the same contexts (so the same certificates,
    groups and cipher), pumped through memory BIOs by a minimal asyncio protocol, with
    the same message sizes behind a 4-byte length prefix; the receiver only counts."""

    def __init__(self, context: TlsContext) -> None:
        conn = SSL.Connection(context.ssl, None)
        if context.server:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.handshake = asyncio.get_running_loop().create_future()
        self.received = 0
        self.wanted = 0
        self.done: asyncio.Future[None] | None = None
        self.paused: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._handshake()

    def _flush(self) -> None:
        while True:
            try:
                out = self.conn.bio_read(READ_CHUNK)
            except SSL.WantReadError:
                return
            assert self.transport is not None
            self.transport.write(out)

    def _handshake(self) -> None:
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            pass
        else:
            if not self.handshake.done():
                self.handshake.set_result(None)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.conn.bio_write(data)
        if not self.handshake.done():
            self._handshake()
            if not self.handshake.done():
                return
        while True:
            try:
                self.received += len(self.conn.recv(READ_CHUNK))
            except (SSL.WantReadError, SSL.ZeroReturnError):
                break
        self._flush()  # tickets, alerts
        if self.done is not None and not self.done.done() and self.received >= self.wanted:
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)
        self._flush()


class BareLoopback:
    def __init__(self, server_dir: Path, client_dir: Path) -> None:
        self.server_ctx = _tls_contexts(server_dir)[0]
        self.client_ctx = _tls_contexts(client_dir)[1]
        self.client: BareTls | None = None
        self.server: BareTls | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[BareTls] = loop.create_future()

        def accept() -> BareTls:
            protocol = BareTls(self.server_ctx)
            if not accepted.done():
                accepted.set_result(protocol)
            return protocol

        self._server = await loop.create_server(accept, HOST, 0)
        port = self._server.sockets[0].getsockname()[1]
        _, self.client = await loop.create_connection(lambda: BareTls(self.client_ctx), HOST, port)
        self.server = await accepted
        async with asyncio.timeout(BULK_TIMEOUT):
            await self.client.handshake
            await self.server.handshake

    async def stop(self) -> None:
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                side.transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def cipher(self) -> str:
        assert self.client is not None
        return str(self.client.conn.get_cipher_name())

    async def round(self, message: bytes, count: int) -> float:
        client, server = self.client, self.server
        assert client is not None
        assert server is not None
        frame = struct.pack(">I", len(message)) + message
        server.wanted = server.received + count * len(frame)
        server.done = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        for _ in range(count):
            client.send(frame)
            if client.paused is not None and not client.paused.done():
                await client.paused
        async with asyncio.timeout(BULK_TIMEOUT):
            await server.done
        return count * len(message) / (time.perf_counter() - start) / (1 << 20)


def bulk(
    workdir: Path,
    rounds: int = BULK_ROUNDS,
    messages: int = BULK_MESSAGES,
    size: int = BULK_MESSAGE,
) -> tuple[Comparison, str]:
    """MiB/s of bundles over a mesh link against the bare pyOpenSSL anchor, in
    alternating rounds (anchor first), and the cipher both used."""
    server_dir, client_dir = link_pki(workdir)
    message = random.Random(7).randbytes(size)

    async def measure() -> tuple[Comparison, str]:
        link, bare = BulkLink(server_dir, client_dir), BareLoopback(server_dir, client_dir)
        try:
            await link.start()
            await bare.start()
            if link.cipher != bare.cipher:
                raise BenchFailure(f"ciphers differ: {link.cipher} and {bare.cipher}")
            await bare.round(message, 16)  # warm-up
            await link.round(message, 16)
            link_rates, bare_rates = [], []
            for _ in range(rounds):
                bare_rates.append(await bare.round(message, messages))
                link_rates.append(await link.round(message, messages))
            return Comparison.of(link_rates, bare_rates), link.cipher
        finally:
            await link.stop()
            await bare.stop()

    return asyncio.run(measure())
