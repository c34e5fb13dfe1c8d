"""The discrete-event simulator: real node, link and gossip cores on one virtual clock.

One heap of events ``(time_ms, seq, kind, x, y, z)``; ``seq`` breaks ties, so a run is a
function of its seed. Every random choice comes from ``random.Random(seed)`` or from
generators derived from it in a fixed order; the wall clock is read only for ``wall_s``.
The model (network, loss, TLS, churn, partitions, bundles) is described in docs/sim.md.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trustmesh.bundle.store import BundleStore
from trustmesh.clock import FakeClock
from trustmesh.mesh.dtn import BundleAgent, BundleDelivered, BundleStats, SendBundle
from trustmesh.mesh.engine import GossipEngine, SeenCache
from trustmesh.mesh.gossip import GossipMessage, anomaly_payload, crl_payload, sign_message
from trustmesh.mesh.link import ALPN, LinkConfig, LinkUp, MeshLink, State
from trustmesh.mesh.node import (
    LINK_ACTIONS,
    Action,
    Dial,
    FetchCrl,
    KeepAnomaly,
    NodeCore,
    NodeIdentity,
    NodeSettings,
    Renew,
    SaveCrl,
    SendGossip,
    SendPeers,
    send_on,
)
from trustmesh.mesh.peers import PeerBook
from trustmesh.mesh.trust import TrustView
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.sim import bundles as sim_bundles
from trustmesh.sim.bundles import (
    CONTACT_SERVICE,
    CONTACT_TTL_MS,
    SEEK_INTERVAL_MS,
    SEEK_SERVICE,
    SEEK_TTL_MS,
    Broadcast,
    BundleTally,
    SimBundleCodec,
    Unicast,
)
from trustmesh.sim.config import CHURN_WINDOW_MS, SimConfig
from trustmesh.sim.pki import NodeCert, SharedIdentities, SimPki
from trustmesh.tls import TlsEstablished

START_MS = FakeClock().time_ms()  # 2030-01-01T00:00:00Z: virtual time is Unix ms from here
INF = 1 << 62
LOSSY = frozenset((3, 6, 7))  # GOSSIP, IHAVE, IWANT (mesh.link.Frame)
PORT = 7400
CHECK_EVERY_MS = 1_000
PROGRESS_EVERY_MS = 5_000
ANOMALY_SPACING_MS = 200
ID_AT = slice(15, 79)  # a gossip message's id in its JSON: {"message_id":"<64 hex>", ...

# Event kinds.
_DELIVER = 0
_LINK_TIMER = 1
_TIMER = 2
_DIAL_UP = 3
_DIAL_FAIL = 4
_CRL = 5
_CALL = 6


class End:
    """One side of one link: the driver's handle (``LinkFacts``), the TLS binding its
    :class:`MeshLink` reads, and one direction of the simulated connection."""

    __slots__ = (
        "address",
        "backlog",
        "closed",
        "core",
        "dialler_port",
        "dirty",
        "eof_sent",
        "established",
        "initiator",
        "last_arrival",
        "node",
        "peer",
        "serial",
        "timer_at",
        "up",
    )

    def __init__(
        self,
        node: SimNode,
        core: MeshLink,
        *,
        initiator: bool,
        address: str | None,
        serial: int,
        port: int,
        established: TlsEstablished,
    ) -> None:
        self.node = node
        self.core = core
        self.initiator = initiator
        self.address = address
        self.serial: int | None = serial  # the peer's certificate
        self.dialler_port = port
        self.established = established
        self.peer: End = self
        self.closed = False
        self.up = False
        self.dirty = False
        self.eof_sent = False
        self.timer_at = INF
        self.last_arrival = 0  # frames in this direction arrive in order
        self.backlog: list[tuple[bytes, bool]] = []  # held while partitioned

    def exporter(self, label: bytes, context: bytes) -> bytes:
        """What both ends of a simulated session agree on (no TLS: no secret either)."""
        ends = sorted((self.serial or 0, self.peer.serial or 0))
        facts = b"%d:%d:%d:" % (ends[0], ends[1], self.dialler_port)
        return hashlib.sha256(label + facts + context).digest()


class SimNode:
    __slots__ = (
        "address",
        "bundle_stats",
        "bundle_store",
        "cert",
        "core",
        "crl_at",
        "ends",
        "incarnation",
        "index",
        "link_config",
        "node_id",
        "rng",
        "saved_records",
        "saved_seen",
        "side",
        "sought",
        "timer_at",
        "up",
    )

    def __init__(self, index: int, cert: NodeCert, rng: random.Random) -> None:
        self.index = index
        self.node_id = cert.node_id
        self.address = f"{cert.node_id}:{PORT}"
        self.cert = cert
        self.rng = rng
        self.core: NodeCore[End] | None = None
        self.up = False
        self.incarnation = 0
        self.side = 0
        self.timer_at: int | None = None
        self.ends: dict[End, None] = {}  # open links, in the order they opened
        self.crl_at: int | None = None  # when it first held the CRL naming every revoked serial
        self.saved_seen: list[tuple[str, int]] = []  # what its store keeps across a restart
        self.saved_records: list[bytes] = []
        self.link_config = LinkConfig(cert.node_id, self.address)
        # --bundles: the node's store outlives its process (a file on a real node), and
        # the stats of each incarnation's agent are summed at the end.
        self.bundle_store: BundleStore | None = None
        self.bundle_stats: list[BundleStats] = []
        self.sought: dict[str, int] = {}  # destination -> when it last sought it


@dataclass
class SimResult:
    report: dict[str, Any]
    anomaly_delays: list[list[int]] = field(default_factory=list)  # per anomaly, per node
    revocation_delays: list[int] = field(default_factory=list)
    coverage_curve: list[tuple[int, float]] = field(default_factory=list)


def percentile(values: list[int], q: float) -> int | None:
    """Nearest rank: the smallest value with at least ``q`` of them at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 1))
    return ordered[int(rank) - 1]


class Simulation:
    def __init__(
        self,
        config: SimConfig,
        directory: Path,
        *,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.wall_start = time.perf_counter()
        master = random.Random(config.seed)  # noqa: S311 (a simulation, not a secret)
        self.net_rng = random.Random(master.getrandbits(64))  # noqa: S311
        self.scenario_rng = random.Random(master.getrandbits(64))  # noqa: S311
        node_seeds = [master.getrandbits(64) for _ in range(config.nodes)]
        # Drawn last: the other generators are the same with and without bundles.
        self.bundle_rng = random.Random(master.getrandbits(64))  # noqa: S311
        self.clock = FakeClock()
        self.now = START_MS
        self.now_s = START_MS / 1000
        self.heap: list[tuple[int, int, int, Any, Any, Any]] = []
        self.seq = 0
        self.dirty: list[End] = []
        self.ports = 40_000
        self.loss = config.loss
        self.lat_low, self.lat_high = config.latency_ms
        self.partitioned = False
        self.blocked: list[End] = []
        self.stopped = False
        t0 = time.perf_counter()
        self.pki = SimPki(directory / "ca", self.clock)
        names = [f"node-{i}" for i in range(config.nodes)]
        certs = self.pki.issue(names, workers=config.workers)
        self.setup_s = time.perf_counter() - t0
        self.shared = SharedIdentities(memo_signatures=True) if config.crypto == "shared" else None
        self.nodes = [
            SimNode(i, cert, random.Random(seed))  # noqa: S311
            for i, (cert, seed) in enumerate(zip(certs, node_seeds, strict=True))
        ]
        self.by_address = {n.address: n for n in self.nodes}
        self.bootstrap = tuple(n.address for n in self.nodes[: config.bootstrap])
        # Measures.
        self.anomaly_ids: dict[bytes, int] = {}
        self.anomaly_meta: list[tuple[int, int, bool]] = []  # (published, origin, in partition)
        self.arrivals: list[list[int]] = []
        self.anomaly_frames = 0
        self.frames_lost = 0
        self.events = 0
        self.revoked: dict[int, int] = {}  # node index -> serial
        self.revoked_at: int | None = None
        self.target_crl = INF
        self.crl_fetches = 0
        self.renewals = 0
        self.formation: dict[str, Any] = {}
        self.connected_at: int | None = None
        self.churned: list[int] = []
        self.to_revoke: frozenset[int] = frozenset()
        self.tally = BundleTally()
        self.payload = bytes(config.bundle_size)
        self.last_event = START_MS
        self.end_at = START_MS

    # --- the event heap ---------------------------------------------------------------------

    def push(self, at: int, kind: int, x: Any = None, y: Any = None, z: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, x, y, z))

    def call(self, at_ms: int, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Run ``fn(arg)`` at ``at_ms`` (from the start of the run)."""
        at = START_MS + at_ms
        self.last_event = max(self.last_event, at)
        self.push(at, _CALL, fn, arg)

    def latency(self) -> int:
        return self.net_rng.randint(self.lat_low, self.lat_high)

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> SimResult:
        with _fewer_collections():
            return self._run()

    def _run(self) -> SimResult:
        wall = time.perf_counter()
        self._schedule()
        heap = self.heap
        pop = heapq.heappop
        end_at = self.end_at
        events = 0
        while heap:
            at, _, kind, x, y, z = pop(heap)
            if at > end_at:
                break
            self.now = at
            self.now_s = at / 1000
            events += 1
            if kind == _DELIVER:
                self._on_deliver(x, y, z)
            elif kind == _LINK_TIMER:
                self._on_link_timer(x, at)
            elif kind == _TIMER:
                self._on_timer(x, y, at)
            elif kind == _DIAL_UP:
                self._on_dial_up(x, y, z)
            elif kind == _DIAL_FAIL:
                self._on_dial_fail(x, y, z)
            elif kind == _CRL:
                self._on_crl(x, y)
            else:
                x(y)
            if self.stopped:
                break
        self.events = events
        result = self._report(time.perf_counter() - wall)
        self.pki.close()
        return result

    def _schedule(self) -> None:
        config = self.config
        rng = self.scenario_rng
        formed = config.formed_at
        for node in self.nodes[: config.bootstrap]:
            self.call(0, self._start_node, node)
        for node in self.nodes[config.bootstrap :]:
            self.call(rng.randint(0, config.join_ms), self._start_node, node)
        sides = list(range(config.nodes))
        rng.shuffle(sides)
        for position, index in enumerate(sides):
            self.nodes[index].side = 0 if position < config.nodes // 2 else 1
        self.call(formed, self._snapshot_formation)
        for at in range(CHECK_EVERY_MS, formed, CHECK_EVERY_MS):
            self.call(at, self._check_connected)
        if config.partition_at is not None and config.heal_at is not None:
            self.call(config.partition_at, self._partition, True)
            self.call(config.heal_at, self._partition, False)
        anomaly_at = config.anomaly_at
        if anomaly_at is None:
            if config.partition_at is not None and config.heal_at is not None:
                anomaly_at = (config.partition_at + config.heal_at) // 2
            else:
                anomaly_at = formed
        for k in range(config.anomalies):
            self.call(anomaly_at + k * ANOMALY_SPACING_MS, self._publish, k)
        if config.revoke:
            revoke_at = config.revoke_at if config.revoke_at is not None else formed + 2_000
            candidates = list(range(config.bootstrap, config.nodes))
            chosen = sorted(rng.sample(candidates, config.revoke))
            self.to_revoke = frozenset(chosen)
            self.call(revoke_at, self._revoke, chosen)
        if config.churn:
            candidates = list(range(config.bootstrap, config.nodes))
            count = round(config.churn * len(candidates))
            self.churned = sorted(rng.sample(candidates, count))
            low, high = config.churn_down_ms
            for index in self.churned:
                down = formed + rng.randint(0, CHURN_WINDOW_MS)
                self.call(down, self._node_down, self.nodes[index])
                self.call(down + rng.randint(low, high), self._start_node, self.nodes[index])
        if config.with_bundles:
            self._schedule_bundles()
        if self.progress is not None:
            for at in range(0, self.last_event - START_MS + config.settle_ms, PROGRESS_EVERY_MS):
                self.push(START_MS + at, _CALL, self._report_progress, None)
        last = self.last_event
        if config.duration_ms is not None:
            self.end_at = START_MS + config.duration_ms
        else:
            self.end_at = last + config.settle_ms
        at = last - START_MS
        while START_MS + at <= self.end_at:
            self.push(START_MS + at, _CALL, self._check_done, None)
            at += CHECK_EVERY_MS

    # --- nodes ------------------------------------------------------------------------------

    def _start_node(self, node: SimNode) -> None:
        config = self.config
        cert = node.cert
        now = self.now
        trust = self.pki.trust_view(self.shared)
        trust.apply_crl(self.pki.crl_der)  # fetched before it listens, as the runtime does
        seen = SeenCache()
        seen.load(node.saved_seen, now)
        engine = GossipEngine(
            node.node_id,
            trust,
            fanout=config.fanout,
            seen=seen,
            rng=random.Random(node.rng.getrandbits(64)),  # noqa: S311
        )
        book = PeerBook(trust, node.node_id)
        settings = NodeSettings(
            node_id=node.node_id,
            advertise=node.address,
            bootstrap=tuple(a for a in self.bootstrap if a != node.address),
            max_links=config.max_links,
            dial_target=config.low_mark,
            digest_interval_ms=config.digest_interval_ms,
            crl_interval_ms=config.crl_interval_ms,
            random_order=config.admission != "legacy",
            rotate_interval_ms=0 if config.admission == "legacy" else 60_000,
        )
        identity = NodeIdentity(
            cert.key, cert.chain_der, cert.not_before_ms, cert.not_after_ms, cert.serial
        )
        agent = self._bundle_agent(node, trust) if config.with_bundles else None
        core: NodeCore[End] = NodeCore(
            settings,
            identity,
            trust,
            engine,
            book,
            rng=random.Random(node.rng.getrandbits(64)),  # noqa: S311
            bundles=agent,
        )
        core.load_records(node.saved_records, now)
        node.core = core
        node.up = True
        ran_before = node.incarnation > 0
        node.incarnation += 1
        node.timer_at = None
        if node.crl_at is None and trust.crl_number >= self.target_crl:
            node.crl_at = now
        self._act(node, core.start(now))
        if agent is not None and ran_before and core.record is not None:
            self._announce(node, agent, core.record.encode())
        self._after_step(node)

    def _bundle_agent(self, node: SimNode, trust: TrustView) -> BundleAgent[End]:
        """The node's bundle agent over its store (in memory, kept across restarts) and
        the sim's codec (no signatures: trustmesh.sim.bundles)."""
        if node.bundle_store is None:
            node.bundle_store = BundleStore(":memory:", durable=False)
        is_revoked = trust.is_revoked
        agent: BundleAgent[End] = BundleAgent(
            node.node_id,
            node.bundle_store,
            SimBundleCodec(is_revoked),
            is_revoked=lambda serial: is_revoked(int(serial, 16)),
            copies=self.config.bundle_copies,
            mesh_services=(CONTACT_SERVICE, SEEK_SERVICE),
        )
        node.bundle_stats.append(agent.stats)
        return agent

    def _announce(self, node: SimNode, agent: BundleAgent[End], record: bytes) -> None:
        """A node that ran before broadcasts its signed peer record to the contact
        service when it starts (trustmesh.node.bundles.NodeBundles.announce): nodes that
        hold bundles for it dial it."""
        bundle = sim_bundles.make(
            self.tally.next_id(node.node_id, self.now),
            node.node_id,
            format(node.cert.serial, "x"),
            f"dtn://~mesh/{CONTACT_SERVICE}",
            CONTACT_SERVICE,
            self.now,
            CONTACT_TTL_MS,
            record,
        )
        self.tally.contacts_announced += 1
        self._act(node, agent.submit([bundle], self.now))

    def _node_down(self, node: SimNode) -> None:
        """The node's process ends: its peers see their connections reset; its store
        keeps the seen ids, the peer records and the CRL."""
        core = node.core
        assert core is not None
        node.up = False
        node.incarnation += 1
        node.timer_at = None
        node.saved_seen.extend(core.engine.seen.take_pending())
        node.saved_records = [r.encode() for r in core.book.records()]
        for end in node.ends:
            end.closed = True
            end.eof_sent = True
            self._transmit(end, b"", True)
        node.ends.clear()

    def _arm_node(self, node: SimNode) -> None:
        assert node.core is not None
        deadline = node.core.next_deadline()
        if deadline is None:
            return
        if deadline < self.now:
            deadline = self.now
        if deadline != node.timer_at:
            node.timer_at = deadline
            self.push(deadline, _TIMER, node, node.incarnation)

    def _on_timer(self, node: SimNode, incarnation: int, at: int) -> None:
        if node.timer_at != at or node.incarnation != incarnation or not node.up:
            return
        node.timer_at = None
        assert node.core is not None
        self._act(node, node.core.handle_timer(at))
        self._after_step(node)

    def _after_step(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        if core.gossip_pending:
            self._act(node, core.drain_gossip(self.now))
        if self.dirty:
            self._flush()
        self._arm_node(node)

    # --- actions ----------------------------------------------------------------------------

    def _touch(self, end: End) -> None:
        if not end.dirty:
            end.dirty = True
            self.dirty.append(end)

    def _act(self, node: SimNode, actions: Sequence[Action[End]]) -> None:
        for action in actions:
            kind = type(action)
            if isinstance(action, LINK_ACTIONS):
                end = action.link
                if end.closed:
                    continue
                if isinstance(action, SendPeers) and self.config.admission == "legacy":
                    events = end.core.send_peers(action.peers, action.records)  # no hints
                else:
                    events = send_on(end.core, action)
                if isinstance(action, SendGossip) and action.raw[ID_AT] in self.anomaly_ids:
                    self.anomaly_frames += 1
                elif kind is SendBundle:
                    self.tally.transmissions += 1
                self._touch(end)
                if events:
                    self._link_events(end, events)
            elif kind is KeepAnomaly:
                assert isinstance(action, KeepAnomaly)
                index = self.anomaly_ids.get(action.message.message_id.encode())
                if index is not None and self.arrivals[index][node.index] < 0:
                    self.arrivals[index][node.index] = self.now
            elif kind is Dial:
                assert isinstance(action, Dial)
                self._dial(node, action.address)
            elif kind is SaveCrl:
                assert isinstance(action, SaveCrl)
                if action.number >= self.target_crl and node.crl_at is None:
                    node.crl_at = self.now
            elif kind is FetchCrl:
                self.crl_fetches += 1
                self.push(self.now + self.latency() + self.latency(), _CRL, node, node.incarnation)
            elif kind is Renew:
                self.renewals += 1
            elif kind is BundleDelivered:
                assert isinstance(action, BundleDelivered)
                if action.service == CONTACT_SERVICE:
                    self.tally.contacts_delivered += 1
                    assert node.core is not None
                    record = sim_bundles.payload_of(action.bundle.data)
                    self._act(node, node.core.contact_record(record, self.now))
                elif action.service.startswith(SEEK_SERVICE + "/"):
                    if action.service == f"{SEEK_SERVICE}/{node.node_id}":
                        assert node.core is not None
                        record = sim_bundles.payload_of(action.bundle.data)
                        self._act(node, node.core.seeker_record(record, self.now))
                else:
                    self.tally.delivered(action.bundle.bundle_id, node.index, self.now)
            # Notify, SavePeerRecords, ForgetPeers: nothing to do in the simulation.

    def _link_events(self, end: End, events: list[Event]) -> None:
        if not events:
            return
        node = end.node
        core = node.core
        assert core is not None
        closed: ConnectionClosed | None = None
        for event in events:
            if type(event) is LinkUp:
                end.up = True
            elif isinstance(event, ConnectionClosed):
                closed = event
            actions = core.link_event(end, event, self.now)
            if actions:
                self._act(node, actions)
        if closed is not None and not end.closed:
            end.closed = True
            node.ends.pop(end, None)
            self._touch(end)
            if end.initiator and not end.up and end.address is not None:
                self._act(node, core.dial_failed(end.address, closed.reason, self.now))

    # --- the network ------------------------------------------------------------------------

    def _cut(self, a: SimNode, b: SimNode) -> bool:
        return self.partitioned and a.side != b.side

    def _flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for end in dirty:
            end.dirty = False
            data = end.core.data_to_send()
            eof = end.closed and not end.eof_sent
            if eof:
                end.eof_sent = True
            if data or eof:
                self._transmit(end, data, eof)
            if not end.closed:
                timer = end.core.get_timer()
                if timer is not None:
                    at = int(timer * 1000) + 1
                    if at < end.timer_at:
                        end.timer_at = at
                        self.push(at, _LINK_TIMER, end)

    def _transmit(self, end: End, data: bytes, eof: bool) -> None:
        """Send the bytes one step wrote to a link (and EOF when it closed): one latency
        for them all, never before the bytes written earlier on the same direction."""
        peer = end.peer
        if peer.closed:
            return  # the other side is gone: a reset drops what was in flight
        if self.loss and data:
            data = self._lossy(data)
        if self.partitioned and end.node.side != peer.node.side:
            if not end.backlog:
                self.blocked.append(end)
            end.backlog.append((data, eof))  # TCP retransmits once the path is back
            return
        at = self.now + self.latency()
        if at < end.last_arrival:
            at = end.last_arrival
        end.last_arrival = at
        self.push(at, _DELIVER, peer, data, eof)

    def _lossy(self, data: bytes) -> bytes:
        """Drop each GOSSIP, IHAVE and IWANT frame with probability ``loss``."""
        keep: list[tuple[int, int]] = []
        dropped = False
        rnd = self.net_rng.random
        loss = self.loss
        pos = 0
        size_all = len(data)
        while pos < size_all:
            start = pos
            byte = data[pos]
            pos += 1
            size = byte & 0x7F
            shift = 7
            while byte & 0x80:
                byte = data[pos]
                pos += 1
                size |= (byte & 0x7F) << shift
                shift += 7
            stop = pos + size
            if data[pos] in LOSSY and rnd() < loss:
                dropped = True
                self.frames_lost += 1
            else:
                keep.append((start, stop))
            pos = stop
        if not dropped:
            return data
        return b"".join(data[a:b] for a, b in keep)

    def _on_deliver(self, end: End, data: bytes, eof: bool) -> None:
        if end.closed:
            return
        core = end.core
        now_s = self.now_s
        events = core.receive_data(data, now_s) if data else []
        if eof and core.state is not State.CLOSED:
            events += core.receive_data(b"", now_s)
        self._touch(end)
        self._link_events(end, events)
        self._after_step(end.node)

    def _on_link_timer(self, end: End, at: int) -> None:
        if end.closed or end.timer_at != at:
            return
        end.timer_at = INF
        events = end.core.handle_timer(self.now_s)
        self._touch(end)
        self._link_events(end, events)
        self._after_step(end.node)

    # --- dials (TCP and TLS) ----------------------------------------------------------------

    def _dial(self, node: SimNode, address: str) -> None:
        target = self.by_address.get(address)
        if target is None or not target.up or self._cut(node, target):
            at = self.now + self.config.dial_timeout_ms
            self.push(at, _DIAL_FAIL, node, address, (node.incarnation, "connect timed out"))
            return
        rtt = self.latency() + self.latency()
        self.ports += 1
        state = (node.incarnation, target.incarnation, self.ports)
        self.push(self.now + 2 * rtt, _DIAL_UP, node, target, (address, state))

    def _on_dial_fail(self, node: SimNode, address: str, why: tuple[int, str]) -> None:
        incarnation, reason = why
        if node.incarnation != incarnation or not node.up:
            return
        assert node.core is not None
        self._act(node, node.core.dial_failed(address, reason, self.now))
        self._after_step(node)

    def _on_dial_up(self, node: SimNode, target: SimNode, info: tuple[str, Any]) -> None:
        """TCP and the TLS 1.3 handshake took two round trips: the channel is up, or a
        side refused the other's certificate (certificate_revoked)."""
        address, (incarnation, target_incarnation, port) = info
        if node.incarnation != incarnation or not node.up:
            return
        core = node.core
        assert core is not None
        reason = None
        if not target.up or target.incarnation != target_incarnation:
            reason = "connection reset"
        elif self._cut(node, target):
            reason = "connect timed out"
        else:
            assert target.core is not None
            if core.trust.is_revoked(target.cert.serial):
                reason = "TLS failed: the peer's certificate is revoked"
            elif target.core.trust.is_revoked(node.cert.serial):
                reason = "TLS failed: alert certificate_revoked"
        if reason is not None:
            self._act(node, core.dial_failed(address, reason, self.now))
            self._after_step(node)
            return
        target_core = target.core
        assert target_core is not None
        expires = min(node.cert.not_after_ms, target.cert.not_after_ms) / 1000
        now = self.now

        def authorizer(owner: NodeCore[End]) -> Callable[[Any], str]:
            return lambda chain: owner.authorize_chain(chain, now)

        mine = MeshLink(
            node.link_config,
            initiator=True,
            authorize=authorizer(core),
            crl_number=lambda: core.trust.crl_number,
        )
        theirs = MeshLink(
            target.link_config,
            initiator=False,
            authorize=authorizer(target_core),
            crl_number=lambda: target_core.trust.crl_number,
        )
        a = End(
            node,
            mine,
            initiator=True,
            address=address,
            serial=target.cert.serial,
            port=port,
            established=_tls(target.cert, expires),
        )
        b = End(
            target,
            theirs,
            initiator=False,
            address=None,
            serial=node.cert.serial,
            port=port,
            established=_tls(node.cert, expires),
        )
        a.peer, b.peer = b, a
        a.last_arrival = b.last_arrival = now
        mine.bind(a)
        theirs.bind(b)
        node.ends[a] = None
        target.ends[b] = None
        core.link_opened(a, initiator=True, address=address)
        target_core.link_opened(b, initiator=False, address=None)
        self._touch(a)
        self._touch(b)
        self._link_events(a, mine.start(self.now_s))
        self._link_events(b, theirs.start(self.now_s))
        self._after_step(node)
        self._after_step(target)

    def _on_crl(self, node: SimNode, incarnation: int) -> None:
        """The CA's answer to a CRL poll: the CRL, or 304 when the node holds it."""
        if node.incarnation != incarnation or not node.up:
            return
        core = node.core
        assert core is not None
        der = self.pki.crl_der if core.trust.crl_number < self.pki.crl_number else None
        cert = node.cert

        def sign(crl: bytes) -> GossipMessage:
            return sign_message(
                cert.key, cert.node_id, crl_payload(crl), now_ms=self.now, chain=cert.chain_der
            )

        self._act(node, core.crl_fetched(der, self.now, sign=sign))
        self._after_step(node)

    # --- the scenario -----------------------------------------------------------------------

    def _partition(self, on: bool) -> None:
        self.partitioned = on
        if on:
            return
        blocked, self.blocked = self.blocked, []
        for end in blocked:
            held, end.backlog = end.backlog, []
            for data, eof in held:
                self._transmit(end, data, eof)

    def _publish(self, k: int) -> None:
        rng = self.scenario_rng
        candidates = [
            n
            for n in self.nodes
            if n.up and n.index not in self.revoked and n.core is not None and n.core.links
        ]
        if not candidates:
            candidates = [n for n in self.nodes if n.up and n.index not in self.revoked]
        node = candidates[rng.randrange(len(candidates))]
        cert = node.cert
        payload = anomaly_payload(f"{rng.getrandbits(128):032x}", "sim-anomaly", 0.5, {"seq": k})
        message = sign_message(
            cert.key, cert.node_id, payload, now_ms=self.now, chain=cert.chain_der
        )
        index = len(self.arrivals)
        self.anomaly_ids[message.message_id.encode()] = index
        self.arrivals.append([-1] * len(self.nodes))
        during = False
        config = self.config
        if config.partition_at is not None and config.heal_at is not None:
            during = START_MS + config.partition_at <= self.now < START_MS + config.heal_at
        self.anomaly_meta.append((self.now, node.index, during))
        assert node.core is not None
        _, actions = node.core.publish(message, message.encode(), self.now)
        self._act(node, actions)
        self._after_step(node)

    def _revoke(self, chosen: list[int]) -> None:
        self.clock.set(datetime_of(self.now))
        serials = [self.nodes[i].cert.serial for i in chosen]
        self.pki.revoke(serials)
        self.target_crl = self.pki.crl_number
        self.revoked = dict(zip(chosen, serials, strict=True))
        self.revoked_at = self.now

    def _schedule_bundles(self) -> None:
        """The bundles' send times; their sources and destinations are drawn when they
        are sent (from the nodes up then)."""
        rng = self.bundle_rng
        low, high = self.config.bundle_window
        for _ in range(self.config.bundles):
            self.call(rng.randint(low, high), self._send_bundle, False)
        for _ in range(self.config.broadcasts):
            self.call(rng.randint(low, high), self._send_bundle, True)

    def _send_bundle(self, broadcast: bool) -> None:
        """A bundle from a random up node (never one the CA will revoke): to a random
        other node (up or down), or to every node (dtn://~mesh/inbox)."""
        rng = self.bundle_rng
        config = self.config
        sources = [n for n in self.nodes if n.up and n.index not in self.to_revoke]
        if not sources:
            return
        node = sources[rng.randrange(len(sources))]
        core = node.core
        assert core is not None
        assert core.bundles is not None
        bundle_id = self.tally.next_id(node.node_id, self.now)
        expires = self.now + config.bundle_ttl_ms
        if broadcast:
            destination, target = "dtn://~mesh/inbox", None
        else:
            down: list[SimNode] = []
            if config.bundle_to_down and rng.random() < config.bundle_to_down:
                down = [n for n in self.nodes if not n.up and n.index not in self.to_revoke]
            if down:
                target = down[rng.randrange(len(down))]
            else:
                while True:
                    target = self.nodes[rng.randrange(len(self.nodes))]
                    if target is not node and target.index not in self.to_revoke:
                        break
            destination = f"dtn://{target.node_id}/inbox"
        bundle = sim_bundles.make(
            bundle_id,
            node.node_id,
            format(node.cert.serial, "x"),
            destination,
            "inbox",
            self.now,
            config.bundle_ttl_ms,
            self.payload,
        )
        entry: Unicast | Broadcast
        if target is None:
            entry = Broadcast(bundle_id, node.index, self.now, expires)
            self.tally.broadcast.append(entry)
        else:
            entry = Unicast(bundle_id, node.index, target.index, self.now, expires, not target.up)
            self.tally.unicast.append(entry)
        self.tally.by_id[bundle_id] = entry
        self._act(node, core.bundles.submit([bundle], self.now))
        if target is not None:
            self._seek(node, target)
        self._after_step(node)

    def _seek(self, node: SimNode, target: SimNode) -> None:
        """As the running node (trustmesh.node.bundles.NodeBundles._seek): a bundle for
        a node we are not linked to broadcasts our record to its seek service, at most
        once per destination every SEEK_INTERVAL_MS."""
        core = node.core
        assert core is not None
        assert core.bundles is not None
        if target.node_id in core.links or core.record is None:
            return
        last = node.sought.get(target.node_id)
        if last is not None and self.now - last < SEEK_INTERVAL_MS:
            return
        node.sought[target.node_id] = self.now
        service = f"{SEEK_SERVICE}/{target.node_id}"
        seek = sim_bundles.make(
            self.tally.next_id(node.node_id, self.now),
            node.node_id,
            format(node.cert.serial, "x"),
            f"dtn://~mesh/{service}",
            service,
            self.now,
            SEEK_TTL_MS,
            core.record.encode(),
        )
        self.tally.seeks += 1
        self._act(node, core.bundles.submit([seek], self.now))

    def _snapshot_formation(self, _: Any) -> None:
        self.formation = self._mesh_shape()
        self._check_connected(None)

    def _check_connected(self, _: Any) -> None:
        if self.connected_at is not None:
            return
        if self.now - START_MS < self.config.join_ms:
            return
        if self._components()[0] == 1:
            self.connected_at = self.now

    def _report_progress(self, _: Any) -> None:
        assert self.progress is not None
        up = sum(1 for n in self.nodes if n.up)
        links = sum(len(n.core.links) for n in self.nodes if n.up and n.core is not None) // 2
        wall = time.perf_counter() - self.wall_start
        line = (
            f"{(self.now - START_MS) / 1000:7.1f} s virtual, {wall:7.1f} s wall: "
            f"{up} nodes up, {links} links, {len(self.heap)} events queued"
        )
        if self.config.with_bundles:
            unicast = self.tally.unicast
            done = sum(1 for u in unicast if u.delivered_at is not None)
            line += f", {done} of {len(unicast)} bundles delivered"
        self.progress(line)

    def _check_done(self, _: Any) -> None:
        if self.now < self.last_event:
            return
        eligible = [n.index for n in self.nodes if n.index not in self.revoked]
        for arrivals in self.arrivals:
            if any(arrivals[i] < 0 for i in eligible):
                return
        if self.revoked and any(self.nodes[i].crl_at is None for i in eligible):
            return
        if self.config.with_bundles:
            live = [i for i in eligible if self.nodes[i].up]
            if self.tally.pending(self.now, live):
                return
        self.stopped = True

    # --- measures ---------------------------------------------------------------------------

    def _components(self) -> tuple[int, list[int]]:
        """How many connected components the up, unrevoked nodes form, and the nodes
        outside the largest one."""
        members = [n for n in self.nodes if n.up and n.index not in self.revoked]
        allowed = {n.index for n in members}
        seen: dict[int, int] = {}
        sizes: list[int] = []
        for node in members:
            if node.index in seen:
                continue
            label = len(sizes)
            seen[node.index] = label
            stack = [node]
            size = 0
            while stack:
                current = stack.pop()
                size += 1
                assert current.core is not None
                for end in current.core.links.values():
                    other = end.peer.node
                    if other.index in allowed and other.index not in seen:
                        seen[other.index] = label
                        stack.append(other)
            sizes.append(size)
        if not sizes:
            return 0, []
        largest = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
        outside = [n.index for n in members if seen[n.index] != largest]
        return len(sizes), outside

    def _mesh_shape(self) -> dict[str, Any]:
        degrees = [len(n.core.links) for n in self.nodes if n.up and n.core is not None]
        histogram: dict[str, int] = {}
        for degree in sorted(degrees):
            histogram[str(degree)] = histogram.get(str(degree), 0) + 1
        components, outside = self._components()
        stats = [n.core.stats for n in self.nodes if n.core is not None]
        return {
            "at_ms": self.now - START_MS,
            "links": sum(degrees) // 2,
            "dials": sum(s.dials for s in stats),
            "dials_failed": sum(s.dials_failed for s in stats),
            "refused_link_cap": sum(s.refused_at_cap for s in stats),
            "refusals_received": sum(s.refusals_received for s in stats),
            "degree": {
                "min": min(degrees) if degrees else 0,
                "p50": percentile(degrees, 0.5),
                "max": max(degrees) if degrees else 0,
                "mean": round(sum(degrees) / len(degrees), 3) if degrees else 0.0,
                "histogram": histogram,
            },
            "connected": components == 1,
            "components": components,
            "unconnected": [self.nodes[i].node_id for i in outside[:100]],
            "unconnected_count": len(outside),
        }

    def _report(self, wall_s: float) -> SimResult:
        config = self.config
        eligible = [n.index for n in self.nodes if n.index not in self.revoked]
        delays: list[int] = []
        per_anomaly: list[list[int]] = []
        covered = []
        for (published, origin, _), arrivals in zip(self.anomaly_meta, self.arrivals, strict=True):
            got = [arrivals[i] - published for i in eligible if arrivals[i] >= 0 and i != origin]
            per_anomaly.append(got)
            delays += got
            covered.append(sum(1 for i in eligible if arrivals[i] >= 0) / len(eligible))
        count = len(self.arrivals)
        anomaly = {
            "published": count,
            "coverage": round(min(covered), 4) if covered else None,
            "coverage_mean": round(sum(covered) / count, 4) if covered else None,
            "p50_ms": percentile(delays, 0.5),
            "p99_ms": percentile(delays, 0.99),
            "max_ms": max(delays) if delays else None,
            "gossip_frames": self.anomaly_frames,
            "msgs_per_node": round(self.anomaly_frames / (len(self.nodes) * count), 3)
            if count
            else None,
        }
        revocation: dict[str, Any] = {"revoked": len(self.revoked)}
        crl_delays: list[int] = []
        if self.revoked and self.revoked_at is not None:
            holders = [self.nodes[i].crl_at for i in eligible]
            crl_delays = [max(0, t - self.revoked_at) for t in holders if t is not None]
            revocation.update(
                {
                    "at_ms": self.revoked_at - START_MS,
                    "coverage": round(len(crl_delays) / len(eligible), 4),
                    "p50_ms": percentile(crl_delays, 0.5),
                    "p99_ms": percentile(crl_delays, 0.99),
                    "max_ms": max(crl_delays) if crl_delays else None,
                    "node_ids": sorted(self.nodes[i].node_id for i in self.revoked),
                }
            )
        else:
            revocation.update({"coverage": None, "p99_ms": None})
        partition: dict[str, Any] | None = None
        if config.partition_at is not None and config.heal_at is not None:
            heal = START_MS + config.heal_at
            during = [k for k, meta in enumerate(self.anomaly_meta) if meta[2]]
            heal_ms: int | None = 0 if during else None
            for k in during:
                arrivals = self.arrivals[k]
                if any(arrivals[i] < 0 for i in eligible):
                    heal_ms = None
                    break
                latest = max(arrivals[i] for i in eligible)
                assert heal_ms is not None
                heal_ms = max(heal_ms, latest - heal)
            partition = {
                "at_ms": config.partition_at,
                "heal_at_ms": config.heal_at,
                "anomalies_during": len(during),
                "heal_ms": heal_ms,
            }
        final = self._mesh_shape()
        report: dict[str, Any] = {
            "nodes": config.nodes,
            "seed": config.seed,
            "config": {
                "loss": config.loss,
                "latency_ms": list(config.latency_ms),
                "admission": config.admission,
                "max_links": config.max_links,
                "dial_target": config.low_mark,
                "bootstrap": config.bootstrap,
                "churn": config.churn,
                "crypto": config.crypto,
                "fanout": config.fanout,
            },
            "formation": {**self.formation, "connected_at_ms": self._rel(self.connected_at)},
            "final": {
                key: final[key]
                for key in ("at_ms", "links", "connected", "components", "unconnected_count")
            },
            "anomaly": anomaly,
            "revocation": revocation,
            "partition": partition,
            "churn": {"nodes": len(self.churned), "down_ms": list(config.churn_down_ms)}
            if config.churn
            else None,
            "bundles": self._bundle_report(eligible) if config.with_bundles else None,
            "network": {
                "events": self.events,
                "frames_lost": self.frames_lost,
                "crl_fetches": self.crl_fetches,
            },
            "virtual_ms": self.now - START_MS,
            "setup_s": round(self.setup_s, 3),
            "wall_s": round(wall_s + self.setup_s, 3),
        }
        curve = coverage_curve(per_anomaly, len(eligible))
        return SimResult(report, per_anomaly, crl_delays, curve)

    def _bundle_report(self, eligible: list[int]) -> dict[str, Any]:
        """The ``bundles`` section (docs/sim.md)."""
        config = self.config
        tally = self.tally
        now = self.now
        unicast = tally.unicast
        done = [u for u in unicast if u.delivered_at is not None]
        latency = [u.delivered_at - u.sent_at for u in done if u.delivered_at is not None]
        to_down = [u for u in unicast if u.destination_down]
        to_down_done = [u for u in to_down if u.delivered_at is not None]
        live = [i for i in eligible if self.nodes[i].up]
        coverage: list[float] = []
        spread: list[int] = []
        for b in tally.broadcast:
            others = [i for i in live if i != b.source]
            coverage.append(sum(1 for i in others if i in b.got) / len(others) if others else 1.0)
            spread += [at - b.sent_at for at in b.got.values()]
        rows = copies = rows_delivered = broadcast_rows = other_rows = 0
        refused: dict[str, int] = {}
        totals = {"received": 0, "forwarded": 0, "duplicates": 0, "expired": 0}
        for node in self.nodes:
            if node.bundle_store is not None:
                for row in node.bundle_store.forwarding():
                    entry = tally.by_id.get(row.bundle_id)
                    if isinstance(entry, Unicast):
                        rows += 1
                        copies += row.copies
                        rows_delivered += entry.delivered_at is not None
                    elif isinstance(entry, Broadcast):
                        broadcast_rows += 1
                    else:
                        other_rows += 1
            for stats in node.bundle_stats:
                totals["received"] += stats.received
                totals["forwarded"] += stats.forwarded
                totals["duplicates"] += stats.duplicates
                totals["expired"] += stats.expired
                for code, count in sorted((stats.refused or {}).items()):
                    refused[code] = refused.get(code, 0) + count
        sent = len(unicast)
        return {
            "ttl_ms": config.bundle_ttl_ms,
            "copies": config.bundle_copies,
            "size": config.bundle_size,
            "window_ms": list(config.bundle_window),
            "sent": sent,
            "delivered": len(done),
            "delivery_ratio": round(len(done) / sent, 4) if sent else None,
            "sent_to_down": len(to_down),
            "delivered_to_down": len(to_down_done),
            "p50_ms": percentile(latency, 0.5),
            "p90_ms": percentile(latency, 0.9),
            "max_ms": max(latency) if latency else None,
            "to_down_p50_ms": percentile(
                [u.delivered_at - u.sent_at for u in to_down_done if u.delivered_at is not None],
                0.5,
            ),
            "expired": sum(1 for u in unicast if u.delivered_at is None and u.expires_at <= now),
            "undelivered": [u.bundle_id for u in unicast if u.delivered_at is None][:20],
            "stored_at_end": rows,
            "copies_at_end": copies,
            "stored_at_end_delivered": rows_delivered,
            "refused": sum(refused.values()),
            "refused_by": refused,
            "rows_expired": totals["expired"],
            "received": totals["received"],
            "forwarded": totals["forwarded"],
            "duplicates": totals["duplicates"],
            "transmissions": tally.transmissions,
            "redelivered": tally.redelivered,
            "misdelivered": tally.misdelivered,
            "broadcast": {
                "sent": len(tally.broadcast),
                "coverage": round(min(coverage), 4) if coverage else None,
                "coverage_mean": round(sum(coverage) / len(coverage), 4) if coverage else None,
                "p50_ms": percentile(spread, 0.5),
                "p90_ms": percentile(spread, 0.9),
                "max_ms": max(spread) if spread else None,
                "stored_at_end": broadcast_rows,
            },
            "seeks": tally.seeks,
            "contacts": {
                "announced": tally.contacts_announced,
                "delivered": tally.contacts_delivered,
                "stored_at_end": other_rows,
            },
        }

    @staticmethod
    def _rel(at: int | None) -> int | None:
        return None if at is None else at - START_MS


def coverage_curve(per_anomaly: list[list[int]], eligible: int) -> list[tuple[int, float]]:
    """(ms after publishing, mean fraction of nodes holding the anomaly), by step."""
    if not per_anomaly or not eligible:
        return []
    points: list[tuple[int, float]] = []
    merged = sorted(d for got in per_anomaly for d in got)
    total = eligible * len(per_anomaly)
    origins = len(per_anomaly)  # every origin holds its own from 0 ms
    for count, delay in enumerate(merged, start=1):
        points.append((delay, (origins + count) / total))
    return points


def datetime_of(at_ms: int) -> datetime:
    return datetime.fromtimestamp(at_ms / 1000, UTC)


def _tls(peer: NodeCert, expires_at: float) -> TlsEstablished:
    """What a TLS 1.3 handshake with ``peer``'s certificate tells its MeshLink."""
    return TlsEstablished(
        peer_chain=peer.chain, alpn=ALPN, group=None, resumed=False, expires_at=expires_at
    )


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """A run allocates millions of small objects that live long (frames in flight,
    records, messages): the collector's default thresholds walk them over and over. The
    setup's objects are frozen out of its reach and it runs less often (about 13 % of a
    3,000-node run); both are restored afterwards."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def simulate(config: SimConfig, *, progress: Callable[[str], None] | None = None) -> SimResult:
    """Run one simulation (the CA lives in a temporary directory for the run);
    ``progress`` gets a line every 5 s of virtual time."""
    with tempfile.TemporaryDirectory(prefix="trustmesh-sim-") as directory:
        return Simulation(config, Path(directory), progress=progress).run()
