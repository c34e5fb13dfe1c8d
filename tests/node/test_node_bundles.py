"""Bundles between real nodes over real links and the node API: delivery and custody,
an offline node that gets its bundle after its restart, broadcast, the API's answers to
bad requests, and the quota."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from trustmesh.bundle.codec import decode_bundle
from trustmesh.mesh.gossip import anomaly_payload
from trustmesh.node.client import NodeApiError, NodeClient
from trustmesh.node.config import load_config, write_config
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode

SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}
WAIT = 20.0


@pytest.fixture
async def mesh3(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    async with LocalMesh(tmp_path, 3, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        yield mesh


def node(mesh: LocalMesh, node_id: str) -> MeshNode:
    return next(n for n in mesh.nodes if n.node_id == node_id)


async def request(
    sender: MeshNode,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    content_type: str = "application/json",
    accept: str = "application/json",
    as_node: MeshNode | None = None,
) -> tuple[int, Any]:
    """A request to ``sender``'s API with ``as_node``'s certificate (default: its own)."""
    client = NodeClient((as_node or sender).directory)
    headers = {"Content-Type": content_type, "Accept": accept}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            sender.api_url + path,
            data=io.BytesIO(body) if body is not None else None,
            headers=headers,
            ssl=client._ssl,
            server_hostname=sender.node_id,
        ) as response,
    ):
        raw = await response.read()
        if response.content_type == "application/cbor":
            return response.status, raw
        return response.status, json.loads(raw)


async def send(sender: MeshNode, to: str, payload: bytes, ttl: int = 600) -> dict[str, Any]:
    body = {"destination": to, "ttl_sec": ttl, "payload": base64.b64encode(payload).decode()}
    status, answer = await request(sender, "POST", "/v1/bundles", body=json.dumps(body).encode())
    assert status == 201, answer
    return dict(answer)


def held_for(holder: MeshNode, node_id: str) -> list[str]:
    """Bundles ``holder`` keeps for ``node_id`` (not its seeks and other broadcasts)."""
    rows = holder.bundle_store.forwarding_for([f"dtn://{node_id}/inbox"], limit=100)
    return [row.bundle_id for row in rows]


def inbox_ids(target: MeshNode) -> list[str]:
    return [b.bundle_id for b in target.bundle_store.items("inbox")]


async def test_a_bundle_reaches_a_linked_node_and_the_sender_lets_go(mesh3: LocalMesh) -> None:
    n2, n3 = node(mesh3, "node-2"), node(mesh3, "node-3")
    answer = await send(n2, "node-3", b"over the mesh")
    bundle_id = answer["bundle_id"]
    assert bundle_id.startswith("node-2:") and answer["expires_at"].endswith("+00:00")
    await mesh3.wait_for(lambda: bundle_id in inbox_ids(n3), WAIT, what="delivery")
    await mesh3.wait_for(lambda: not held_for(n2, "node-3"), WAIT, what="custody handed over")
    status, listing = await request(n3, "GET", "/v1/bundles?role=inbox")
    assert status == 200
    (item,) = listing["bundles"]
    assert item["bundle_id"] == bundle_id and item["source"] == "node-2"
    assert item["destination"] == "dtn://node-3/inbox"
    assert base64.b64decode(item["payload"]) == b"over the mesh"
    assert {"created_at", "expires_at"} <= set(item)
    status, raw = await request(n3, "GET", f"/v1/bundles/{bundle_id}", accept="application/cbor")
    assert status == 200 and decode_bundle(raw, max_size=1 << 20).payload == b"over the mesh"
    assert (await request(n3, "DELETE", f"/v1/bundles/{bundle_id}"))[0] == 200
    assert (await request(n3, "DELETE", f"/v1/bundles/{bundle_id}"))[0] == 404
    assert inbox_ids(n3) == []


async def test_an_offline_node_gets_its_bundle_after_its_restart(mesh3: LocalMesh) -> None:
    n2, n3 = node(mesh3, "node-2"), node(mesh3, "node-3")
    directory = n3.directory
    await n3.quiesce()
    await n3.stop()
    mesh3.nodes.remove(n3)
    answer = await send(n2, "node-3", b"while you were away")
    assert len(held_for(n2, "node-3")) == 1  # held: node-3 is down
    n3 = await mesh3.start_node(directory)
    await mesh3.wait_for(
        lambda: answer["bundle_id"] in inbox_ids(n3), WAIT, what="delivery after the restart"
    )


async def test_a_broadcast_reaches_every_other_node_once(mesh3: LocalMesh) -> None:
    n1, n2, n3 = (node(mesh3, f"node-{i}") for i in (1, 2, 3))
    answer = await send(n1, "broadcast", b"to all")
    await mesh3.wait_for(
        lambda: all(answer["bundle_id"] in inbox_ids(n) for n in (n2, n3)), WAIT, what="all"
    )
    assert inbox_ids(n1) == [] and len(inbox_ids(n2)) == len(inbox_ids(n3)) == 1


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{", "application/json", 400, "malformed"),
        (
            b'{"destination": "node-3", "ttl_sec": 60, "payload": "%%%"}',
            "application/json",
            400,
            "malformed",
        ),
        (
            b'{"destination": "node-3", "ttl_sec": 0, "payload": ""}',
            "application/json",
            400,
            "malformed",
        ),
        (b'{"destination": "NODE 3", "ttl_sec": 60, "payload": ""}', "application/json", 400, None),
        (b"\x9f\x88\x07\x00", "application/cbor", 400, "malformed"),
    ],
)
async def test_bad_requests_are_refused_with_their_status(
    mesh3: LocalMesh, body: bytes, content_type: str, status: int, code: str | None
) -> None:
    got, answer = await request(
        node(mesh3, "node-2"), "POST", "/v1/bundles", body=body, content_type=content_type
    )
    assert got == status, answer
    if code is not None:
        assert answer["error"] == code


async def test_a_raw_bundle_must_come_from_the_caller_and_fit(mesh3: LocalMesh) -> None:
    n2, n3 = node(mesh3, "node-2"), node(mesh3, "node-3")
    (theirs,) = n3.bundle_codec.make(
        n3.bundle_codec.destination("node-2"), b"x", 60_000, 0 + n3.clock.time_ms()
    )
    status, answer = await request(
        n2, "POST", "/v1/bundles", body=theirs.encode(), content_type="application/cbor"
    )
    assert status == 400 and "not this node" in answer["message"]
    big = {
        "destination": "node-3",
        "ttl_sec": 60,
        "payload": base64.b64encode(bytes(1 << 20 | 1)).decode(),
    }
    status, answer = await request(n2, "POST", "/v1/bundles", body=json.dumps(big).encode())
    assert status == 413
    status, answer = await request(n2, "GET", "/v1/bundles", as_node=n3)
    assert status == 403 and answer["error"] == "not_this_node"


async def test_a_full_store_answers_507_and_keeps_nothing(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 1, node_settings={**SETTINGS, "bundle_quota": 4096}) as mesh:
        n1 = mesh.nodes[0]
        await send(n1, "node-9", b"x")  # held for node-9, which never comes
        body = {
            "destination": "node-9",
            "ttl_sec": 60,
            "payload": base64.b64encode(bytes(3000)).decode(),
        }
        status, answer = await request(n1, "POST", "/v1/bundles", body=json.dumps(body).encode())
        assert status == 507 and answer["error"] == "store_full"
        assert len(held_for(n1, "node-9")) == 1


async def test_the_cli_client_reports_api_errors(mesh3: LocalMesh) -> None:
    client = NodeClient(node(mesh3, "node-2").directory)
    with pytest.raises(NodeApiError) as caught:
        await client.delete("/v1/bundles/node-2:1:1")
    assert caught.value.status == 404


async def stop(mesh: LocalMesh, target: MeshNode) -> Path:
    """Stop ``target``; it will come back on the same link port (its peers' records and
    bootstrap lists name it)."""
    listen = target.listen_address
    await target.quiesce()
    await target.stop()
    mesh.nodes.remove(target)
    config = load_config(target.directory)
    write_config(target.directory, dataclasses.replace(config, listen=listen))
    return target.directory


async def test_an_anomaly_reaches_a_node_that_was_down_even_after_every_node_restarted(
    mesh3: LocalMesh,
) -> None:
    """Gossip alone remembers recent messages in memory only: with every other node
    restarted, node-3 gets what it missed from the bundle stores."""
    directory3 = await stop(mesh3, node(mesh3, "node-3"))
    received = node(mesh3, "node-1").publish(anomaly_payload("ab" * 16, "port-scan", 0.7))
    message_id = received.message_id
    n2 = node(mesh3, "node-2")
    await mesh3.wait_for(lambda: message_id in n2.seen, WAIT, what="gossip to node-2")
    directories = [await stop(mesh3, n) for n in list(mesh3.nodes)]
    for directory in directories:
        await mesh3.start_node(directory)
    n3 = await mesh3.start_node(directory3)
    await mesh3.wait_for(lambda: message_id in n3.seen, WAIT, what="the missed anomaly")


async def test_a_large_payload_crosses_in_fragments_and_is_delivered_whole(
    mesh3: LocalMesh,
) -> None:
    n1, n3 = node(mesh3, "node-1"), node(mesh3, "node-3")
    payload = bytes(range(256)) * 1200  # 300 KiB: five signed fragments
    answer = await send(n1, "node-3", payload)
    bundle_id = answer["bundle_id"]
    await mesh3.wait_for(lambda: bundle_id in inbox_ids(n3), WAIT, what="reassembly")
    status, item = await request(n3, "GET", f"/v1/bundles/{bundle_id}")
    assert status == 200 and base64.b64decode(item["payload"]) == payload
    assert n3.bundle_store.count("fragment") == 0


async def test_bundles_reach_nodes_that_stayed_up_far_away_through_a_seek(
    tmp_path: Path,
) -> None:
    """node-1 knows neither where its destinations are nor a path: its seek broadcast
    makes each dial it, past node-1's link cap, and take its bundle."""
    settings = {**SETTINGS, "max_links": 6, "dial_target": 2}
    async with LocalMesh(tmp_path, 20, node_settings=settings) as mesh:
        await mesh.wait_for(mesh.connected, 60, what="a connected mesh")
        n1 = mesh.nodes[0]
        dialled_us: set[str] = set()
        n1.listeners.append(
            lambda event, fields: (
                dialled_us.add(fields["peer"])
                if event == "link.up" and fields["direction"] == "inbound"
                else None
            )
        )
        targets = [n for n in mesh.nodes[1:] if n.node_id not in n1.links][:6]
        sent = {n1.bundles.send(t.node_id, 600, b"far")[0]: t for t in targets}
        await mesh.wait_for(
            lambda: all(t.bundle_store.get(b, "inbox") for b, t in sent.items()),
            WAIT,
            what="every far bundle delivered",
        )
        # They came for them: most far nodes dialled node-1 (at its cap, whose refusals
        # never come up as links), which spray-and-wait alone never makes them do.
        assert len(dialled_us & {t.node_id for t in targets}) >= 4
        assert len(n1.links) <= 6 + 4  # contact links past the cap are bounded
