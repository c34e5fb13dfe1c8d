"""The BRC-104 server under attack (issue 15), on 127.0.0.1 with the client's address
taken from a test header, so that one test plays clients at many addresses.

- A flood of handshakes from one address (or one IPv6 /64) does not push out the
  half-made session of a client elsewhere: it completes its handshake and its first
  request, also when the session table is full of proven sessions.
- General requests are rate limited per client address (before anything is verified:
  an unsigned 429) and per verified identity key (a signed 429), both with
  ``Retry-After``, on the server's injected clock.
- Error bodies stay small, whatever garbage came in.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from trustmesh.api.brc104 import Brc104Server
from trustmesh.api.brc104_demo import demo_app
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.brc103 import http as brc104
from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.encoding import b64encode
from trustmesh.brc103.messages import parse_message_bytes
from trustmesh.brc103.peer import GeneralMessageReceived, HandshakeCompleted, Peer, PeerConfig
from trustmesh.brc103.wallet import Wallet
from trustmesh.io.limits import ResourcePolicy

WAIT = 10.0
SERVER = Wallet.from_hex("d1" * 32)
CLIENT = Wallet.from_hex("d2" * 32)
OTHER = Wallet.from_hex("d3" * 32)
CERTIFIER = Wallet.from_hex("d4" * 32)
REMOTE = "x-test-remote"  # the address the test middleware gives a request
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Reply = tuple[int, CIMultiDictProxy[str], bytes]


@web.middleware
async def remote_from_header(request: web.Request, handler: Handler) -> web.StreamResponse:
    remote = request.headers.get(REMOTE)
    return await handler(request.clone(remote=remote) if remote else request)


@asynccontextmanager
async def serving(server: Brc104Server) -> AsyncIterator[str]:
    app = demo_app(server)
    app.middlewares.insert(0, remote_from_header)  # before the BRC-104 middleware
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


class Client:
    """A BRC-104 client built by hand on a sans-IO peer, at a given address."""

    def __init__(self, http: aiohttp.ClientSession, origin: str, wallet: Wallet) -> None:
        self.http = http
        self.origin = origin
        self.peer = Peer(wallet)
        self.server_key = SERVER.identity_key

    async def post_auth(self, body: bytes, remote: str) -> Reply:
        headers = {REMOTE: remote, "Content-Type": "application/json"}
        async with self.http.post(
            self.origin + brc104.AUTH_PATH, data=body, headers=headers
        ) as response:
            return response.status, response.headers, await response.read()

    async def handshake(self, remote: str) -> None:
        status, _, body = await self.post_auth(self.peer.initiate(0).to_bytes(), remote)
        assert status == 200, body
        events = self.peer.receive(parse_message_bytes(body), 0)
        assert [type(e) for e in events] == [HandshakeCompleted]

    async def get(self, path: str, remote: str, *, verify: bool = True) -> Reply:
        """A signed GET; a signed answer is verified (``verify``) and must be."""
        request_id = brc104.new_request_id()
        payload = brc104.encode_request_payload(request_id, "GET", path, "", [], None)
        message = self.peer.create_general(payload, identity_key=self.server_key)
        headers = {
            **brc104.auth_headers(message, b64encode(request_id)),
            REMOTE: remote,
        }
        async with self.http.get(self.origin + path, headers=headers) as response:
            reply = response.status, response.headers, await response.read()
        if verify and brc104.SIGNATURE in reply[1]:
            assert self.verified(request_id, *reply), "the signed answer does not verify"
        return reply

    def verified(
        self, request_id: bytes, status: int, headers: CIMultiDictProxy[str], body: bytes
    ) -> bool:
        payload = brc104.encode_response_payload(
            request_id, status, brc104.signed_response_headers(headers.items()), body
        )
        events = self.peer.receive(brc104.message_from_headers(headers, payload), 0)
        return any(
            isinstance(e, GeneralMessageReceived) and e.identity_key == self.server_key
            for e in events
        )


def error_of(body: bytes) -> str:
    data = json.loads(body)
    assert data["status"] == "error", data
    return str(data["code"])


# --- a flood of handshakes ------------------------------------------------------------------

FLOODS = {
    "one IPv4 address": ["198.51.100.7"] * 40,
    "one IPv6 /64": [f"2001:db8:1:2::{i:x}" for i in range(1, 41)],
}


@pytest.mark.parametrize("flood", FLOODS.values(), ids=FLOODS.keys())
@pytest.mark.parametrize("proven_first", [0, 11], ids=["empty table", "full of proven"])
async def test_an_honest_client_completes_its_first_request_during_a_flood(
    http: aiohttp.ClientSession, flood: list[str], proven_first: int
) -> None:
    config = PeerConfig(
        max_sessions=12, max_unproven_sessions=8, max_unproven_sessions_per_source=4
    )
    server = Brc104Server(SERVER, config)
    async with serving(server) as origin:
        proven = []
        for index in range(proven_first):
            client = Client(http, origin, Wallet.from_hex(f"{index + 0x100:064x}"))
            await client.handshake(f"192.0.2.{index}")
            assert (await client.get("/hello", f"192.0.2.{index}"))[0] == 200
            proven.append(client)
        honest = Client(http, origin, CLIENT)
        await honest.handshake("203.0.113.5")
        for index, address in enumerate(flood):
            forger = Client(http, origin, Wallet.from_hex(f"{index + 0x200:064x}"))
            await forger.handshake(address)
        status, _, body = await honest.get("/hello", "203.0.113.5")
        assert status == 200, body
        assert json.loads(body) == {"hello": CLIENT.identity_key}
        # The flood took at most one proven client's place (the least recently used).
        answered = [(await c.get("/hello", "192.0.2.99"))[0] for c in proven[1:]]
        assert answered == [200] * len(proven[1:])
        assert len(server.peer.sessions) <= config.max_sessions


# --- rate limits ----------------------------------------------------------------------------


async def test_general_requests_are_limited_per_address(http: aiohttp.ClientSession) -> None:
    now = [0]
    server = Brc104Server(
        SERVER, policy=ResourcePolicy(request_rate=1.0, request_burst=3), clock=lambda: now[0]
    )
    async with serving(server) as origin:
        client, other = Client(http, origin, CLIENT), Client(http, origin, OTHER)
        await client.handshake("10.0.0.1")
        await other.handshake("10.0.0.1")
        assert (await client.get("/hello", "10.0.0.1"))[0] == 200
        assert (await client.get("/hello", "10.0.0.1"))[0] == 200
        assert (await other.get("/hello", "10.0.0.1"))[0] == 200
        # The address has spent its burst, whoever signs.
        status, headers, body = await other.get("/hello", "10.0.0.1")
        assert status == 429
        assert headers["Retry-After"] == "1"
        assert error_of(body) == "ERR_RATE_LIMITED"
        assert brc104.SIGNATURE not in headers  # refused before anything was verified
        # Another address is not affected; the same one is after a second.
        assert (await other.get("/hello", "10.0.0.2"))[0] == 200
        now[0] += 1000
        assert (await other.get("/hello", "10.0.0.1"))[0] == 200
        assert (await other.get("/hello", "10.0.0.1"))[0] == 429


async def test_an_ipv6_client_is_limited_per_64(http: aiohttp.ClientSession) -> None:
    now = [0]
    server = Brc104Server(
        SERVER,
        request_rate_limit=RateLimiter(1.0, 2, clock=lambda: now[0] / 1000),
        clock=lambda: now[0],
    )
    async with serving(server) as origin:
        client = Client(http, origin, CLIENT)
        await client.handshake("2001:db8::1")
        assert (await client.get("/hello", "2001:db8::1"))[0] == 200
        assert (await client.get("/hello", "2001:db8::ffff"))[0] == 200
        assert (await client.get("/hello", "2001:db8:0:0:1::1"))[0] == 429  # the same /64
        assert (await client.get("/hello", "2001:db8:0:1::1"))[0] == 200  # another /64


async def test_general_requests_are_limited_per_identity_with_a_signed_429(
    http: aiohttp.ClientSession,
) -> None:
    now = [0]
    server = Brc104Server(
        SERVER,
        identity_rate_limit=RateLimiter(0.5, 3, clock=lambda: now[0] / 1000),
        clock=lambda: now[0],
    )
    async with serving(server) as origin:
        client, other = Client(http, origin, CLIENT), Client(http, origin, OTHER)
        await client.handshake("10.0.0.1")
        await other.handshake("10.0.0.1")
        for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            assert (await client.get("/hello", address))[0] == 200
        # A fresh address does not help an identity that has spent its burst.
        status, headers, body = await client.get("/hello", "10.0.0.4")
        assert status == 429
        assert headers["Retry-After"] == "2"
        assert error_of(body) == "ERR_RATE_LIMITED"
        assert brc104.SIGNATURE in headers  # verified by Client.get
        assert (await other.get("/hello", "10.0.0.1"))[0] == 200
        now[0] += 2000
        assert (await client.get("/hello", "10.0.0.1"))[0] == 200


async def test_the_default_limits_follow_the_resource_policy() -> None:
    server = Brc104Server(SERVER, policy=ResourcePolicy(request_rate=7.0, request_burst=9))
    for limiter in (server.request_rate_limit, server.identity_rate_limit):
        assert (limiter.rate, limiter.burst) == (7.0, 9)
    default = Brc104Server(SERVER)
    assert default.request_rate_limit.rate == ResourcePolicy().request_rate
    assert default.identity_rate_limit.burst == ResourcePolicy().request_burst


# --- garbage in, small errors out -----------------------------------------------------------

GARBAGE = bytes(range(256)) * 256  # 64 KiB


def certificate_with_field(name: str, value: Any) -> dict[str, Any]:
    master = MasterCertificate.issue(
        CERTIFIER,
        CLIENT.identity_key,
        base64.b64encode(b"trustmesh under attack type!!!!!").decode(),
        {"name": "x"},
    )
    wire = master.reveal(CLIENT, SERVER.identity_key, ["name"]).to_json()
    wire["fields"] = {name: value}
    return wire


def auth_bodies() -> dict[str, bytes]:
    nonce = "A" * 44
    base = {
        "version": "0.1",
        "messageType": "certificateResponse",
        "identityKey": CLIENT.identity_key,
        "nonce": nonce,
        "yourNonce": nonce,
        "initialNonce": nonce,
        "signature": [1],
    }
    text = GARBAGE.decode("latin-1")
    return {
        "raw bytes": GARBAGE,
        "garbage messageType": json.dumps({**base, "messageType": text}).encode(),
        "garbage version": json.dumps({**base, "version": text}).encode(),
        "garbage outpoint": json.dumps(
            {
                **base,
                "certificates": [{**certificate_with_field("n", "v"), "revocationOutpoint": text}],
            }
        ).encode(),
        "garbage field name": json.dumps(
            {**base, "certificates": [certificate_with_field("\x01" * 256, "A" * 70_000)]}
        ).encode(),
    }


async def test_garbage_in_bodies_and_headers_gets_small_400s(
    http: aiohttp.ClientSession,
) -> None:
    """64 KiB of garbage in an AuthMessage body, then in headers (aiohttp takes at most
    8 KiB in each, so 9 junk headers the signature covers and junk in each auth header
    in turn): every answer is an error of less than 1 KiB."""
    junk = "".join(chr(c) for c in range(0x21, 0x7F)) * 80  # 7.5 KB
    extra = {f"x-bsv-junk-{i}": junk for i in range(9)}
    names = [brc104.VERSION, brc104.IDENTITY_KEY, brc104.NONCE, brc104.YOUR_NONCE]
    names += [brc104.SIGNATURE, brc104.REQUEST_ID]
    async with serving(Brc104Server(SERVER)) as origin:
        client = Client(http, origin, CLIENT)
        for what, body in auth_bodies().items():
            assert len(body) >= 64 * 1024
            status, _, reply = await client.post_auth(body, "10.0.0.1")
            assert (status, len(reply) < 1024) == (400, True), (what, reply)
            assert error_of(reply).startswith("ERR_")
        for name in names:
            headers = {
                brc104.REQUEST_ID: b64encode(bytes(32)),
                brc104.VERSION: "0.1",
                brc104.IDENTITY_KEY: CLIENT.identity_key,
                brc104.NONCE: "A" * 44,
                brc104.YOUR_NONCE: "A" * 44,
                brc104.SIGNATURE: "30",
                **extra,
                name: junk,
            }
            assert sum(len(v) for v in headers.values()) >= 64 * 1024
            async with http.get(origin + "/hello", headers=headers) as response:
                reply = await response.read()
            assert response.status in (400, 401), (name, reply)
            assert len(reply) < 1024, (name, reply)
