"""202 means durable (issue 16 item 13): ``POST /v1/mesh/gossip`` answers only once the
store batch that holds the message has committed, and a failed commit is never a 202.

The node is a stand-in (the API's part is under test): it takes any body as a message
whose id is the body, keeps it pending, and commits on ``flush``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from trustmesh.io.limits import ResourcePolicy
from trustmesh.mesh.engine import Received
from trustmesh.node import api
from trustmesh.node.api import NodeView

WAIT = 10.0
OPEN = ResourcePolicy(request_rate=1000.0, request_burst=1000)


@dataclass
class FakeTrust:
    def identity_of(self, chain: Any, *, now_ms: int) -> None:
        return None


@dataclass
class FakeConfig:
    policy: ResourcePolicy = OPEN


@dataclass
class CommittingNode:
    config: FakeConfig = field(default_factory=FakeConfig)
    trust: FakeTrust = field(default_factory=FakeTrust)
    node_id: str = "node-1.test"
    pending: list[str] = field(default_factory=list)
    committed: set[str] = field(default_factory=set)
    flushes: int = 0
    broken: bool = False

    def accept_raw(self, raw: bytes) -> Received:
        self.pending.append(raw.decode())
        return Received(raw.decode(), new=True)

    def flush(self) -> None:
        self.flushes += 1
        if self.broken:
            self.pending.clear()  # as MeshNode.flush: the batch was taken, and is lost
            raise OSError("disk full")
        self.committed.update(self.pending)
        self.pending.clear()


@asynccontextmanager
async def serving(node: CommittingNode, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setattr(api, "peer_chain", lambda request: ("a certificate",))
    monkeypatch.setattr(api.GossipLimits, "check", lambda self, request, certificate: None)
    app = api.node_app(cast(NodeView, node))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1/mesh/gossip"
    finally:
        await runner.cleanup()


async def test_a_202_comes_only_after_its_message_is_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = CommittingNode()
    async with (
        serving(node, monkeypatch) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http,
    ):

        async def post(n: int) -> None:
            async with http.post(url, data=f"m{n}".encode()) as response:
                assert response.status == 202, await response.text()
                answer = json.loads(await response.read())
                # The answer is out: the message must be committed already.
                assert answer["message_id"] in node.committed

        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(post(n) for n in range(40)))
    assert node.committed == {f"m{n}" for n in range(40)}
    assert 1 <= node.flushes <= 40


async def test_a_failed_commit_is_never_a_202(monkeypatch: pytest.MonkeyPatch) -> None:
    node = CommittingNode(broken=True)
    async with (
        serving(node, monkeypatch) as url,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http,
        http.post(url, data=b"m1") as response,
    ):
        assert response.status == 500
        assert json.loads(await response.read())["error"] == "internal"
    assert node.flushes == 1 and not node.committed
