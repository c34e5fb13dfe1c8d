"""Whole meshes on loopback (real TLS, real HTTP, real SQLite): coverage, dedupe, hostile
gossip, revocation, renewal under traffic, restarts, and the node API's authentication."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization

from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.mesh.gossip import GossipMessage, anomaly_payload, derive_message_id, sign_message
from trustmesh.mesh.link import CloseCode, LinkClosed
from trustmesh.node.client import NodeApiError, NodeClient
from trustmesh.node.links import LinkFailed
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode, now_ms
from trustmesh.pki.ca import CertificateAuthority

WAIT = 15.0
SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}


@pytest.fixture
async def mesh5(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    async with LocalMesh(tmp_path, 5, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        yield mesh


def anomaly(n: int = 0) -> dict[str, Any]:
    return anomaly_payload(f"{n:032x}", "port-scan", 0.5, {"n": n})


def on_every_node(mesh: LocalMesh, message_id: str) -> bool:
    return all(message_id in node.seen for node in mesh.nodes)


def node(mesh: LocalMesh, node_id: str) -> MeshNode:
    return next(n for n in mesh.nodes if n.node_id == node_id)


def linked(a: MeshNode, b: MeshNode) -> bool:
    """A link between ``a`` and ``b`` is up at both ends."""
    return (
        b.node_id in a.links
        and a.links[b.node_id].up
        and a.node_id in b.links
        and b.links[a.node_id].up
    )


def forge(message: GossipMessage, payload: dict[str, Any]) -> GossipMessage:
    """``message`` with another payload, under the id derived from it: only the signature,
    made over the old payload, gives it away."""
    return dataclasses.replace(
        message,
        payload=payload,
        message_id=derive_message_id(message.origin, payload, message.timestamp, message.expiry),
    )


def link_closes(mesh: LocalMesh, watcher: MeshNode) -> list[tuple[str, str]]:
    """(peer, reason) of every link.down the watcher logs from now on."""
    closes: list[tuple[str, str]] = []
    watcher.listeners.append(
        lambda event, fields: (
            closes.append((fields["peer"], fields["reason"])) if event == "link.down" else None
        )
    )
    return closes


# --- coverage and dedupe ---------------------------------------------------------------------


@pytest.mark.parametrize("count", [5, 10])
async def test_every_node_gets_each_anomaly_once(tmp_path: Path, count: int) -> None:
    async with LocalMesh(tmp_path, count, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        published = [mesh.nodes[i % count].publish(anomaly(i)) for i in range(6)]
        ids = [p.message_id for p in published]
        await mesh.wait_for(
            lambda: all(on_every_node(mesh, i) for i in ids), WAIT, what="full coverage"
        )
        for n in mesh.nodes:
            n.flush()
            stored = [i.message_id for i in n.store.indicators()]
            assert sorted(stored) == sorted(ids), n.node_id  # each exactly once
            assert n.engine.stats.accepted == len(ids)
            assert not n.engine.stats.rejected
        # Each node pushes each message once, to at most `fanout` (3) peers: every copy
        # beyond the first is a duplicate, dropped, and their number is bounded.
        pushes = sum(n.engine.stats.forwarded for n in mesh.nodes)
        duplicates = sum(n.engine.stats.duplicates for n in mesh.nodes)
        assert pushes <= len(ids) * count * 3
        assert duplicates <= pushes
        assert pushes + 1 >= len(ids) * (count - 1) - duplicates  # pushes did the spreading


# --- hostile gossip ----------------------------------------------------------------------------


async def test_bad_signature_cuts_the_sender_off(mesh5: LocalMesh) -> None:
    victim, liar = mesh5.nodes[0], mesh5.nodes[1]
    closes = link_closes(mesh5, victim)
    message = liar.sign(anomaly(1))
    forged = forge(message, anomaly(2))  # signature over the old one
    link = liar.links[victim.node_id]
    link.send_gossip(forged.encode())
    closed = await asyncio.wait_for(link.wait_closed(), WAIT)
    assert isinstance(closed, LinkClosed)
    assert closed.code == CloseCode.BAD_SIGNATURE
    assert closed.by_peer
    assert victim.engine.stats.rejected == {"bad-signature": 1}
    assert forged.message_id not in victim.seen
    assert (liar.node_id, f"bad-signature: {closed.reason.split(': ', 1)[1]}") in closes


async def test_api_refuses_bad_expired_and_foreign_gossip_and_dedupes_a_replay(
    mesh5: LocalMesh, tmp_path: Path
) -> None:
    origin = mesh5.nodes[0]
    client = NodeClient(origin.directory)
    message = origin.sign(anomaly(3))
    first = await client.post("/v1/mesh/gossip", message.encode())
    assert first["status"] == "accepted"
    replay = await client.post("/v1/mesh/gossip", message.encode())
    assert replay["status"] == "duplicate"
    await mesh5.wait_for(lambda: on_every_node(mesh5, message.message_id), WAIT, what="spread")

    tampered = dataclasses.replace(message, message_id=message.message_id + "x")
    with pytest.raises(NodeApiError) as bad_id:
        await client.post("/v1/mesh/gossip", tampered.encode())
    assert (bad_id.value.status, bad_id.value.code) == (400, "malformed")
    assert "not derived" in str(bad_id.value)
    forged = forge(message, anomaly(33))
    with pytest.raises(NodeApiError) as bad:
        await client.post("/v1/mesh/gossip", forged.encode())
    assert (bad.value.status, bad.value.code) == (400, "bad_signature")

    old = sign_message(
        origin.identity.key,
        origin.node_id,
        anomaly(4),
        now_ms=now_ms() - 10_000,
        ttl_ms=5_000,
        chain=origin.identity.chain_der,
    )
    with pytest.raises(NodeApiError) as expired:
        await client.post("/v1/mesh/gossip", old.encode())
    assert (expired.value.status, expired.value.code) == (400, "expired")

    with CertificateAuthority.init(tmp_path / "other-ca", None) as other:
        key = PrivateKey.generate(KeyKind.P256)
        from cryptography import x509

        cert = other.issue(x509.load_pem_x509_csr(make_csr(key, "node-1").encode()), "node-1")
        chain = (
            cert.public_bytes(serialization.Encoding.DER),
            other.issuing_cert.public_bytes(serialization.Encoding.DER),
        )
    impostor = sign_message(key, "node-1", anomaly(5), now_ms=now_ms(), chain=chain)
    with pytest.raises(NodeApiError) as foreign:
        await client.post("/v1/mesh/gossip", impostor.encode())
    assert (foreign.value.status, foreign.value.code) == (403, "untrusted_origin")
    for answer in (b"", b"{", b'{"message_id": 1}'):
        with pytest.raises(NodeApiError) as malformed:
            await client.post("/v1/mesh/gossip", answer)
        assert malformed.value.status == 400
    assert origin.engine.stats.accepted == 1


async def test_replayed_gossip_on_a_link_is_not_forwarded_again(mesh5: LocalMesh) -> None:
    origin = mesh5.nodes[0]
    received = origin.publish(anomaly(6))
    await mesh5.wait_for(lambda: on_every_node(mesh5, received.message_id), WAIT, what="spread")
    forwarded = {n.node_id: n.engine.stats.forwarded for n in mesh5.nodes}
    sender = mesh5.nodes[2]
    for peer_link in sender.links.values():
        peer_link.send_gossip(received.raw)  # the same bytes again, to every peer
    receivers = [node(mesh5, peer) for peer in sender.links]
    before = {n.node_id: n.engine.stats.duplicates for n in receivers}
    await mesh5.wait_for(
        lambda: all(n.engine.stats.duplicates > before[n.node_id] for n in receivers),
        WAIT,
        what="the replays arriving",
    )
    assert {n.node_id: n.engine.stats.forwarded for n in mesh5.nodes} == forwarded


# --- revocation -----------------------------------------------------------------------------


async def test_a_revoked_node_is_isolated_and_its_gossip_dies(mesh5: LocalMesh) -> None:
    assert mesh5.ca is not None
    revoked = mesh5.nodes[-1]
    others = mesh5.nodes[:-1]
    # The fixture hands over a connected mesh, not a finished one: node-5 started last, and
    # may hold only its bootstrap link while its dials to the others are in flight. A node
    # knows a peer's serial, and so that a CRL revokes it, only once a link with that peer
    # has come up. Start from node-5 linked (at both ends) to every other node, so each of
    # them must cut it off.
    await mesh5.wait_for(
        lambda: all(linked(revoked, n) for n in others), WAIT, what="node-5 linked to all"
    )
    relay = others[0]
    late = revoked.sign(anomaly(7))  # signed while it was still valid
    mesh5.ca.revoke(node_id=revoked.node_id, reason="keyCompromise")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await others[0].refresh_crl()

    def cut_off(n: MeshNode) -> bool:
        return (
            revoked.node_id in n.revoked_nodes
            and revoked.node_id not in n.links
            and revoked.node_id not in n.peers
            and revoked.node_id not in n.addresses
        )

    await mesh5.wait_for(lambda: all(cut_off(n) for n in others), WAIT, what="isolation")
    assert loop.time() - started < 1.0  # every node cut it off within a second
    # Its old message, relayed by a good node, is dropped everywhere and never forwarded.
    forwarded = relay.engine.stats.forwarded
    with pytest.raises(Exception, match="revoked"):
        relay.accept_raw(late.encode())
    assert relay.engine.stats.forwarded == forwarded
    assert all(late.message_id not in n.seen for n in others)
    # It cannot link again: the TLS handshake refuses its certificate, with the
    # certificate_revoked alert, before any HELLO (a refusal at HELLO has a CLOSE code).
    with pytest.raises(LinkFailed, match=r"^TLS failed: .*alert certificate revoked") as refused:
        await revoked.dial(others[0].listen_address)
    assert refused.value.code is None
    assert revoked.node_id not in others[0].links


async def test_crl_reaches_a_node_through_gossip(mesh5: LocalMesh) -> None:
    assert mesh5.ca is not None
    mesh5.ca.revoke(node_id="node-4", reason="superseded")
    numbers: list[int] = []
    target = mesh5.nodes[2]
    target.listeners.append(
        lambda event, fields: numbers.append(fields["number"]) if event == "crl.updated" else None
    )
    assert await mesh5.nodes[0].refresh_crl()
    await mesh5.wait_for(lambda: bool(numbers), WAIT, what="the CRL at node-3")
    assert target.trust.crl_number == mesh5.nodes[0].trust.crl_number
    assert target.store.crl() == mesh5.nodes[0].trust.crl_der


# --- renewal and restart ----------------------------------------------------------------------


async def test_renewal_under_traffic_drops_no_link(mesh5: LocalMesh) -> None:
    renewing = mesh5.nodes[2]
    links_before = dict(renewing.links)
    closes = link_closes(mesh5, renewing)
    old_serial = renewing.identity.certificate.serial_number
    ids: list[str] = []

    async def traffic() -> None:
        for i in range(40):
            ids.append(mesh5.nodes[i % 5].publish(anomaly(100 + i)).message_id)
            await asyncio.sleep(0)  # let the links carry them between publishes

    await asyncio.gather(traffic(), renewing._renew_for_core())  # as the core schedules it
    new_serial = renewing.identity.certificate.serial_number
    assert new_serial != old_serial
    assert renewing.renewals == {"renewed": 1}  # trustmesh_node_certificate_renewals_total
    await mesh5.wait_for(
        lambda: all(on_every_node(mesh5, i) for i in ids), WAIT, what="all traffic delivered"
    )
    assert closes == []
    for peer, link in links_before.items():
        assert renewing.links[peer] is link  # the very same link, still up
    # A new link gets the new certificate.
    dialer = mesh5.nodes[0]
    fresh = await dialer.dial(renewing.listen_address)
    assert fresh.serial == new_serial


async def test_restart_keeps_the_seen_cache(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 2, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        received = mesh.nodes[0].publish(anomaly(9))
        await mesh.wait_for(lambda: on_every_node(mesh, received.message_id), WAIT, what="spread")
        second = mesh.nodes[1]
        directory = second.directory
        await second.stop()
        mesh.nodes.remove(second)
        again = await mesh.start_node(directory)
        assert received.message_id in again.seen
        assert again.accept_raw(received.raw).new is False
        assert [i.message_id for i in again.store.indicators()] == [received.message_id]


# --- the API's door ------------------------------------------------------------------------------


async def test_api_needs_a_mesh_certificate(mesh5: LocalMesh, tmp_path: Path) -> None:
    target = mesh5.nodes[0]
    url = target.api_url + "/v1/mesh/peers"
    trust = ssl.create_default_context(cafile=str(target.directory / "ca.crt"))

    async def status(context: ssl.SSLContext) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, ssl=context, server_hostname=target.node_id) as response,
        ):
            return response.status, await response.json()

    code, body = await status(trust)
    assert (code, body["error"]) == (401, "unauthenticated")

    with CertificateAuthority.init(tmp_path / "foreign", None) as other:
        key = PrivateKey.generate(KeyKind.P256)
        from cryptography import x509

        cert = other.issue(x509.load_pem_x509_csr(make_csr(key, "node-2").encode()), "node-2")
        (tmp_path / "f.crt").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + other.issuing_cert.public_bytes(serialization.Encoding.PEM)
        )
    (tmp_path / "f.key").write_bytes(
        key.to_cryptography().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    foreign = ssl.create_default_context(cafile=str(target.directory / "ca.crt"))
    foreign.load_cert_chain(str(tmp_path / "f.crt"), str(tmp_path / "f.key"))
    code, body = await status(foreign)
    assert (code, body["error"]) == (401, "unauthenticated")

    member = NodeClient(mesh5.nodes[1].directory, local=False)
    member.url = target.api_url
    member.config = target.config  # dial node-1's API with node-2's certificate
    peers = await member.get("/v1/mesh/peers")
    assert peers["node_id"] == target.node_id
    assert {p["node_id"] for p in peers["peers"]} >= {"node-2"}
    assert all({"node_id", "status", "last_seen"} <= p.keys() for p in peers["peers"])

    assert mesh5.ca is not None
    mesh5.ca.revoke(node_id="node-2", reason="keyCompromise")
    await target.refresh_crl()
    with pytest.raises(NodeApiError) as revoked:
        await member.get("/v1/mesh/health")
    assert (revoked.value.status, revoked.value.code) == (403, "revoked")
