"""A mesh node's metrics (docs/metrics.md), all named ``trustmesh_node_*``.

Almost everything is read at scrape time from counters the node keeps anyway: the
gossip engine's, the core's (formation and handshakes), the bundle agent's and store's,
the trust view, the listeners'. Nothing is counted twice and the hot paths pay nothing.
The one measurement of our own is the time gossip takes to check
(:meth:`NodeMetrics.gossip_checked`, called by the driver around the core).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trustmesh.bundle.store import ROLES, BundleStore
from trustmesh.clock import Clock
from trustmesh.io.listener import Listener
from trustmesh.mesh.engine import GossipEngine, SeenCache
from trustmesh.mesh.node import NodeCore
from trustmesh.mesh.trust import TrustView
from trustmesh.metrics.exposition import ListenerCollector, seconds_between

PREFIX = "trustmesh_node"
# A P-256 signature checks in about 0.1 ms; a batch is one read's frames.
VERIFY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
LINK_STATES = ("up", "handshake", "closing")
PEER_STATES = ("connected", "disconnected", "revoked")
RENEWAL_OUTCOMES = ("renewed", "failed")


class _Certified(Protocol):
    @property
    def certificate(self) -> x509.Certificate: ...


class MeteredNode(Protocol):
    """What the metrics read of a node (``trustmesh.node.runtime.MeshNode``)."""

    node_id: str
    clock: Clock
    engine: GossipEngine
    seen: SeenCache
    trust: TrustView
    core: NodeCore[Any]
    bundle_store: BundleStore

    @property
    def identity(self) -> _Certified: ...

    @property
    def renewals(self) -> Mapping[str, int]:
        """Scheduled certificate renewals by outcome (``renewed``, ``failed``)."""

    def link_states(self) -> Mapping[str, int]:
        """Open links by state (``up``, ``handshake``, ``closing``)."""

    def running_listeners(self) -> Mapping[str, Listener]:
        """The node's running listeners by name (``links``, ``api``, ``local``, ``metrics``)."""


class NodeMetrics:
    """The registry of one node's metrics: serve :attr:`registry` at ``/metrics``."""

    def __init__(self, node: MeteredNode) -> None:
        self.registry = CollectorRegistry()
        self.gossip_verify = Histogram(
            f"{PREFIX}_gossip_verify_seconds",
            "Seconds taken to check one batch of received gossip: decode, screen, verify"
            " signatures and chains, record (a batch is the frames of one read, or one"
            " message from the API or a bundle).",
            buckets=VERIFY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_NodeCollector(node))
        self.registry.register(ListenerCollector(PREFIX, node.running_listeners))

    def gossip_checked(self, seconds: float) -> None:
        self.gossip_verify.observe(max(0.0, seconds))


class _NodeCollector(Collector):
    def __init__(self, node: MeteredNode) -> None:
        self._node = node
        self._crl: tuple[int, datetime] | None = None  # the CRL number held, its thisUpdate

    def collect(self) -> Iterable[Metric]:
        node = self._node
        yield _gauge("info", "This node (always 1).", 1, labels={"node_id": node.node_id})
        yield from self._links()
        yield from self._gossip()
        yield from self._certificates()
        yield from self._bundles()

    # --- links and peers --------------------------------------------------------------

    def _links(self) -> Iterable[Metric]:
        node, core = self._node, self._node.core
        links = GaugeMetricFamily(
            f"{PREFIX}_links",
            "Open mesh links: up (held), handshake (TLS or HELLO under way), closing (up"
            " once, not held: refused at a cap, a duplicate, replaced).",
            labels=["state"],
        )
        states = node.link_states()
        for state in LINK_STATES:
            links.add_metric([state], states.get(state, 0))
        yield links
        peers = GaugeMetricFamily(
            f"{PREFIX}_peers",
            "Rows of the peer table by state (revoked: cut off by the CRL).",
            labels=["state"],
        )
        counts = dict.fromkeys(PEER_STATES, 0)
        for peer in core.peers.values():
            state = "revoked" if peer.node_id in core.revoked_nodes else peer.status
            counts[state] = counts.get(state, 0) + 1
        for state, count in counts.items():
            peers.add_metric([state], count)
        yield peers
        yield _counter(
            "link_handshakes",
            "Link handshakes (TLS, then both HELLOs) completed.",
            core.handshakes.completed,
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_link_handshake_failures",
            "Links that ended before both HELLOs, by reason: a CLOSE code (refused, revoked,"
            " hold-timer-expired ...), tls, tls-alert, tls-revoked, tls-expired, timeout,"
            " peer-closed, other.",
            labels=["reason"],
        )
        for reason, count in sorted(core.handshakes.failed.items()):
            failures.add_metric([reason], count)
        yield failures
        formation = core.stats
        yield _counter("dials", "Dials started.", formation.dials)
        yield _counter(
            "dial_failures", "Dials that ended before both HELLOs.", formation.dials_failed
        )
        yield _counter("links_made", "Links taken into the link table.", formation.links_made)
        yield _counter("links_refused", "Links refused at our link cap.", formation.refused_at_cap)
        yield _counter("links_evicted", "Inbound links closed to make room.", formation.evicted)
        yield _counter("links_rotated", "Outbound links given up for a new one.", formation.rotated)
        yield _counter(
            "link_refusals_received",
            "Our links a peer refused (at its cap, a duplicate ...).",
            formation.refusals_received,
        )

    # --- gossip -------------------------------------------------------------------------

    def _gossip(self) -> Iterable[Metric]:
        node = self._node
        stats = node.engine.stats
        yield _counter("gossip_accepted", "Gossip messages accepted (new).", stats.accepted)
        yield _counter(
            "gossip_duplicates", "Gossip messages seen before, dropped.", stats.duplicates
        )
        refused = CounterMetricFamily(
            f"{PREFIX}_gossip_refused",
            "Gossip messages refused, by reason (bad-signature, expired, rate-limited ...).",
            labels=["reason"],
        )
        for reason, count in sorted(stats.rejected.items()):
            refused.add_metric([reason], count)
        yield refused
        yield _counter("gossip_forwarded", "Gossip messages pushed to peers.", stats.forwarded)
        yield _gauge("gossip_seen_ids", "Message ids in the seen-cache.", len(node.seen))

    # --- CRL and certificate ----------------------------------------------------------

    def _certificates(self) -> Iterable[Metric]:
        node = self._node
        now = node.clock.now()
        trust = node.trust
        yield _gauge("crl_revoked_serials", "Serials the CRL held revokes.", len(trust.revoked))
        this_update = self._this_update(trust.crl_number, trust.crl_der)
        if this_update is not None:  # no sample until the node holds a CRL
            yield _gauge("crl_number", "The CRL number of the CRL held.", trust.crl_number)
            yield _gauge(
                "crl_age_seconds",
                "Seconds since the thisUpdate of the CRL held.",
                seconds_between(this_update, now),
            )
        if trust.crl_next_update is not None:
            yield _gauge(
                "crl_next_update_seconds",
                "Seconds until the nextUpdate of the CRL held (negative: past it).",
                seconds_between(now, trust.crl_next_update),
            )
        certificate = node.identity.certificate
        yield _gauge(
            "certificate_expiry_seconds",
            "Seconds until this node's certificate expires (notAfter).",
            seconds_between(now, certificate.not_valid_after_utc),
        )
        yield _gauge(
            "certificate_renewal_seconds",
            "Seconds until this node renews its certificate (negative: overdue, retrying).",
            (node.core.renewal.due_ms - node.clock.time_ms()) / 1000,
        )
        renewals = CounterMetricFamily(
            f"{PREFIX}_certificate_renewals",
            "Scheduled certificate renewals (rotations through the CA) by outcome: renewed,"
            " or failed (retried with backoff; the CA's log says why).",
            labels=["outcome"],
        )
        for outcome in RENEWAL_OUTCOMES:
            renewals.add_metric([outcome], node.renewals.get(outcome, 0))
        yield renewals

    def _this_update(self, number: int, der: bytes | None) -> datetime | None:
        """The thisUpdate of the CRL held (read once per CRL)."""
        if der is None:
            return None
        if self._crl is None or self._crl[0] != number:
            try:
                self._crl = (number, x509.load_der_x509_crl(der).last_update_utc)
            except ValueError:  # the node checked it before taking it: never here
                return None
        return self._crl[1]

    # --- bundles ------------------------------------------------------------------------

    def _bundles(self) -> Iterable[Metric]:
        node = self._node
        stored = GaugeMetricFamily(
            f"{PREFIX}_bundles_stored",
            "Bundles in the store, by role (inbox: for us; forwarding: carried for others;"
            " fragment: waiting for the rest of their payload).",
            labels=["role"],
        )
        for role in ROLES:
            stored.add_metric([role], node.bundle_store.count(role))
        yield stored
        yield _gauge(
            "bundle_store_bytes", "Bytes of bundles in the store.", node.bundle_store.bytes_used
        )
        agent = node.core.bundles
        if agent is None:
            return
        stats = agent.stats
        yield _counter("bundles_submitted", "Bundles made here.", stats.submitted)
        yield _counter("bundles_received", "Bundles received from peers.", stats.received)
        yield _counter("bundles_delivered", "Bundles delivered to this node.", stats.delivered)
        yield _counter(
            "bundles_duplicates", "Bundles received that were held already.", stats.duplicates
        )
        yield _counter(
            "bundles_forwarded",
            "Bundles whose custody the next hop acknowledged.",
            stats.forwarded,
        )
        yield _counter("bundles_expired", "Bundles dropped at their lifetime's end.", stats.expired)
        refused = CounterMetricFamily(
            f"{PREFIX}_bundles_refused",
            "Bundles refused or dropped, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted((stats.refused or {}).items()):
            refused.add_metric([reason], count)
        yield refused


def _gauge(
    name: str, documentation: str, value: float, *, labels: Mapping[str, str] | None = None
) -> GaugeMetricFamily:
    if labels is None:
        return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
    family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
