"""Peer exchange with signed peer records, on loopback meshes (real TLS, real SQLite): a
node dials a learned address only from a valid record signed by that node, and a mesh
still forms through them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from trustmesh.mesh.gossip import anomaly_payload
from trustmesh.mesh.link import PeerAddress
from trustmesh.mesh.peers import PeerBook, sign_record
from trustmesh.node.links import Link
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode, now_ms

WAIT = 15.0
SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}


@dataclasses.dataclass
class Trap:
    """A TCP listener on loopback that only counts who connects: where a hostile peer
    would like the mesh to dial (another service, a victim host)."""

    address: str
    connections: int = 0


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    found = Trap("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        found.connections += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    found.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield found
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def mesh3(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    async with LocalMesh(tmp_path, 3, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(full_mesh(mesh), WAIT, what="a full mesh")
        yield mesh


def full_mesh(mesh: LocalMesh) -> Any:
    ids = {n.node_id for n in mesh.nodes}
    return lambda: all(set(n.links) == ids - {n.node_id} for n in mesh.nodes)


def stored_ids(node: MeshNode) -> set[str]:
    node.flush()  # records are written with the node's next batch
    return {json.loads(raw)["node_id"] for raw in node.store.peer_records()}


async def handled_after(mesh: LocalMesh, sender: MeshNode, link: Link, receiver: MeshNode) -> None:
    """Wait until ``receiver`` has handled every frame ``sender`` queued on ``link`` so far:
    a gossip message sent after them on the same link has arrived (no sleeping)."""
    message = sender.sign(anomaly_payload(f"{now_ms():032x}", "barrier", 0.1))
    link.send_gossip(message.encode())
    await mesh.wait_for(lambda: message.message_id in receiver.seen, WAIT, what="the barrier")


def not_dialled(victim: MeshNode, trap: Trap) -> None:
    assert not victim.core.dialling(trap.address)
    assert trap.address not in victim.addresses.values()
    assert trap.connections == 0


# --- never dialled ------------------------------------------------------------------------------


async def test_unsigned_peers_entries_are_never_dialled(mesh3: LocalMesh, trap: Trap) -> None:
    victim, liar = mesh3.nodes[0], mesh3.nodes[1]
    assert len(victim.links) < victim.dial_target  # room to dial, were it fooled
    link = liar.links[victim.node_id]
    link.send_peers([PeerAddress(f"node-{9 + i}", trap.address) for i in range(64)])
    await handled_after(mesh3, liar, link, victim)
    not_dialled(victim, trap)
    assert {r.node_id for r in victim.book.records()} == {"node-2", "node-3"}


async def test_forged_misattributed_and_expired_records_are_never_dialled(
    mesh3: LocalMesh, trap: Trap
) -> None:
    victim, liar = mesh3.nodes[0], mesh3.nodes[1]
    key, chain, now = liar.identity.key, liar.identity.chain_der, now_ms()
    for_another = sign_record(  # the liar's valid signature, for a node it is not
        key, "node-99", [trap.address], seq=now, expires=now + 60_000, chain=chain
    )
    genuine = sign_record(
        key, liar.node_id, [liar.advertised], seq=now + 1, expires=now + 60_000, chain=chain
    )
    forged = dataclasses.replace(genuine, addresses=(trap.address,))  # not what it signed
    expired = sign_record(
        key, liar.node_id, [trap.address], seq=now - 20_000, expires=now - 10_000, chain=chain
    )
    third = mesh3.nodes[2]  # a node's record, re-signed by the liar
    stolen = dataclasses.replace(for_another, node_id=third.node_id)
    link = liar.links[victim.node_id]
    hints = [PeerAddress("node-99", trap.address)]  # a version-1 node would dial this
    records = [r.encode() for r in (for_another, forged, expired, stolen)]
    link.send_peers(hints, records)
    await handled_after(mesh3, liar, link, victim)
    not_dialled(victim, trap)
    assert "node-99" not in victim.book
    for record in (victim.book.get(liar.node_id), victim.book.get(third.node_id)):
        assert record is not None and trap.address not in record.addresses
    assert "node-99" not in stored_ids(victim)
    assert victim.node_id in liar.links  # refused records do not cost the link


async def test_a_revoked_nodes_record_is_evicted_and_never_dialled(mesh3: LocalMesh) -> None:
    assert mesh3.ca is not None
    revoked, others = mesh3.nodes[-1], mesh3.nodes[:-1]
    for n in others:
        assert revoked.node_id in n.book and revoked.node_id in stored_ids(n)
    mesh3.ca.revoke(node_id=revoked.node_id, reason="keyCompromise")
    assert await others[0].refresh_crl()
    await mesh3.wait_for(
        lambda: all(revoked.node_id not in n.links for n in others), WAIT, what="isolation"
    )
    for n in others:
        assert revoked.node_id not in n.book
        assert revoked.node_id not in stored_ids(n)
        assert revoked.node_id not in n.addresses


# --- the mesh still forms --------------------------------------------------------------------


async def test_three_nodes_form_a_full_mesh_through_signed_records(mesh3: LocalMesh) -> None:
    """node-2 and node-3 know only node-1 (their bootstrap): they found each other through
    node-1's PEERS, from records each of them signed."""
    _, second, third = mesh3.nodes
    assert second.listen_address not in third.config.bootstrap
    for n in mesh3.nodes:
        others = {m.node_id for m in mesh3.nodes} - {n.node_id}
        assert set(n.addresses) == others
        assert stored_ids(n) == others
        for node_id in others:
            held = n.book.get(node_id)
            assert held is not None
            assert held.addresses == (node(mesh3, node_id).advertised,)
            check = PeerBook(n.trust, n.node_id)  # each verifies on its own
            assert check.add(held, now_ms())


async def test_records_survive_a_restart_and_are_checked_again(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 3, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(full_mesh(mesh), WAIT, what="a full mesh")
        last = mesh.nodes[-1]
        await last.quiesce()
        await last.stop()
        mesh.nodes.remove(last)
        restarted = MeshNode.from_directory(last.directory)
        assert stored_ids(restarted) == {"node-1", "node-2"}
        await restarted.start()
        mesh.nodes.append(restarted)
        # Loaded from mesh.db and verified again at start.
        assert {r.node_id for r in restarted.book.records()} == {"node-1", "node-2"}
        await mesh.wait_for(full_mesh(mesh), WAIT, what="the mesh again")


def node(mesh: LocalMesh, node_id: str) -> MeshNode:
    return next(n for n in mesh.nodes if n.node_id == node_id)
