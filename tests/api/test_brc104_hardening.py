"""BRC-104 after the hardening round: our aiohttp middleware (Brc104Server + the demo app)
and our AuthFetch client on 127.0.0.1, in-process.

- A request held for the client's certificates always ends: 401 at the certificate
  timeout, or at the timeout plus the margin if the peer never settles it; a second
  request reusing its nonce is refused at once and does not disturb the first; an empty
  certificateResponse ends the hold at once.
- A general message POSTed to /.well-known/auth is a 400.
- Signed header names are sorted with ``localeCompare`` (``_``, ``-``, ``.`` and digits
  before letters) in requests and responses alike.
- AuthFetch reads bodies that arrive in pieces, times out every call as TransportError
  (on a caller's own ``aiohttp`` session too), leaves no session behind a failed
  handshake, and reports which headers were signed and the server's certificates.
- ``decode_request_payload`` against the recorded vectors, and fuzzed (Hypothesis).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.typedefs import Middleware
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDictProxy

from trustmesh.api import brc104 as brc104_server
from trustmesh.api.authfetch import AuthFetch, UnauthenticatedResponseError
from trustmesh.api.brc104 import Brc104Server
from trustmesh.api.brc104_demo import demo_app
from trustmesh.brc103 import http as brc104
from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.encoding import b64encode
from trustmesh.brc103.errors import Brc103Error, TransportError
from trustmesh.brc103.messages import AuthMessage, MessageType, RequestedCertificates
from trustmesh.brc103.peer import Event, GeneralMessageReceived, Peer, PeerConfig
from trustmesh.brc103.wallet import Wallet
from trustmesh.errors import DecodeError

WAIT = 5.0  # upper bound on any one request or wait; each takes far less
SERVER = Wallet.from_hex("a7" * 32)
CLIENT = Wallet.from_hex("b8" * 32)
CERTIFIER = Wallet.from_hex("c9" * 32)
CERT_TYPE = base64.b64encode(b"trustmesh brc104 hardening type!").decode()
VECTORS = Path(__file__).parents[1] / "brc103" / "vectors" / "http_request_payloads.json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Header names where localeCompare and byte order disagree, in localeCompare order as
# Node 20 sorts them (`names.sort((a, b) => a.localeCompare(b))`).
ODD_NAMES = [
    "x-bsv-a",
    "x-bsv-a_b",
    "x-bsv-a-b",
    "x-bsv-a.b",
    "x-bsv-a1",
    "x-bsv-a2",
    "x-bsv-aa",
    "x-bsv-ab",
    "x-bsv-b",
]


# --- servers and helpers --------------------------------------------------------------------


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on 127.0.0.1, a free port; yields its origin."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 that reads whatever comes and never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def requested() -> RequestedCertificates:
    return RequestedCertificates((CERTIFIER.identity_key,), {CERT_TYPE: ("name",)})


def master(subject: Wallet, name: str) -> MasterCertificate:
    return MasterCertificate.issue(
        CERTIFIER, subject.identity_key, CERT_TYPE, {"name": name, "role": "hidden"}
    )


def cert_server(timeout_ms: int, **kwargs: Any) -> Brc104Server:
    """A server that asks every client for a certificate."""
    config = PeerConfig(requested_certificates=requested(), certificate_timeout_ms=timeout_ms)
    return Brc104Server(SERVER, config, **kwargs)


def signed_request(
    peer: Peer,
    server_key: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    *,
    byte_order: bool = False,
) -> dict[str, str]:
    """Application ``headers`` plus the ``x-bsv-auth-*`` ones of a request signed on
    ``peer``'s session (signed headers sorted byte-wise with ``byte_order``)."""
    headers = dict(headers or {})
    request_id = brc104.new_request_id()
    signed = brc104.signed_request_headers(headers.items())
    if byte_order:
        signed = sorted(signed)
    payload = brc104.encode_request_payload(request_id, method, path, "", signed, body)
    message = peer.create_general(payload, identity_key=server_key)
    return {**headers, **brc104.auth_headers(message, b64encode(request_id))}


async def send(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with http.request(method, url, headers=headers, data=body) as response:
        return response.status, response.headers, await response.read()


def error_of(body: bytes) -> tuple[str, str]:
    """(code, description) of a JSON error reply."""
    data = json.loads(body)
    assert data["status"] == "error", data
    return str(data["code"]), str(data.get("description", ""))


def watch_holds(server: Brc104Server, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set once the server's peer has held a general message."""
    held = asyncio.Event()
    receive = server.peer.receive

    def watched(message: AuthMessage, now_ms: int, *, source: str | None = None) -> list[Event]:
        events = receive(message, now_ms, source=source)
        mine = [e for e in events if isinstance(e, GeneralMessageReceived) and e.message is message]
        if message.message_type is MessageType.GENERAL and not mine:
            held.set()
        return events

    monkeypatch.setattr(server.peer, "receive", watched)
    return held


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


# --- held requests always end -------------------------------------------------------------


async def test_a_held_request_gets_401_within_the_certificate_timeout() -> None:
    server = cert_server(300)
    silent = PeerConfig(answer_certificate_requests=False)  # never says it has none
    async with (
        serving(demo_app(server)) as origin,
        AuthFetch(CLIENT, silent, request_timeout=WAIT) as client,
    ):
        await client.server_identity(origin)
        started = time.monotonic()
        with pytest.raises(UnauthenticatedResponseError) as info:
            await client.fetch(origin + "/hello")
        held = time.monotonic() - started
    assert info.value.status == 401
    code, description = error_of(info.value.body)
    assert code == "ERR_AUTH_FAILED"
    assert description.startswith("ERR_CERTIFICATE_TIMEOUT")
    assert 0.25 <= held < 0.3 + 1.5
    assert server.peer.sessions.held_total == 0


async def test_a_hold_the_peer_never_settles_ends_at_the_margin(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server clock that stands still: the peer's certificate deadline never comes,
    and the request still gets its 401 at the certificate timeout plus the margin."""
    monkeypatch.setattr(brc104_server, "HOLD_MARGIN", 0.3)
    server = cert_server(200, clock=lambda: 0)
    silent = PeerConfig(answer_certificate_requests=False)
    async with serving(demo_app(server)) as origin, AuthFetch(CLIENT, silent) as client:
        server_key = await client.server_identity(origin)
        headers = signed_request(client.peer, server_key, "GET", "/hello")
        started = time.monotonic()
        status, _, body = await send(http, "GET", origin + "/hello", headers)
        held = time.monotonic() - started
    assert status == 401
    assert error_of(body)[1].startswith("ERR_CERTIFICATE_TIMEOUT")
    assert 0.45 <= held < 0.5 + 1.5


@pytest.mark.parametrize("outcome", ["certificate arrives", "timeout"])
async def test_a_second_request_with_the_same_nonce_is_refused_and_the_first_still_ends(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    timeout_ms = 4000 if outcome == "certificate arrives" else 300
    server = cert_server(timeout_ms)
    held = watch_holds(server, monkeypatch)
    config = PeerConfig(certificates=[master(CLIENT, "Carla")], answer_certificate_requests=False)
    async with serving(demo_app(server)) as origin, AuthFetch(CLIENT, config) as client:
        server_key = await client.server_identity(origin)
        headers = signed_request(client.peer, server_key, "GET", "/hello")
        async with asyncio.timeout(WAIT):
            first = asyncio.create_task(send(http, "GET", origin + "/hello", headers))
            await held.wait()
            started = time.monotonic()
            status, _, body = await send(http, "GET", origin + "/hello", headers)
            assert time.monotonic() - started < timeout_ms / 1000  # refused, not held
            assert status == 401
            assert error_of(body)[1].startswith("ERR_REPLAYED_MESSAGE")
            if outcome == "certificate arrives":
                shown = master(CLIENT, "Carla").reveal(CLIENT, server_key, ["name"])
                answer = client.peer.create_certificate_response([shown], identity_key=server_key)
                reply = await send(http, "POST", origin + brc104.AUTH_PATH, {}, answer.to_bytes())
                assert reply[0] == 204
            status, reply_headers, body = await first
    if outcome == "certificate arrives":
        assert status == 200
        assert reply_headers[brc104.IDENTITY_KEY] == server_key
        assert json.loads(body)["certificates"][0]["fields"] == {"name": "Carla"}
    else:
        assert status == 401
        assert error_of(body)[1].startswith("ERR_CERTIFICATE_TIMEOUT")
    assert server.peer.sessions.held_total == 0


async def test_an_empty_certificate_response_ends_a_held_request_at_once(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that has none of the certificates and says so (an empty
    certificateResponse, as the reference answers) gets its 401 without waiting."""
    server = cert_server(int(WAIT * 1000), certificate_grace_ms=None)
    held = watch_holds(server, monkeypatch)
    silent = PeerConfig(answer_certificate_requests=False)  # answered by hand below
    async with serving(demo_app(server)) as origin, AuthFetch(CLIENT, silent) as client:
        server_key = await client.server_identity(origin)
        headers = signed_request(client.peer, server_key, "GET", "/hello")
        async with asyncio.timeout(WAIT):
            first = asyncio.create_task(send(http, "GET", origin + "/hello", headers))
            await held.wait()
            started = time.monotonic()
            none = client.peer.create_certificate_response([], identity_key=server_key)
            reply = await send(http, "POST", origin + brc104.AUTH_PATH, {}, none.to_bytes())
            assert reply[0] == 400  # as the reference: "No certificates provided"
            assert error_of(reply[2])[0] == "ERR_CERTIFICATES_MISSING"
            status, _, body = await first
            ended = time.monotonic() - started
    assert status == 401
    assert error_of(body)[1].startswith("ERR_CERTIFICATES_MISSING")
    assert ended < 1.0
    assert server.peer.sessions.held_total == 0


async def test_a_general_message_posted_to_the_auth_endpoint_is_a_400(
    http: aiohttp.ClientSession,
) -> None:
    async with (
        serving(demo_app(Brc104Server(SERVER))) as origin,
        AuthFetch(CLIENT, request_timeout=WAIT) as client,
    ):
        server_key = await client.server_identity(origin)
        message = client.peer.create_general(b'{"a":1}', identity_key=server_key)
        json_type = {"content-type": "application/json"}
        status, reply_headers, body = await send(
            http, "POST", origin + brc104.AUTH_PATH, json_type, message.to_bytes()
        )
        assert status == 400
        assert error_of(body)[0] == "ERR_MALFORMED_MESSAGE"
        assert brc104.SIGNATURE not in reply_headers
        assert (await client.fetch(origin + "/hello")).status == 200  # the session is fine


# --- localeCompare order of signed headers ------------------------------------------------


def test_signed_headers_are_sorted_with_locale_compare() -> None:
    shuffled = [(name, name[-3:]) for name in reversed(ODD_NAMES)]
    request = brc104.signed_request_headers([("Authorization", "t"), *shuffled])
    assert [name for name, _ in request] == ["authorization", *ODD_NAMES]
    response = brc104.signed_response_headers([*shuffled, ("Content-Type", "x/y")])
    assert [name for name, _ in response] == ODD_NAMES
    assert sorted(ODD_NAMES) != ODD_NAMES  # byte order would differ


def header_app(server: Brc104Server) -> web.Application:
    """A route that answers with the request's ``x-bsv-*`` headers as JSON and with
    response headers whose names need localeCompare order."""

    async def headers(request: web.Request) -> web.Response:
        seen = {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-bsv-")}
        response = web.json_response(
            {k: v for k, v in seen.items() if not k.startswith("x-bsv-auth")}
        )
        for name in reversed(ODD_NAMES):
            response.headers[name] = "r" + name[-3:]
        response.headers["Authorization"] = "server says"
        return response

    app = web.Application()
    server.install(app)
    app.router.add_get("/headers", headers)
    return app


async def test_odd_header_names_verify_in_requests_and_responses() -> None:
    sent = [(name, "q" + name[-3:]) for name in reversed(ODD_NAMES)]
    async with (
        serving(header_app(Brc104Server(SERVER))) as origin,
        AuthFetch(CLIENT, request_timeout=WAIT) as client,
    ):
        response = await client.fetch(origin + "/headers", headers=sent)
    assert response.status == 200
    assert json.loads(response.body) == dict(sent)  # every header reached the handler
    assert response.signed_headers == [
        ("authorization", "server says"),
        *((name, "r" + name[-3:]) for name in ODD_NAMES),
    ]
    # Only the signed ones: no x-bsv-auth-*, no Content-Type, Date or Content-Length.
    assert all(
        name == "authorization" or (name.startswith("x-bsv-") and not name.startswith("x-bsv-auth"))
        for name, _ in response.signed_headers
    )
    assert "content-type" in {k.lower() for k in response.headers}


async def test_a_request_signed_over_byte_ordered_headers_is_refused(
    http: aiohttp.ClientSession,
) -> None:
    async with (
        serving(header_app(Brc104Server(SERVER))) as origin,
        AuthFetch(CLIENT, request_timeout=WAIT) as client,
    ):
        server_key = await client.server_identity(origin)
        odd = {name: "v" for name in ODD_NAMES}
        good = signed_request(client.peer, server_key, "GET", "/headers", odd)
        assert (await send(http, "GET", origin + "/headers", good))[0] == 200
        bad = signed_request(client.peer, server_key, "GET", "/headers", odd, byte_order=True)
        status, _, body = await send(http, "GET", origin + "/headers", bad)
    assert status == 401
    assert error_of(body)[1].startswith("ERR_INVALID_SIGNATURE")


# --- AuthFetch: bodies in pieces, timeouts, failed handshakes -------------------------------


def in_pieces(size: int) -> Middleware:
    """An outermost middleware that sends each (already signed) response body in pieces of
    ``size`` bytes, each written and drained, with the event loop run in between."""

    @web.middleware
    async def pieces(request: web.Request, handler: Handler) -> web.StreamResponse:
        inner = await handler(request)
        if not isinstance(inner, web.Response) or not isinstance(inner.body, bytes):
            return inner
        body = inner.body
        out = web.StreamResponse(status=inner.status, reason=inner.reason)
        for name, value in inner.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding"):
                out.headers.add(name, value)
        out.content_length = len(body)
        await out.prepare(request)
        for start in range(0, len(body), size):
            await out.write(body[start : start + size])
            for _ in range(5):
                await asyncio.sleep(0)  # the client reads what has come so far
        await out.write_eof()
        return out

    return pieces


async def test_bodies_that_arrive_in_pieces_are_read_whole() -> None:
    app = demo_app(Brc104Server(SERVER))
    app.middlewares.insert(0, in_pieces(13))
    text = ("a body in many pieces " * 40).encode()
    async with serving(app) as origin, AuthFetch(CLIENT, request_timeout=WAIT) as client:
        identity = await client.server_identity(origin)  # the initialResponse, in pieces
        assert identity == SERVER.identity_key
        response = await client.fetch(
            origin + "/echo-text", method="POST", headers={"content-type": "text/plain"}, body=text
        )
    assert (response.status, response.body) == (200, text)


async def test_a_handshake_that_is_never_answered_is_a_transport_error() -> None:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as mine,
        silent_server() as origin,
    ):
        client = AuthFetch(CLIENT, session=mine, request_timeout=0.3)
        started = time.monotonic()
        async with asyncio.timeout(WAIT):
            with pytest.raises(TransportError) as info:
                await client.fetch(origin + "/hello")
        elapsed = time.monotonic() - started
        await client.close()
        assert not mine.closed  # the caller's session stays the caller's
    assert type(info.value) is TransportError  # not a bare TimeoutError
    assert not isinstance(info.value, TimeoutError)
    assert elapsed < 1.0
    assert len(client.peer.sessions) == 0


async def test_a_request_that_is_never_answered_is_a_transport_error() -> None:
    release = asyncio.Event()

    async def never(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    app = demo_app(Brc104Server(SERVER))
    app.router.add_get("/never", never)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as mine,
        serving(app) as origin,
    ):
        try:
            async with AuthFetch(CLIENT, session=mine, request_timeout=0.3) as client:
                assert (await client.fetch(origin + "/hello")).status == 200
                started = time.monotonic()
                async with asyncio.timeout(WAIT):
                    with pytest.raises(TransportError) as info:
                        await client.fetch(origin + "/never")
                elapsed = time.monotonic() - started
                assert (await client.fetch(origin + "/hello")).status == 200  # still usable
        finally:
            release.set()
    assert type(info.value) is TransportError
    assert elapsed < 1.0


async def refuse(_request: web.Request) -> web.Response:
    return web.json_response({"status": "error", "code": "NOPE"}, status=401)


async def garbage(_request: web.Request) -> web.Response:
    return web.Response(text="this is not an AuthMessage", content_type="application/json")


async def wrong_answer(request: web.Request) -> web.Response:
    """A signed initialResponse, but to another initialRequest of its own making."""
    server, stranger = Peer(SERVER), Peer(Wallet.from_hex("da" * 32))
    server.receive(stranger.initiate(0), 0)
    (reply,) = server.messages_to_send()
    await request.read()
    return web.Response(body=reply.to_bytes(), content_type="application/json")


@pytest.mark.parametrize("answer", [refuse, garbage, wrong_answer])
async def test_a_failed_handshake_leaves_no_session(
    answer: Callable[[web.Request], Awaitable[web.Response]],
) -> None:
    app = web.Application()
    app.router.add_post(brc104.AUTH_PATH, answer)
    async with serving(app) as origin, AuthFetch(CLIENT, request_timeout=WAIT) as client:
        for _ in range(3):
            with pytest.raises(Brc103Error):
                await client.fetch(origin + "/hello")
        assert len(client.peer.sessions) == 0


# --- what AuthResponse reports ------------------------------------------------------------


async def test_the_response_carries_the_servers_certificate_when_requested() -> None:
    server_master = master(SERVER, "Server Co")
    server = Brc104Server(SERVER, PeerConfig(certificates=[server_master]))
    asking = PeerConfig(requested_certificates=requested())
    async with (
        serving(demo_app(server)) as origin,
        AuthFetch(CLIENT, asking, request_timeout=WAIT) as client,
        AuthFetch(Wallet.from_hex("db" * 32), request_timeout=WAIT) as incurious,
    ):
        response = await client.fetch(origin + "/hello")
        plain = await incurious.fetch(origin + "/hello")
    (shown,) = response.certificates
    assert shown.certificate.subject == SERVER.identity_key
    assert shown.certificate.certifier == CERTIFIER.identity_key
    assert shown.certificate.type == CERT_TYPE
    assert shown.decrypted_fields == {"name": "Server Co"}  # only the requested field
    assert plain.certificates == []


# --- decode_request_payload -----------------------------------------------------------------


def payload_vectors() -> list[dict[str, Any]]:
    cases = json.loads(VECTORS.read_text(encoding="utf-8"))["deterministicRequestPayloads"]
    return [case for case in cases if case.get("payloadHex")]


@pytest.mark.parametrize("case", payload_vectors(), ids=lambda case: str(case["label"]))
def test_decode_request_payload_reads_every_vector(case: dict[str, Any]) -> None:
    payload = bytes.fromhex(case["payloadHex"])
    decoded = brc104.decode_request_payload(payload)
    expected = case["deserializedByTransport"]
    assert b64encode(decoded.request_id) == expected["requestId"]
    assert decoded.request_id == bytes.fromhex(case["requestNonceHex"])
    assert decoded.method == expected["method"]
    assert (decoded.path or "") + (decoded.query or "") == expected["urlPostfix"]
    assert dict(decoded.headers) == expected["headers"]
    body = None if decoded.body is None else decoded.body.decode("utf-8")
    assert body == expected["body"]
    # And back: the same bytes.
    again = brc104.encode_request_payload(
        decoded.request_id,
        decoded.method,
        decoded.path or "",
        decoded.query or "",
        decoded.headers,
        decoded.body,
    )
    assert again == payload


@pytest.mark.parametrize("case", payload_vectors(), ids=lambda case: str(case["label"]))
def test_encode_request_payload_matches_every_vector(case: dict[str, Any]) -> None:
    """From the request as the TS client was given it (AuthFetch's rules: a JSON POST
    without a body sends ``{}``)."""
    url = yarl.URL(case["url"])
    method = case["method"]
    headers = brc104.signed_request_headers(brc104.header_items(case["headers"]))
    body = None if case["body"] is None else case["body"].encode("utf-8")
    if body is None and method in ("POST", "PUT", "PATCH", "DELETE"):
        body = b"{}" if dict(headers).get("content-type") == "application/json" else None
    query = "?" + url.raw_query_string if url.raw_query_string else ""
    encoded = brc104.encode_request_payload(
        bytes.fromhex(case["requestNonceHex"]), method, url.raw_path, query, headers, body
    )
    assert encoded.hex() == case["payloadHex"]


FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
VALID = bytes.fromhex(payload_vectors()[2]["payloadHex"])  # POST with headers and a body


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, str, str, str, list[tuple[str, str]], bytes | None]:
    return (
        draw(st.binary(min_size=32, max_size=32)),
        draw(TEXT.filter(bool)),
        draw(TEXT),
        draw(TEXT),
        draw(st.lists(st.tuples(TEXT, TEXT), max_size=5)),
        draw(st.none() | st.binary(min_size=1, max_size=300)),
    )


@FUZZ
@given(requests())
def test_decode_inverts_encode(
    request: tuple[bytes, str, str, str, list[tuple[str, str]], bytes | None],
) -> None:
    request_id, method, path, query, headers, body = request
    payload = brc104.encode_request_payload(request_id, method, path, query, headers, body)
    decoded = brc104.decode_request_payload(payload)
    assert decoded.request_id == request_id
    assert decoded.method == method
    assert decoded.path == (path or None)
    assert decoded.query == (query or None)
    assert decoded.headers == headers
    assert decoded.body == body


def decodes_or_refuses(data: bytes) -> None:
    """A payload, or a DecodeError: nothing else escapes."""
    with suppress(DecodeError):
        brc104.decode_request_payload(data)


@FUZZ
@given(st.binary(max_size=400))
@example(b"")
@example(b"\0" * 32 + b"\xff" * 9)  # no method
@example(b"\0" * 32 + b"\x01G\xff" + b"\xff" * 8 + b"\xff" * 9 + b"\xfe\xff\xff\xff\x7f")
@example(b"\0" * 32 + b"\x01G" + b"\xff" * 18 + b"\xfd\x01\x04")  # 1025 headers
@example(b"\0" * 32 + b"\x02\xc3\x28" + b"\xff" * 18 + b"\x00" + b"\xff" * 9)  # not UTF-8
@example(b"\0" * 32 + b"\x01G" + b"\xff" * 18 + b"\x01\xff" + b"\xff" * 8 + b"\x00\xff" * 9)
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    decodes_or_refuses(data)


@FUZZ
@given(st.integers(0, len(VALID) - 1))
def test_truncated_payloads_raise_decode_error(cut: int) -> None:
    with pytest.raises(DecodeError):
        brc104.decode_request_payload(VALID[:cut])


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255), st.sampled_from("rid")),
        min_size=1,
        max_size=6,
    )
)
def test_mutated_payloads_decode_or_raise_decode_error(
    edits: list[tuple[int, int, str]],
) -> None:
    data = bytearray(VALID)
    for position, value, kind in edits:
        position %= max(len(data), 1)
        if kind == "r" and data:
            data[position] = value
        elif kind == "i":
            data.insert(position, value)
        elif data:
            del data[position]
    decodes_or_refuses(bytes(data))
    with pytest.raises(DecodeError):
        brc104.decode_request_payload(VALID + bytes([edits[0][1]]))  # trailing bytes
