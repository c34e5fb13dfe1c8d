"""The node API under attack (issue 15): ``POST /v1/mesh/gossip`` is rate limited per
client certificate and per client address (an IPv6 one per /64), on an injected clock,
with the node's resource policy; a 429 is JSON with ``Retry-After``; 64 KiB of garbage
gets a 400 of less than 1 KiB.

The node is a stand-in (the API's part is under test, not gossip): its trust view
accepts any chain, and the client's certificate and address come from test headers.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.clock import FakeClock
from trustmesh.io.limits import ResourcePolicy
from trustmesh.mesh.engine import Received
from trustmesh.mesh.gossip import decode_message
from trustmesh.node import api
from trustmesh.node.api import NodeView

WAIT = 10.0
CERT = "x-test-certificate"  # which test certificate the request comes with
REMOTE = "x-test-remote"  # the address the request comes from
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def certificate(name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )


CERTIFICATES = {name: certificate(name) for name in ("a", "b", "c", "d")}


@dataclass
class FakeConfig:
    policy: ResourcePolicy


@dataclass
class FakeTrust:
    def identity_of(self, chain: Any, *, now_ms: int) -> None:
        return None


@dataclass
class FakeNode:
    """What the API asks of a node, and no more."""

    config: FakeConfig
    trust: FakeTrust = field(default_factory=FakeTrust)
    node_id: str = "node-1.test"
    peers: dict[str, Any] = field(default_factory=dict)
    accepted: int = 0

    def accept_raw(self, raw: bytes) -> Received:
        message = decode_message(raw)  # garbage is refused as by a real node
        self.accepted += 1
        return Received(message.message_id, new=True)


@web.middleware
async def from_test_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    remote = request.headers.get(REMOTE)
    return await handler(request.clone(remote=remote) if remote else request)


@asynccontextmanager
async def serving(
    node: FakeNode, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> AsyncIterator[str]:
    def chain_of(request: web.Request) -> tuple[x509.Certificate, ...]:
        name = request.headers.get(CERT)
        return (CERTIFICATES[name],) if name else ()

    monkeypatch.setattr(api, "peer_chain", chain_of)
    app = api.node_app(cast(NodeView, node), **kwargs)
    app.middlewares.insert(0, from_test_headers)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


class Poster:
    def __init__(self, http: aiohttp.ClientSession, origin: str) -> None:
        self.http = http
        self.origin = origin
        self.count = 0

    async def gossip(self, cert: str, remote: str) -> tuple[int, dict[str, str], bytes]:
        """POST a gossip message (garbage: the stand-in refuses it with 400 once it is
        past the limits, which is all these tests need to tell the two apart)."""
        self.count += 1
        headers = {CERT: cert, REMOTE: remote}
        async with self.http.post(
            self.origin + "/v1/mesh/gossip", data=b"{}", headers=headers
        ) as response:
            return response.status, dict(response.headers), await response.read()

    async def status(self, cert: str, remote: str) -> int:
        return (await self.gossip(cert, remote))[0]


SMALL = ResourcePolicy(request_rate=1.0, request_burst=3)
PASSED = 400  # past the limits: the stand-in node refuses the empty object


async def test_gossip_is_limited_per_client_certificate(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    node = FakeNode(FakeConfig(SMALL))
    async with serving(node, monkeypatch, clock=clock) as origin:
        post = Poster(http, origin)
        for index in range(3):
            assert await post.status("a", f"10.0.0.{index}") == PASSED
        # A fresh address does not help a certificate that has spent its burst.
        status, headers, body = await post.gossip("a", "10.0.0.9")
        assert status == 429
        assert headers["Retry-After"] == "1"
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["error"] == "rate_limited"
        assert "certificate" in json.loads(body)["message"]
        assert await post.status("b", "10.0.0.9") == PASSED
        clock.advance(1.0)
        assert await post.status("a", "10.0.0.9") == PASSED
        assert await post.status("a", "10.0.0.9") == 429


async def test_gossip_is_limited_per_client_address(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    node = FakeNode(FakeConfig(SMALL))
    async with serving(node, monkeypatch, clock=clock) as origin:
        post = Poster(http, origin)
        for cert in ("a", "b", "c"):
            assert await post.status(cert, "2001:db8::1") == PASSED
        # Another certificate from the same /64 does not help.
        status, headers, body = await post.gossip("d", "2001:db8::2")
        assert status == 429
        assert headers["Retry-After"] == "1"
        assert "address" in json.loads(body)["message"]
        assert await post.status("d", "2001:db8:0:1::1") == PASSED  # another /64
        # Only gossip is limited: the rest of the API still answers that address.
        headers = {CERT: "d", REMOTE: "2001:db8::2"}
        async with http.get(origin + "/v1/mesh/peers", headers=headers) as response:
            assert response.status == 200
        clock.advance(1.0)
        assert await post.status("d", "2001:db8::3") == PASSED


async def test_an_explicit_policy_wins_over_the_nodes(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = FakeNode(FakeConfig(ResourcePolicy()))
    one = ResourcePolicy(request_rate=1.0, request_burst=1)
    async with serving(node, monkeypatch, policy=one, clock=FakeClock()) as origin:
        post = Poster(http, origin)
        assert await post.status("a", "10.0.0.1") == PASSED
        assert await post.status("a", "10.0.0.1") == 429


async def test_64_kib_of_garbage_gets_a_small_400(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown fields are named in the error; 64 KiB of them is not echoed."""
    node = FakeNode(FakeConfig(ResourcePolicy()))
    names = {f"\u00e9\u0001{i:05d}" + "\u00e9" * 50: 0 for i in range(210)}
    bodies = [
        json.dumps(names).encode(),
        bytes(range(256)) * 256,
        json.dumps({"message_id": "\u00e9" * 65536}).encode(),
    ]
    async with serving(node, monkeypatch) as origin:
        for body in bodies:
            assert len(body) >= 64 * 1024
            headers = {CERT: "a", REMOTE: "10.0.0.1"}
            async with http.post(
                origin + "/v1/mesh/gossip", data=body, headers=headers
            ) as response:
                reply = await response.read()
            assert response.status == 400, reply
            assert len(reply) < 1024, reply
            assert json.loads(reply)["error"] == "malformed"
    assert node.accepted == 0
