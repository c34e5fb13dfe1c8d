"""The node's local read-only credential (issue 21): ``D/api.sock``, a Unix socket of mode
0600 that a running node serves its read-only GET routes on, in plain HTTP and with no
client certificate, so that ``NodeClient`` (and the ``node health``/``peers``/
``anomalies`` commands) never need the key's passphrase. Writes stay on the mTLS API;
the socket goes away when the node stops; a live one stops a second node's start; other
modules (the dashboard) add read-only routes to both APIs through ``READ_ONLY_ROUTES``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from trustmesh.io.https import serve_unix_app
from trustmesh.io.listener import unix_address
from trustmesh.mesh.gossip import anomaly_payload
from trustmesh.node import api
from trustmesh.node.client import NodeApiError, NodeClient
from trustmesh.node.local import LocalMesh
from trustmesh.node.runfile import API_SOCKET, RUN_FILE
from trustmesh.node.runtime import MeshNode

WAIT = 15.0
SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}


@pytest.fixture
async def mesh2(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    async with LocalMesh(tmp_path, 2, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        yield mesh


async def over_socket(
    node: MeshNode, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    with unix_address(node.directory / API_SOCKET) as address:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=address)) as session,
            session.request(method, f"http://localhost{path}", data=body) as response,
        ):
            return response.status, dict(response.headers), await response.read()


class Asked:
    """A passphrase source that counts how often it is asked (the key is not encrypted
    in a LocalMesh: None is its passphrase)."""

    def __init__(self) -> None:
        self.times = 0

    def __call__(self, directory: Path) -> bytes | None:
        self.times += 1
        return None


async def test_the_socket_is_0600_read_only_and_goes_away_on_stop(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 2, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        first = mesh.nodes[0]
        sockets = [n.directory / API_SOCKET for n in mesh.nodes]
        for path in sockets:
            info = os.stat(path)
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o600
        status, _, body = await over_socket(first, "GET", "/v1/mesh/health")
        assert status == 200, body
        message = first.sign(anomaly_payload("ab" * 16, "port-scan", 0.5))
        # Writes are refused whatever the path: gossip, bundles, anything.
        for method, route in [
            ("POST", "/v1/mesh/gossip"),
            ("POST", "/v1/bundles"),
            ("DELETE", "/v1/bundles/x"),
            ("PUT", "/v1/mesh/health"),
        ]:
            status, headers, body = await over_socket(first, method, route, message.encode())
            assert status == 405, (method, route, body)
            assert headers["Allow"] == "GET, HEAD"
            assert b'"method_not_allowed"' in body
        assert message.message_id not in first.seen
        # Only the read-only routes are there: no bundle is read over the socket.
        status, _, body = await over_socket(first, "GET", "/v1/bundles")
        assert (status, b'"not_found"' in body) == (404, True)
        status, _, body = await over_socket(first, "GET", "/metrics")
        assert status == 200 and b"trustmesh_node_" in body
        assert (await over_socket(first, "GET", "/v1/openapi.json"))[0] == 200
        assert "local" in first.health()["limits"]
    for path in sockets:
        assert not path.exists()


async def test_the_client_reads_over_the_socket_without_a_passphrase(mesh2: LocalMesh) -> None:
    first = mesh2.nodes[0]
    asked = Asked()
    client = NodeClient(first.directory, passphrase=asked)
    peers = await client.get("/v1/mesh/peers")
    assert [p["node_id"] for p in peers["peers"]] == ["node-2"]
    health = await client.get("/v1/mesh/health")
    assert health["node_id"] == first.node_id
    anomalies = await client.get("/v1/mesh/anomalies", limit="5")
    assert anomalies["anomalies"] == []
    assert asked.times == 0
    # The same answers as over mTLS.
    over_tls = await NodeClient(first.directory, local=False).get("/v1/mesh/peers")
    assert over_tls["peers"] == peers["peers"]
    # A bad query is the API's own 400, not a fallback.
    with pytest.raises(NodeApiError) as bad:
        await client.get("/v1/mesh/anomalies", limit="0")
    assert (bad.value.status, bad.value.code) == (400, "bad_request")
    assert asked.times == 0

    # Without the socket (an operator removed it), the client falls back to mTLS, and
    # only then asks for the passphrase.
    (first.directory / API_SOCKET).unlink()
    assert (await client.get("/v1/mesh/health"))["node_id"] == first.node_id
    assert asked.times == 1
    # A write never goes to the socket.
    posting = NodeClient(mesh2.nodes[1].directory, passphrase=Asked())
    message = mesh2.nodes[1].sign(anomaly_payload("cd" * 16, "port-scan", 0.5))
    answer = await posting.post("/v1/mesh/gossip", message.encode())
    assert answer["status"] == "accepted"


async def test_a_socket_left_by_a_dead_node_is_not_used(mesh2: LocalMesh) -> None:
    """A stale socket file (kill -9): the client falls back to mTLS."""
    first = mesh2.nodes[0]
    path = first.directory / API_SOCKET
    path.unlink()
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening: what a dead process leaves
    asked = Asked()
    health = await NodeClient(first.directory, passphrase=asked).get("/v1/mesh/health")
    assert health["node_id"] == first.node_id
    assert asked.times == 1


async def test_a_stopped_node_asks_for_no_passphrase(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 1, node_settings=dict(SETTINGS)) as mesh:
        directory = mesh.nodes[0].directory
    asked = Asked()
    with pytest.raises(NodeApiError, match="is not running"):
        await NodeClient(directory, passphrase=asked).get("/v1/mesh/health")
    assert asked.times == 0


async def test_a_node_killed_hard_asks_for_no_passphrase(tmp_path: Path) -> None:
    """kill -9 leaves run.json and a dead socket: nothing serves the API, so the client
    says the node is not running (as `node wait` needs, to go on waiting) instead of
    asking for the key's passphrase to try mTLS."""
    async with LocalMesh(tmp_path, 1, node_settings=dict(SETTINGS)) as mesh:
        directory = mesh.nodes[0].directory
    dead = await asyncio.create_subprocess_exec("true")  # a pid that has exited
    await dead.wait()
    (directory / RUN_FILE).write_text(json.dumps({"pid": dead.pid, "api": "127.0.0.1:1"}))
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(directory / API_SOCKET))
        asked = Asked()
        with pytest.raises(NodeApiError, match="is not running"):
            await NodeClient(directory, passphrase=asked).get("/v1/mesh/health")
    assert asked.times == 0


async def test_a_live_socket_stops_a_start(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 1, node_settings=dict(SETTINGS)) as mesh:
        directory = await mesh.enroll(2)
        squatter = await serve_unix_app(web.Application(), directory / API_SOCKET)
        try:
            node = MeshNode.from_directory(directory)
            with pytest.raises(OSError, match="another running process serves it"):
                await node.start()
            await node.stop()
            assert (directory / API_SOCKET).exists()  # the squatter's, left alone
        finally:
            await squatter.stop()
        # Once it is gone, the node starts.
        started = await mesh.start_node(directory)
        assert (directory / API_SOCKET).exists()
        assert started.health()["node_id"] == "node-2"


async def test_more_read_only_routes_go_on_both_apis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the dashboard does: append a function to READ_ONLY_ROUTES; its GET routes are
    served on the mTLS API (behind the client-certificate check) and on the socket."""

    async def page(request: web.Request) -> web.Response:
        node = request.app[api.NODE_KEY]
        return web.json_response({"dashboard": node.node_id})

    def dashboard(app: web.Application) -> None:
        app.router.add_get("/dashboard/", page)

    monkeypatch.setattr(api, "READ_ONLY_ROUTES", [dashboard])
    async with LocalMesh(tmp_path, 1, node_settings=dict(SETTINGS)) as mesh:
        (node,) = mesh.nodes
        status, _, body = await over_socket(node, "GET", "/dashboard/")
        assert (status, body) == (200, b'{"dashboard": "node-1"}')
        client = NodeClient(node.directory, local=False)
        assert await client._request("GET", "/dashboard/") == {"dashboard": "node-1"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(node.api_url + "/dashboard/", ssl=False) as anonymous,
        ):
            assert anonymous.status == 401
