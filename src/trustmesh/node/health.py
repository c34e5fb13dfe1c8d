"""``GET /v1/mesh/health`` and ``trustmesh node health``: what a running node reports.

Its ``status`` sums it up, worst first, with the ``reasons`` (codes) behind it:

- ``failing``: the node cannot take part: its certificate has expired
  (``certificate_expired``) or the CA's CRL revokes it (``revoked``).
- ``degraded``: it runs, but not as it should: no link is up (``no_links``), it holds no
  CRL (``no_crl``), or the CRL it holds is past its nextUpdate (``crl_stale``: the CA has
  been unreachable for longer than the CRL was meant to last).
- ``ok``: none of those.

``trustmesh node health`` exits 0 for ``ok``, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any, Protocol

from trustmesh.clock import Clock
from trustmesh.io.listener import Listener
from trustmesh.mesh.engine import GossipEngine, SeenCache
from trustmesh.mesh.node import NodeCore
from trustmesh.mesh.trust import TrustView
from trustmesh.node.identity import Identity


class _Listening(Protocol):
    @property
    def listener(self) -> Listener: ...


class NodeState(Protocol):
    """What a node's health reads (``trustmesh.node.runtime.MeshNode``)."""

    node_id: str
    clock: Clock
    identity: Identity
    engine: GossipEngine
    trust: TrustView
    seen: SeenCache
    core: NodeCore[Any]

    @property
    def listen_address(self) -> str: ...

    @property
    def link_server(self) -> _Listening | None: ...

    @property
    def api_site(self) -> _Listening | None: ...

    @property
    def local_api(self) -> _Listening | None: ...


def renewal_due(due_ms: int) -> datetime:
    return datetime.fromtimestamp(due_ms / 1000, UTC)


OK, DEGRADED, FAILING = "ok", "degraded", "failing"
STATUSES = (OK, DEGRADED, FAILING)  # best first
FAILING_REASONS = frozenset({"certificate_expired", "revoked"})
REASONS = {
    "certificate_expired": "the node certificate has expired: enroll the node again",
    "revoked": "the CA's CRL revokes this node's certificate: peers refuse it",
    "no_links": "no link is up",
    "no_crl": "no CRL yet: the CA has not been reached",
    "crl_stale": "the CRL is past its nextUpdate: the CA has not been reached since",
}


def status_of(reasons: list[str]) -> str:
    """``failing``, ``degraded`` or ``ok`` for these reasons (see the module's text)."""
    if any(reason in FAILING_REASONS for reason in reasons):
        return FAILING
    return DEGRADED if reasons else OK


def reasons_of(node: NodeState) -> list[str]:
    """What is wrong with the node now, failing reasons first (empty: nothing)."""
    now = node.clock.now()
    reasons = []
    if node.identity.certificate.not_valid_after_utc <= now:
        reasons.append("certificate_expired")
    if node.core.self_revoked:
        reasons.append("revoked")
    if not node.core.links:
        reasons.append("no_links")
    if node.trust.crl_der is None:
        reasons.append("no_crl")
    elif node.trust.crl_next_update is not None and node.trust.crl_next_update < now:
        reasons.append("crl_stale")
    return reasons


def health_of(node: NodeState) -> dict[str, Any]:
    cert = node.identity.certificate
    stats = node.engine.stats
    reasons = reasons_of(node)
    return {
        "node_id": node.node_id,
        "status": status_of(reasons),
        "reasons": reasons,
        "links": len(node.core.links),
        "peers": len(node.core.peers),
        "listen": node.listen_address,
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "renewal_due": renewal_due(node.core.renewal.due_ms).isoformat(),
        "crl_number": node.trust.crl_number if node.trust.crl_der else None,
        "revoked_serials": len(node.trust.revoked),
        "seen": len(node.seen),
        "gossip": {
            "accepted": stats.accepted,
            "duplicates": stats.duplicates,
            "forwarded": stats.forwarded,
            "rejected": dict(stats.rejected),
        },
        "formation": dataclasses.asdict(node.core.stats),
        "limits": limit_counts(node),
    }


def limit_counts(node: NodeState) -> dict[str, dict[str, int]]:
    """How often each resource limit was hit, per listener (docs/limits.md)."""
    counts: dict[str, dict[str, int]] = {}
    if node.link_server is not None:
        counts["links"] = node.link_server.listener.stats.snapshot()
    if node.api_site is not None:
        counts["api"] = node.api_site.listener.stats.snapshot()
    if node.local_api is not None:
        counts["local"] = node.local_api.listener.stats.snapshot()
    return counts
