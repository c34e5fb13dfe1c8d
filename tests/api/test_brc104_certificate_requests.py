"""Certificates requested by our BRC-104 server (issue 22): a client that holds none of
them is refused at once, whether it says so (an empty certificateResponse, before or
after its request) or stays silent (the TS AuthFetch); a client that shows one later is
served; and held requests are bounded per session, per address and in all, and counted.

The TS client against this server, and our client against the reference express server,
are in tests/interop/test_brc104_certificate_requests_ts.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from trustmesh.api.authfetch import AuthFetch, UnauthenticatedResponseError
from trustmesh.api.brc104 import CERTIFICATE_GRACE_MS, Brc104Server
from trustmesh.api.brc104_demo import demo_app
from trustmesh.brc103 import http as brc104
from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.encoding import b64encode
from trustmesh.brc103.messages import AuthMessage, MessageType, RequestedCertificates
from trustmesh.brc103.peer import (
    MAX_SCALED_GRACE_MS,
    Event,
    GeneralMessageReceived,
    Peer,
    PeerConfig,
)
from trustmesh.brc103.wallet import Wallet

TIMEOUT = 30.0  # the certificate timeout here (the default)
WAIT = 10.0  # the bound on any one wait
# "At once": far below the certificate timeout (the bug held requests 30 s + 5 s), and
# generous for a loaded machine.
PROMPT = 5.0
# The longest grace the server computes (the client's handshake-to-request time, doubled,
# is capped), plus that.
GRACE_BOUND = MAX_SCALED_GRACE_MS / 1000 + PROMPT
SERVER = Wallet.from_hex("a3" * 32)
CLIENT = Wallet.from_hex("b4" * 32)
OTHER_CLIENT = Wallet.from_hex("b5" * 32)
CERTIFIER = Wallet.from_hex("c5" * 32)
CERT_TYPE = base64.b64encode(b"trustmesh brc104 cert requests!!").decode()
SILENT = PeerConfig(answer_certificate_requests=False)  # says nothing, as the TS AuthFetch


def requested() -> RequestedCertificates:
    return RequestedCertificates((CERTIFIER.identity_key,), {CERT_TYPE: ("name",)})


def master(subject: Wallet = CLIENT) -> MasterCertificate:
    return MasterCertificate.issue(
        CERTIFIER, subject.identity_key, CERT_TYPE, {"name": "Alice", "role": "hidden"}
    )


def cert_server(**kwargs: Any) -> Brc104Server:
    """Asks every client for a "name"; holds requests at most TIMEOUT seconds."""
    config = PeerConfig(
        requested_certificates=requested(), certificate_timeout_ms=int(TIMEOUT * 1000)
    )
    return Brc104Server(SERVER, config, **kwargs)


@asynccontextmanager
async def serving(server: Brc104Server) -> AsyncIterator[str]:
    runner = web.AppRunner(demo_app(server), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT * 2)) as session:
        yield session


def signed_request(peer: Peer, server_key: str, path: str = "/hello") -> dict[str, str]:
    request_id = brc104.new_request_id()
    payload = brc104.encode_request_payload(request_id, "GET", path, "", [], None)
    message = peer.create_general(payload, identity_key=server_key)
    return brc104.auth_headers(message, b64encode(request_id))


async def send(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with http.request(method, url, headers=headers, data=body) as response:
        return response.status, response.headers, await response.read()


async def post_auth(http: aiohttp.ClientSession, origin: str, message: AuthMessage) -> int:
    status, _, _ = await send(http, "POST", origin + brc104.AUTH_PATH, {}, message.to_bytes())
    return status


def error_of(body: bytes) -> tuple[str, str]:
    data = json.loads(body)
    assert data["status"] == "error", data
    return str(data["code"]), str(data.get("description", ""))


def watch_holds(
    server: Brc104Server, monkeypatch: pytest.MonkeyPatch, count: int = 1
) -> asyncio.Event:
    """An event set once the server's peer has held ``count`` general messages."""
    held = asyncio.Event()
    seen = 0
    receive = server.peer.receive

    def watched(message: AuthMessage, now_ms: int, *, source: str | None = None) -> list[Event]:
        nonlocal seen
        events = receive(message, now_ms, source=source)
        mine = [e for e in events if isinstance(e, GeneralMessageReceived) and e.message is message]
        if message.message_type is MessageType.GENERAL and not mine:
            seen += 1
            if seen >= count:
                held.set()
        return events

    monkeypatch.setattr(server.peer, "receive", watched)
    return held


# --- a client with none of the certificates --------------------------------------------------


async def test_an_empty_certificate_response_before_the_request_refuses_it_at_once(
    http: aiohttp.ClientSession,
) -> None:
    """The client says it has none, then asks: 401 at once (the bug: held for the whole
    certificate timeout, because only requests already held were let go)."""
    server = cert_server(certificate_grace_ms=None)
    async with serving(server) as origin, AuthFetch(CLIENT, SILENT) as client:
        server_key = await client.server_identity(origin)
        none = client.peer.create_certificate_response([], identity_key=server_key)
        reply = await send(http, "POST", origin + brc104.AUTH_PATH, {}, none.to_bytes())
        for _ in range(2):  # every request after it
            started = time.monotonic()
            status, headers, body = await send(
                http, "GET", origin + "/hello", signed_request(client.peer, server_key)
            )
            assert time.monotonic() - started < PROMPT
            assert status == 401
            assert brc104.SIGNATURE not in headers
            assert error_of(body)[1].startswith("ERR_CERTIFICATES_MISSING")
    # Answered as the reference middleware answers it ({"status": "No certificates provided"}).
    assert reply[0] == 400
    assert error_of(reply[2]) == ("ERR_CERTIFICATES_MISSING", "No certificates provided")
    assert server.held_requests == 0


async def test_our_client_without_certificates_is_refused_at_once() -> None:
    """Our AuthFetch answers the handshake's request with an empty certificateResponse
    at once (the bug: it sent nothing, and the server held its request for the timeout)."""
    server = cert_server(certificate_grace_ms=None)  # no help from the grace
    async with serving(server) as origin, AuthFetch(CLIENT, request_timeout=WAIT * 2) as client:
        started = time.monotonic()
        with pytest.raises(UnauthenticatedResponseError) as info:
            await client.fetch(origin + "/hello")
        elapsed = time.monotonic() - started
    assert info.value.status == 401
    assert "ERR_CERTIFICATES_MISSING" in info.value.body.decode()
    assert elapsed < PROMPT
    assert server.peer.sessions.held_total == 0


async def test_a_silent_client_is_refused_after_the_grace_then_served_once_it_shows_one(
    http: aiohttp.ClientSession,
) -> None:
    """A client that sends no certificateResponse at all (the TS AuthFetch holding no
    matching certificate) gets its 401 after the grace, not the timeout; its next request
    is refused at once; and a certificate shown later still opens the session."""
    server = cert_server()
    async with serving(server) as origin, AuthFetch(CLIENT, SILENT) as client:
        server_key = await client.server_identity(origin)
        started = time.monotonic()
        status, _, body = await send(
            http, "GET", origin + "/hello", signed_request(client.peer, server_key)
        )
        elapsed = time.monotonic() - started
        assert status == 401
        assert error_of(body)[1].startswith("ERR_CERTIFICATES_MISSING")
        assert CERTIFICATE_GRACE_MS / 1000 * 0.9 <= elapsed < GRACE_BOUND

        started = time.monotonic()
        status, _, body = await send(
            http, "GET", origin + "/hello", signed_request(client.peer, server_key)
        )
        assert status == 401
        assert time.monotonic() - started < PROMPT  # not held again

        shown = master().reveal(CLIENT, server_key, ["name"])
        answer = client.peer.create_certificate_response([shown], identity_key=server_key)
        assert await post_auth(http, origin, answer) == 204
        response = await client.fetch(origin + "/hello")
    assert response.status == 200
    assert json.loads(response.body)["certificates"][0]["fields"] == {"name": "Alice"}
    assert server.held_requests == 0


async def test_a_certificate_that_beats_the_grace_releases_the_held_request(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = cert_server()
    held = watch_holds(server, monkeypatch)
    async with serving(server) as origin, AuthFetch(CLIENT, SILENT) as client:
        server_key = await client.server_identity(origin)
        async with asyncio.timeout(WAIT):
            first = asyncio.create_task(
                send(http, "GET", origin + "/hello", signed_request(client.peer, server_key))
            )
            await held.wait()
            assert server.held_requests == 1
            shown = master().reveal(CLIENT, server_key, ["name"])
            answer = client.peer.create_certificate_response([shown], identity_key=server_key)
            assert await post_auth(http, origin, answer) == 204
            status, headers, body = await first
    assert status == 200
    assert headers[brc104.IDENTITY_KEY] == server_key
    assert json.loads(body)["certificates"][0]["fields"] == {"name": "Alice"}
    assert server.held_requests == 0


async def test_a_refused_certificate_ends_the_wait_within_the_grace(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate that fails the check is refused (401 with its reason, as the
    reference refuses the message); the request it was meant for gets its 401 after the
    grace, not the certificate timeout."""
    server = cert_server()
    held = watch_holds(server, monkeypatch)
    async with serving(server) as origin, AuthFetch(CLIENT, SILENT) as client:
        server_key = await client.server_identity(origin)
        started = time.monotonic()
        async with asyncio.timeout(WAIT):
            first = asyncio.create_task(
                send(http, "GET", origin + "/hello", signed_request(client.peer, server_key))
            )
            await held.wait()
            other = MasterCertificate.issue(  # the certifier we did not ask for
                OTHER_CLIENT, CLIENT.identity_key, CERT_TYPE, {"name": "Mallory"}
            )
            shown = other.reveal(CLIENT, server_key, ["name"])
            answer = client.peer.create_certificate_response([shown], identity_key=server_key)
            reply = await send(http, "POST", origin + brc104.AUTH_PATH, {}, answer.to_bytes())
            assert reply[0] == 401
            assert error_of(reply[2])[0] == "ERR_UNREQUESTED_CERTIFICATE"
            status, _, body = await first
    assert status == 401
    assert error_of(body)[1].startswith("ERR_CERTIFICATES_MISSING")
    assert time.monotonic() - started < GRACE_BOUND


# --- held requests are bounded ----------------------------------------------------------------


async def test_held_requests_are_bounded_per_address_and_counted(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = cert_server(certificate_grace_ms=None, max_held_requests_per_source=2)
    held = watch_holds(server, monkeypatch, count=2)
    async with serving(server) as origin, AuthFetch(CLIENT, SILENT) as client:
        server_key = await client.server_identity(origin)
        async with asyncio.timeout(WAIT):
            waiting = [
                asyncio.create_task(
                    send(http, "GET", origin + "/hello", signed_request(client.peer, server_key))
                )
                for _ in range(2)
            ]
            await held.wait()
            assert server.held_requests == 2
            status, headers, body = await send(
                http, "GET", origin + "/hello", signed_request(client.peer, server_key)
            )
            assert status == 429
            assert error_of(body)[0] == "ERR_RATE_LIMITED"
            assert int(headers["Retry-After"]) >= 1
            assert server.stats.counts["held.refused_per_source"] == 1
            shown = master().reveal(CLIENT, server_key, ["name"])
            answer = client.peer.create_certificate_response([shown], identity_key=server_key)
            assert await post_auth(http, origin, answer) == 204
            results = await asyncio.gather(*waiting)
    assert [status for status, _, _ in results] == [200, 200]
    assert server.held_requests == 0


async def test_at_the_cap_on_all_a_newcomer_pushes_out_the_oldest_held_request(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One address (both clients here): its own oldest held request makes room (429)."""
    server = cert_server(certificate_grace_ms=None, max_held_requests=1)
    held = watch_holds(server, monkeypatch)
    async with (
        serving(server) as origin,
        AuthFetch(CLIENT, SILENT) as client,
        AuthFetch(OTHER_CLIENT, SILENT) as other,
    ):
        server_key = await client.server_identity(origin)
        await other.server_identity(origin)
        async with asyncio.timeout(WAIT):
            first = asyncio.create_task(
                send(http, "GET", origin + "/hello", signed_request(client.peer, server_key))
            )
            await held.wait()
            second = asyncio.create_task(
                send(http, "GET", origin + "/hello", signed_request(other.peer, server_key))
            )
            status, headers, body = await first
            assert status == 429
            assert error_of(body)[0] == "ERR_RATE_LIMITED"
            assert int(headers["Retry-After"]) >= 1
            assert server.stats.counts["held.evicted_total"] == 1
            assert server.held_requests == 1
            none = other.peer.create_certificate_response([], identity_key=server_key)
            assert await post_auth(http, origin, none) == 400
            status, _, _ = await second
    assert status == 401
    assert server.held_requests == 0
    assert server.peer.sessions.held_total == 0


async def test_addresses_that_fill_every_slot_cannot_keep_out_a_newcomer(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug: a few addresses holding every slot (within their own caps) had every
    honest client's first request, which always needs a slot, refused with 429. Now the
    oldest held request of the address holding the most gives way."""
    server = cert_server(
        certificate_grace_ms=None, max_held_requests=2, max_held_requests_per_source=2
    )
    held = watch_holds(server, monkeypatch, count=2)
    attacker = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with (
        serving(server) as origin,
        AuthFetch(OTHER_CLIENT, SILENT) as flooder,
        AuthFetch(CLIENT, SILENT) as honest,
        aiohttp.ClientSession(connector=attacker) as attacker_http,
    ):
        server_key = await flooder.server_identity(origin)
        await honest.server_identity(origin)
        async with asyncio.timeout(WAIT):
            flood = [
                asyncio.create_task(
                    send(
                        attacker_http,
                        "GET",
                        origin + "/hello",
                        signed_request(flooder.peer, server_key),
                    )
                )
                for _ in range(2)
            ]
            await held.wait()
            assert server.held_requests == 2
            newcomer = asyncio.create_task(
                send(http, "GET", origin + "/hello", signed_request(honest.peer, server_key))
            )
            done, pending = await asyncio.wait(flood, return_when=asyncio.FIRST_COMPLETED)
            [evicted] = done
            assert evicted.result()[0] == 429
            assert not newcomer.done()
            assert server.held_requests == 2
            assert server.stats.counts["held.evicted_total"] == 1
            shown = master().reveal(CLIENT, server_key, ["name"])
            answer = honest.peer.create_certificate_response([shown], identity_key=server_key)
            assert await post_auth(http, origin, answer) == 204
            status, _, body = await newcomer
            assert status == 200, body
            none = flooder.peer.create_certificate_response([], identity_key=server_key)
            assert await post_auth(attacker_http, origin, none) == 400
            [rest] = pending
            assert (await rest)[0] == 401
    assert server.held_requests == 0
    assert server.peer.sessions.held_total == 0


async def test_a_forged_request_pushes_out_no_held_request(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a request that verifies (and is held) makes room at the cap on all."""
    server = cert_server(certificate_grace_ms=None, max_held_requests=1)
    held = watch_holds(server, monkeypatch)
    async with serving(server) as origin, AuthFetch(CLIENT, SILENT) as client:
        server_key = await client.server_identity(origin)
        async with asyncio.timeout(WAIT):
            first = asyncio.create_task(
                send(http, "GET", origin + "/hello", signed_request(client.peer, server_key))
            )
            await held.wait()
            forged = signed_request(client.peer, server_key)
            signature = bytearray(bytes.fromhex(forged[brc104.SIGNATURE]))
            signature[-1] ^= 1
            forged[brc104.SIGNATURE] = signature.hex()
            status, _, _ = await send(http, "GET", origin + "/hello", forged)
            assert status == 401
            assert not first.done() and server.held_requests == 1
            assert "held.evicted_total" not in server.stats.counts
            none = client.peer.create_certificate_response([], identity_key=server_key)
            assert await post_auth(http, origin, none) == 400
            status, _, _ = await first
    assert status == 401
    assert server.held_requests == 0


def test_the_default_grace_gives_a_wallet_a_moment() -> None:
    assert CERTIFICATE_GRACE_MS == 1_000
    assert Brc104Server(SERVER).peer.config.certificate_grace_ms == 1_000


async def test_held_requests_are_bounded_per_session(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = PeerConfig(
        requested_certificates=requested(),
        certificate_timeout_ms=int(TIMEOUT * 1000),
        max_held_messages=1,
    )
    server = Brc104Server(SERVER, config, certificate_grace_ms=None)
    held = watch_holds(server, monkeypatch)
    async with serving(server) as origin, AuthFetch(CLIENT, SILENT) as client:
        server_key = await client.server_identity(origin)
        async with asyncio.timeout(WAIT):
            first = asyncio.create_task(
                send(http, "GET", origin + "/hello", signed_request(client.peer, server_key))
            )
            await held.wait()
            status, _, body = await send(
                http, "GET", origin + "/hello", signed_request(client.peer, server_key)
            )
            assert status == 401
            assert "too many general messages held" in error_of(body)[1]
            none = client.peer.create_certificate_response([], identity_key=server_key)
            assert await post_auth(http, origin, none) == 400
            status, _, _ = await first
    assert status == 401
    assert server.held_requests == 0
    assert server.peer.sessions.held_total == 0
