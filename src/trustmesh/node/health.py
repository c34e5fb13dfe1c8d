"""``GET /v1/mesh/health`` and ``trustmesh node health``: what a running node reports."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any, Protocol

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


def renewal_due(due_ms: int) -> datetime:
    return datetime.fromtimestamp(due_ms / 1000, UTC)


def health_of(node: NodeState) -> dict[str, Any]:
    cert = node.identity.certificate
    stats = node.engine.stats
    return {
        "node_id": node.node_id,
        "status": "ok",
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
    return counts
