"""The dashboard's routes, bounds and proxy, without a browser (test_dashboard_browser.py
has the page itself)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from dashtools import start_mesh

from trustmesh.api.errors import ApiError, json_errors
from trustmesh.mesh.gossip import anomaly_payload
from trustmesh.node.client import NodeClient
from trustmesh.node.dashboard import (
    Dashboard,
    DashboardProxy,
    add_dashboard_routes,
    node_state,
)
from trustmesh.node.local import LocalMesh
from trustmesh.node.runfile import API_SOCKET

WAIT = 10.0


@pytest.fixture
async def mesh2(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    mesh = await start_mesh(tmp_path, 2)
    try:
        yield mesh
    finally:
        await mesh.stop()


async def _local_get(directory: Path, path: str) -> tuple[int, dict[str, Any]]:
    """GET ``path`` on the node's read-only socket."""
    connector = aiohttp.UnixConnector(path=str(directory / API_SOCKET))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://localhost" + path) as response,
    ):
        return response.status, await response.json()


async def test_the_node_serves_its_state_behind_its_api_credentials(mesh2: LocalMesh) -> None:
    first, second = mesh2.nodes
    first.publish(anomaly_payload("ab" * 16, "port-scan", 0.8))
    # Over mTLS with a mesh certificate ...
    state = await NodeClient(first.directory, local=False).get("/dashboard/state.json")
    assert state["node_id"] == "node-1"
    assert {n["id"]: n["state"] for n in state["nodes"]} == {
        "node-1": "self",
        "node-2": "connected",
    }
    assert state["links"] == [{"source": "node-1", "target": "node-2", "direction": "inbound"}]
    me = state["nodes"][0]
    cert = first.identity.certificate
    assert me["not_after_ms"] == int(cert.not_valid_after_utc.timestamp() * 1000)
    assert state["nodes"][1]["not_after_ms"] > state["now_ms"]  # from node-2's TLS session
    assert state["nodes"][1]["score"] == 0.0
    (anomaly,) = state["anomalies"]
    assert (anomaly["origin"], anomaly["kind"]) == ("node-1", "port-scan")
    assert anomaly["coverage"]["links"] == 1
    assert anomaly["coverage"]["held"] + anomaly["coverage"]["sent"] == ["node-2"]
    assert state["crl"]["number"] == first.trust.crl_number
    assert state["crl"]["this_update_ms"] <= state["now_ms"]
    assert state["revocations"] == {"nodes": [], "serials": 0, "recent": []}
    # ... and on the read-only socket, with no certificate at all.
    status, local = await _local_get(first.directory, "/dashboard/state.json")
    assert status == 200
    assert local["node_id"] == "node-1"
    # Without a client certificate, the HTTPS API says 401, the dashboard included.
    context = ssl.create_default_context(cafile=str(first.directory / "ca.crt"))
    url = NodeClient(first.directory).url
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/dashboard/", ssl=context, server_hostname=first.node_id) as response,
    ):
        assert response.status == 401
    # The page and its files, with a policy that lets them run nothing else.
    for name, kind in (("", "text/html"), ("dashboard.js", "text/javascript")):
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(first.directory / API_SOCKET))
            ) as session,
            session.get("http://localhost/dashboard/" + name) as response,
        ):
            assert response.status == 200
            assert response.content_type == kind
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert second.node_id == "node-2"


async def test_the_graph_is_capped(mesh2: LocalMesh) -> None:
    state = node_state(mesh2.nodes[0], max_nodes=1)
    assert [n["id"] for n in state["nodes"]] == ["node-1"]
    assert state["nodes_left_out"] == 1


class _FakeState:
    def __init__(self) -> None:
        self.value = 0
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {"value": self.value}


def test_the_state_is_taken_at_most_once_per_interval() -> None:
    source = _FakeState()
    dashboard = Dashboard(source, clock_ms=lambda: 1, interval=3600.0, refresh=3600.0)
    bodies = {dashboard.current() for _ in range(100)}
    assert source.calls == 1  # a hundred requests, one state
    assert bodies == {b'{"value":0,"now_ms":1}'}


def test_streams_are_capped() -> None:
    dashboard = Dashboard(_FakeState(), clock_ms=lambda: 1, max_streams=2)

    async def scenario() -> None:
        dashboard.open_stream()
        dashboard.open_stream()
        with pytest.raises(ApiError) as refused:
            dashboard.open_stream()
        assert refused.value.status == 503
        assert refused.value.headers["Retry-After"] == "5"
        dashboard.close_stream()
        dashboard.open_stream()  # a slot came free
        dashboard.close_stream()
        dashboard.close_stream()
        assert dashboard.streams == 0
        await dashboard.close()

    asyncio.run(scenario())


async def _next_state(lines: aiohttp.StreamReader) -> dict[str, Any]:
    """The next ``state`` event of a Server-Sent Events stream."""
    async with asyncio.timeout(WAIT):
        while True:
            line = await lines.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                data: dict[str, Any] = json.loads(line[6:])
                return data


async def test_streams_get_each_change_and_the_cap_says_503() -> None:
    source = _FakeState()
    dashboard = Dashboard(source, clock_ms=lambda: 7, interval=0.01, refresh=60.0, max_streams=2)
    app = web.Application(middlewares=[json_errors({})])  # as the node's APIs have
    add_dashboard_routes(app, dashboard)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        url = str(server.make_url("/dashboard/events"))
        async with session.get(url) as one, session.get(url) as two:
            assert one.content_type == "text/event-stream"
            assert (await _next_state(one.content))["value"] == 0
            assert (await _next_state(two.content))["value"] == 0
            async with session.get(url) as third:
                assert third.status == 503
                assert (await third.json())["error"] == "busy"
            source.value = 1
            dashboard.poke()  # the node's events wake the one task that takes the state
            assert await _next_state(one.content) == {"value": 1, "now_ms": 7}
            assert (await _next_state(two.content))["value"] == 1
            assert dashboard.streams == 2
        await dashboard.close()  # as the node's shutdown does: streams end, none waits


async def test_the_proxy_serves_only_the_dashboard_and_only_as_itself(
    mesh2: LocalMesh, tmp_path: Path
) -> None:
    first = mesh2.nodes[0]
    async with DashboardProxy(first.directory, mtls=False) as proxy:
        assert proxy.url == f"http://127.0.0.1:{proxy.port}/dashboard/"
        base = proxy.url.removesuffix("/dashboard/")
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/", allow_redirects=False) as response:
                assert response.status == 308
                assert response.headers["Location"] == "/dashboard/"
            async with session.get(proxy.url + "state.json") as response:
                assert response.status == 200
                assert (await response.json())["node_id"] == "node-1"
            async with session.get(base + "/v1/mesh/peers") as response:
                assert response.status == 404  # the proxy forwards the dashboard only
            async with session.post(proxy.url + "state.json") as response:
                assert response.status == 405
            # DNS rebinding: a page of another origin whose name resolves to 127.0.0.1.
            headers = {"Host": f"evil.example:{proxy.port}"}
            async with session.get(proxy.url + "state.json", headers=headers) as response:
                assert response.status == 421
            async with session.get(proxy.url + "nothing.js") as response:
                assert response.status == 404
            async with session.head(proxy.url + "events") as response:
                assert response.status == 200  # the headers, and no stream held open
                assert response.content_type == "text/event-stream"
        # Dot segments sent raw (as curl --path-as-is does) reach the proxy unchanged;
        # they must not climb out of /dashboard/ to the node's other routes.
        for sneaky in ("/dashboard/../v1/mesh/peers", "/dashboard/%2e%2e/v1/mesh/peers"):
            status = await _raw_get(proxy.port, sneaky)
            assert status == 404, sneaky


async def _raw_get(port: int, path: str) -> int:
    """The status of GET ``path`` sent byte for byte (no client-side normalising)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


async def test_without_the_socket_the_proxy_forwards_over_mtls(
    mesh2: LocalMesh, tmp_path: Path
) -> None:
    first = mesh2.nodes[0]
    proxy = DashboardProxy(first.directory)
    proxy.socket = tmp_path / "no.sock"  # as for a node without the read-only socket
    async with proxy, aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "state.json") as response:
            assert response.status == 200
            assert (await response.json())["node_id"] == "node-1"
        await mesh2.stop()  # the node is gone: the proxy says so
        async with session.get(proxy.url + "state.json") as response:
            assert response.status == 502
            answer = await response.json()
            assert answer["error"] == "node_unreachable"
            assert "trustmesh node run --dir" in answer["message"]


async def test_node_dashboard_prints_its_url_and_stops_on_sigterm(mesh2: LocalMesh) -> None:
    from clitools import TRUSTMESH, clean_env

    first = mesh2.nodes[0]
    process = await asyncio.create_subprocess_exec(
        TRUSTMESH,
        "node",
        "dashboard",
        "--dir",
        str(first.directory),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(WAIT):
            line = await process.stdout.readline()
        url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/dashboard/")
        async with aiohttp.ClientSession() as session, session.get(url + "state.json") as r:
            assert r.status == 200
            assert (await r.json())["node_id"] == "node-1"
        process.terminate()
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert sys.executable  # the CLI ran from this venv (clitools)


async def _open_streams(
    stack: contextlib.AsyncExitStack,
    session: aiohttp.ClientSession,
    url: str,
    count: int,
    **kw: Any,
) -> None:
    """``count`` event streams of ``url``, each open (its first state read), held in ``stack``."""
    for _ in range(count):
        response = await stack.enter_async_context(session.get(url, **kw))
        assert response.status == 200, await response.text()
        assert (await _next_state(response.content))["node_id"]


async def _refused(session: aiohttp.ClientSession, url: str, **kw: Any) -> str:
    async with session.get(url, **kw) as response:
        assert response.status == 503
        answer = await response.json()
        assert answer["error"] == "busy"
        message: str = answer["message"]
        return message


async def test_the_api_and_the_local_socket_each_have_their_own_streams(
    mesh2: LocalMesh,
) -> None:
    """Remote clients holding every stream of the mTLS API do not lock the local
    operator out of the socket, nor the other way round."""
    for node, remote_first in zip(mesh2.nodes, (True, False), strict=True):
        directory = node.directory
        context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
        context.load_cert_chain(str(directory / "node.crt"), str(directory / "node.key"))
        remote_url = NodeClient(directory, local=False).url + "/dashboard/events"
        remote = {"ssl": context, "server_hostname": node.node_id}
        local_url = "http://localhost/dashboard/events"
        cap = node.dashboard.max_streams
        async with (
            contextlib.AsyncExitStack() as stack,
            aiohttp.ClientSession() as mtls,
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(directory / API_SOCKET))
            ) as local,
        ):
            sides = [(mtls, remote_url, remote), (local, local_url, {})]
            for session, url, kw in sides if remote_first else sides[::-1]:
                await _open_streams(stack, session, url, cap, **kw)  # the other side is full
            assert "on the API" in await _refused(mtls, remote_url, **remote)
            assert "on the local socket" in await _refused(local, local_url)
            assert node.dashboard.open_streams == {"api": cap, "local": cap}
            await node.dashboard.close()  # the streams end, as at the node's shutdown
