"""Peer scores are shown (mesh-link.md sections 6.2 and 12): ``GET /v1/mesh/peers`` rows
carry ``score`` and ``graylisted_until``, and ``trustmesh node peers`` prints them (a score
column without ``--json``). The API's node is a stand-in with a real gossip engine, whose
clock is fixed; the client certificate comes from a test header."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from meshtools import T0_MS, MeshPki

from trustmesh.cli import main as cli_main
from trustmesh.cli import node as node_cli
from trustmesh.clock import FakeClock
from trustmesh.io.limits import ResourcePolicy
from trustmesh.mesh.engine import GossipEngine
from trustmesh.mesh.node import PeerInfo
from trustmesh.node import api
from trustmesh.node.api import NodeView

WAIT = 10.0


@dataclass
class FakeConfig:
    policy: ResourcePolicy = field(default_factory=ResourcePolicy)


@dataclass
class FakeTrust:
    def identity_of(self, chain: Any, *, now_ms: int) -> None:
        return None


@dataclass
class FakeNode:
    """What the peers route asks of a node: its id, peer table and gossip engine."""

    engine: GossipEngine
    config: FakeConfig = field(default_factory=FakeConfig)
    trust: FakeTrust = field(default_factory=FakeTrust)
    node_id: str = "node-1"
    peers: dict[str, PeerInfo] = field(default_factory=dict)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path / "ca")
    yield mesh
    mesh.close()


@asynccontextmanager
async def serving(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setattr(api, "peer_chain", lambda request: ("a client certificate",))
    clock = FakeClock(datetime.fromtimestamp((T0_MS + 1000) / 1000, UTC))
    runner = web.AppRunner(api.node_app(cast(NodeView, node), clock=clock), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_peer_rows_carry_the_score_and_the_graylisting(
    pki: MeshPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = GossipEngine("node-1", pki.trust())
    node = FakeNode(engine)
    for peer, status in (
        ("node-2", "connected"),
        ("node-3", "disconnected"),
        ("node-4", "connected"),
    ):
        node.peers[peer] = PeerInfo(peer, "127.0.0.1:7000", status, T0_MS, "outbound", 1)
    # node-3 sent junk enough to be graylisted (and has since gone); node-4 one frame.
    engine.receive_batch([b"junk"] * 6, sender="node-3", peers=[], now_ms=T0_MS)
    engine.forget_peer("node-3")
    engine.receive_batch([b"junk"], sender="node-4", peers=[], now_ms=T0_MS)
    async with (
        serving(node, monkeypatch) as origin,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http,
        http.get(origin + "/v1/mesh/peers") as response,
    ):
        assert response.status == 200
        body = await response.json()
    rows = {row["node_id"]: row for row in body["peers"]}
    decay = 0.5 ** (1000 / 300_000)  # half-life 5 min; the API's clock is 1 s later
    assert rows["node-2"]["score"] == 0.0 and rows["node-2"]["graylisted_until"] is None
    assert rows["node-3"]["score"] == round(-60 * decay, 3)
    assert rows["node-3"]["graylisted_until"] == T0_MS + 300_000  # a 5 min cooldown
    assert rows["node-4"]["score"] == round(-10 * decay, 3)
    assert rows["node-4"]["graylisted_until"] is None


ANSWER = {
    "node_id": "node-1",
    "peers": [
        {
            "node_id": "node-2",
            "status": "connected",
            "last_seen": "2026-01-05T12:10:00+00:00",
            "address": "127.0.0.1:7002",
            "serial": "abc12",
            "score": 0.0,
            "graylisted_until": None,
        },
        {
            "node_id": "node-3",
            "status": "disconnected",
            "last_seen": "2026-01-05T12:09:00+00:00",
            "address": None,
            "score": -59.862,
            "graylisted_until": T0_MS + 300_000,
        },
    ],
}


def test_node_peers_prints_a_score_column_and_json_keeps_the_fields(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(node_cli, "_get", lambda directory, path, **params: ANSWER)
    runner = CliRunner()
    table = runner.invoke(cli_main.cli, ["node", "peers", "--dir", str(tmp_path)])
    assert table.exit_code == 0, table.output
    header, two, three = table.output.splitlines()
    assert header.split() == ["NODE_ID", "STATUS", "SCORE", "LAST_SEEN", "ADDRESS", "SERIAL"]
    assert two.split() == [
        "node-2",
        "connected",
        "0.0",
        "2026-01-05T12:10:00+00:00",
        "127.0.0.1:7002",
        "0ABC12",  # as openssl prints a serial
    ]
    assert three.split() == [
        "node-3",
        "disconnected",
        "-59.9",
        "2026-01-05T12:09:00+00:00",
        "-",
        "-",
        "graylisted",
    ]
    as_json = runner.invoke(cli_main.cli, ["node", "peers", "--dir", str(tmp_path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.output)["peers"]
    assert [(r["score"], r["graylisted_until"]) for r in rows] == [
        (0.0, None),
        (-59.862, T0_MS + 300_000),
    ]
