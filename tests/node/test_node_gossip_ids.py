"""A message id belongs to its origin, on a whole mesh (issue 16 item 9): a node that
races another node's message with its own under the same id does not stop it."""

from __future__ import annotations

from pathlib import Path

from trustmesh.mesh.gossip import anomaly_payload, sign_message
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode, now_ms

WAIT = 15.0
SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}


def has_from(node: MeshNode, message_id: str, origin: str) -> bool:
    node.flush()
    return any(i.message_id == message_id and i.origin == origin for i in node.store.indicators())


def handled(node: MeshNode) -> int:
    stats = node.engine.stats
    return stats.accepted + stats.duplicates + sum(stats.rejected.values())


async def test_a_squatted_id_does_not_stop_the_origins_message(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 4, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        node1, node2 = mesh.nodes[0], mesh.nodes[1]
        real = node1.sign(anomaly_payload("11" * 16, "port-scan", 0.5))
        squatter = sign_message(
            node2.identity.key,
            node2.node_id,
            anomaly_payload("22" * 16, "port-scan", 0.5),
            now_ms=now_ms(),
            chain=node2.identity.chain_der,
            message_id=real.message_id,
        )
        receivers = [n for n in mesh.nodes if n.node_id in node2.links]
        before = {n.node_id: handled(n) for n in receivers}
        for link in list(node2.links.values()):
            link.send_gossip(squatter.encode())
        await mesh.wait_for(
            lambda: all(handled(n) > before[n.node_id] for n in receivers),
            WAIT,
            what="the squatter's copies handled",
        )
        node1.accept(real, real.encode(), sender=None)
        await mesh.wait_for(
            lambda: all(has_from(n, real.message_id, node1.node_id) for n in mesh.nodes),
            WAIT,
            what="node-1's message on every node",
        )
        for n in mesh.nodes:
            assert not has_from(n, real.message_id, node2.node_id), n.node_id
