"""BRC-104 over real HTTP: our aiohttp middleware (Brc104Server + the demo app) and our
AuthFetch client, on 127.0.0.1 in-process.

Every demo route end to end; requests without BRC-104; forged, replayed and malformed
requests built by hand on a real session; clients facing plain HTTP servers, servers that
break their own signatures and servers that restart; certificates over HTTP (sent, missing
until the timeout, unrequested); concurrent fetches sharing one handshake.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web, web_exceptions, web_request
from multidict import CIMultiDictProxy

from trustmesh.api.authfetch import AuthFetch, UnauthenticatedResponseError
from trustmesh.api.brc104 import Brc104Server, identity_key_of
from trustmesh.api.brc104_demo import demo_app
from trustmesh.brc103 import http as brc104
from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.encoding import b64encode
from trustmesh.brc103.messages import AuthMessage, RequestedCertificates, parse_message_bytes
from trustmesh.brc103.nonces import create_nonce
from trustmesh.brc103.peer import Peer, PeerConfig
from trustmesh.brc103.wallet import Wallet

WAIT = 5.0  # upper bound on any single request; each takes far less
SERVER = Wallet.from_hex("a1" * 32)
CLIENT = Wallet.from_hex("b2" * 32)
OTHER = Wallet.from_hex("c3" * 32)  # a second client, or a stranger
CERTIFIER = Wallet.from_hex("d4" * 32)
OTHER_CERTIFIER = Wallet.from_hex("e5" * 32)
CERT_TYPE = base64.b64encode(b"trustmesh brc104 http test type!").decode()
CERT_TIMEOUT_MS = 200
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Bug (reported): the middleware stores the identity under plain string keys, which

# --- servers ------------------------------------------------------------------------------


@asynccontextmanager
async def serving(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """``app`` on 127.0.0.1 (a free port unless ``port``); yields its origin."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def auth_posts(app: web.Application) -> list[str]:
    """Put a counting middleware outermost; the list collects each auth POST's type."""
    seen: list[str] = []

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == brc104.AUTH_PATH:
            seen.append(json.loads(await request.read()).get("messageType"))
        return await handler(request)

    app.middlewares.insert(0, count)
    return seen


@pytest.fixture
async def server() -> Brc104Server:
    return Brc104Server(SERVER)


@pytest.fixture
async def origin(server: Brc104Server) -> AsyncIterator[str]:
    async with serving(demo_app(server)) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[AuthFetch]:
    async with AuthFetch(CLIENT, request_timeout=WAIT) as fetcher:
        yield fetcher


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


# --- requests built by hand ---------------------------------------------------------------


def auth_headers(message: AuthMessage, request_id: bytes) -> dict[str, str]:
    return {
        brc104.VERSION: message.version,
        brc104.IDENTITY_KEY: message.identity_key,
        brc104.NONCE: message.nonce or "",
        brc104.YOUR_NONCE: message.your_nonce or "",
        brc104.SIGNATURE: (message.signature or b"").hex(),
        brc104.REQUEST_ID: b64encode(request_id),
    }


def signed_request(
    peer: Peer,
    server_key: str,
    method: str,
    path: str,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> dict[str, str]:
    """The headers of a request signed on ``peer``'s session with ``server_key``: the
    application ``headers`` plus the ``x-bsv-auth-*`` ones."""
    headers = dict(headers or {})
    request_id = brc104.new_request_id()
    payload = brc104.encode_request_payload(
        request_id,
        method,
        path,
        query,
        brc104.signed_request_headers(headers.items()),
        body,
    )
    message = peer.create_general(payload, identity_key=server_key)
    return {**headers, **auth_headers(message, request_id)}


async def send(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with http.request(method, url, headers=headers, data=body) as response:
        return response.status, response.headers, await response.read()


def error_code(body: bytes) -> str:
    data = json.loads(body)
    assert data["status"] == "error", data
    code = data["code"]
    assert isinstance(code, str)
    return code


def error_description(body: bytes) -> str:
    description = json.loads(body)["description"]
    assert isinstance(description, str)
    return description


async def session_with(client: AuthFetch, origin: str) -> str:
    """Handshake (once) and return the server's identity key."""
    return await client.server_identity(origin)


# --- the demo routes ------------------------------------------------------------------------


async def test_hello_names_the_client_and_is_signed_by_the_server(
    client: AuthFetch, origin: str
) -> None:
    response = await client.fetch(origin + "/hello")
    assert response.status == 200
    assert response.identity_key == SERVER.identity_key
    assert json.loads(response.body) == {"hello": CLIENT.identity_key}
    assert response.headers[brc104.IDENTITY_KEY] == SERVER.identity_key


async def test_echo_returns_the_json_and_a_signed_header(client: AuthFetch, origin: str) -> None:
    body = b'{"a":1,"text":"h\xc3\xa9llo","list":[1,2,3]}'
    response = await client.fetch(
        origin + "/echo", method="POST", headers={"Content-Type": "application/json"}, body=body
    )
    assert response.status == 200
    assert response.body == body
    assert response.headers["x-bsv-echo"] == "yes"
    assert response.headers["Content-Type"].startswith("application/json")


async def test_echo_keeps_non_canonical_json_byte_for_byte(client: AuthFetch, origin: str) -> None:
    """Spaces, key order and a charset parameter: the server rebuilds the payload from the
    raw bytes, so the signature still covers exactly what was sent."""
    body = b'{ "z" : [1,  2],\n  "a" : {"y": null, "b": 1.50} }'
    response = await client.fetch(
        origin + "/echo",
        method="POST",
        headers={"content-type": "application/json; charset=utf-8"},
        body=body,
    )
    assert response.status == 200
    assert response.body == body


async def test_echo_refuses_a_body_that_is_not_json_with_a_signed_400(
    client: AuthFetch, origin: str
) -> None:
    response = await client.fetch(
        origin + "/echo", method="POST", headers={"content-type": "application/json"}, body="{"
    )
    assert response.status == 400
    assert response.identity_key == SERVER.identity_key
    assert "not JSON" in json.loads(response.body)["error"]


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/echo-text", "text/plain; charset=utf-8", "héllo, wörld\n".encode()),
        ("/echo-text", "text/csv", b"a,b\n1,2\n"),
        ("/echo-bin", "application/octet-stream", bytes(range(256))),
        ("/echo-bin", "image/png", b"\x89PNG\r\n\x1a\n\x00\x00"),
    ],
)
async def test_echo_text_and_bin_return_the_same_bytes_and_type(
    client: AuthFetch, origin: str, path: str, content_type: str, body: bytes
) -> None:
    response = await client.fetch(
        origin + path, method="POST", headers={"Content-Type": content_type}, body=body
    )
    assert response.status == 200
    assert response.body == body
    assert response.headers["Content-Type"] == content_type


async def test_empty_is_an_authenticated_204(client: AuthFetch, origin: str) -> None:
    response = await client.fetch(origin + "/empty")
    assert response.status == 204
    assert response.body == b""
    assert response.identity_key == SERVER.identity_key


@pytest.mark.parametrize("code", [201, 204, 404, 418, 500, 503])
async def test_status_routes_are_authenticated(client: AuthFetch, origin: str, code: int) -> None:
    response = await client.fetch(origin + f"/status/{code}")
    assert response.status == code
    assert response.identity_key == SERVER.identity_key
    if code != 204:
        assert json.loads(response.body) == {"status": code}


async def test_an_unknown_route_is_an_authenticated_404(client: AuthFetch, origin: str) -> None:
    response = await client.fetch(origin + "/no/such/route")
    assert response.status == 404
    assert response.identity_key == SERVER.identity_key


@pytest.mark.parametrize(
    "query", ["?q=1", "?q=1&r=two&q=3", "?x=a%20b&y=%C3%A9&z=a+b", "?flag", "?empty="]
)
async def test_query_strings_are_signed_and_verified(
    client: AuthFetch, origin: str, query: str
) -> None:
    hello = await client.fetch(origin + "/hello" + query)
    assert json.loads(hello.body) == {"hello": CLIENT.identity_key}
    teapot = await client.fetch(origin + "/status/418" + query)
    assert teapot.status == 418


@pytest.mark.parametrize(
    "target",
    ["/hello?q=a b", "/hello?q=é", "/hello?z=%2F", "/hello?t=%7E", "/x/../hello", "/h%65llo"],
)
async def test_urls_that_aiohttp_normalises_still_verify(
    client: AuthFetch, origin: str, target: str
) -> None:
    response = await client.fetch(origin + target)
    assert response.status == 200


async def test_request_storage_keys_do_not_warn(
    client: AuthFetch, origin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp warns once per process per str key: forget which ones it has seen."""
    monkeypatch.setattr(web_request.BaseRequest, "_seen_str_keys", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", web_exceptions.NotAppKeyWarning)
        response = await client.fetch(origin + "/hello")
    assert response.status == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_a_request_without_a_body_or_content_type_verifies(
    client: AuthFetch, method: str
) -> None:
    async def nothing(_request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    Brc104Server(SERVER).install(app)
    app.router.add_route(method, "/nothing", nothing)
    async with serving(app) as url:
        response = await client.fetch(url + "/nothing", method=method)
    assert response.status == 204


async def test_a_delete_without_a_body_verifies(client: AuthFetch) -> None:
    async def nothing(_request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    Brc104Server(SERVER).install(app)
    app.router.add_delete("/nothing", nothing)
    async with serving(app) as url:
        response = await client.fetch(url + "/nothing", method="DELETE")
    assert response.status == 204


async def test_many_requests_share_one_session(
    client: AuthFetch, server: Brc104Server, origin: str
) -> None:
    for _ in range(5):
        assert (await client.fetch(origin + "/hello")).status == 200
    assert len(server.peer.sessions) == 1


# --- requests without BRC-104 -------------------------------------------------------------


async def test_a_plain_request_gets_a_401_json_error(
    http: aiohttp.ClientSession, origin: str
) -> None:
    for method, path in [("GET", "/hello"), ("POST", "/echo"), ("GET", "/no/such/route")]:
        status, headers, body = await send(http, method, origin + path, {})
        assert status == 401
        assert json.loads(body) == {
            "status": "error",
            "code": "UNAUTHORIZED",
            "message": "Mutual-authentication failed!",
        }
        assert brc104.SIGNATURE not in headers


async def test_allow_unauthenticated_lets_a_plain_request_through_as_unknown(
    http: aiohttp.ClientSession, client: AuthFetch
) -> None:
    async with serving(demo_app(Brc104Server(SERVER, allow_unauthenticated=True))) as url:
        status, headers, body = await send(http, "GET", url + "/hello", {})
        assert status == 200
        assert json.loads(body) == {"hello": "unknown"}
        assert brc104.SIGNATURE not in headers  # nothing to sign for: no session
        # An authenticated client still gets its identity and a signed answer.
        response = await client.fetch(url + "/hello")
        assert json.loads(response.body) == {"hello": CLIENT.identity_key}


async def test_identity_key_of_refuses_a_request_the_middleware_did_not_see() -> None:
    async def handler(request: web.Request) -> web.Response:
        with pytest.raises(RuntimeError, match="middleware did not run"):
            identity_key_of(request)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    async with serving(app) as url, aiohttp.ClientSession() as http:
        status, _, body = await send(http, "GET", url + "/", {})
    assert (status, body) == (200, b"ok")


# --- forged requests on a real session ------------------------------------------------------


async def test_a_hand_built_request_verifies(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str
) -> None:
    """The control for the forgeries below: the same construction, untouched, passes."""
    server_key = await session_with(client, origin)
    body = b'{"a": 1}'
    headers = signed_request(
        client.peer,
        server_key,
        "POST",
        "/echo",
        query="?x=1",
        headers={"content-type": "application/json", "x-bsv-note": "signed"},
        body=body,
    )
    status, reply_headers, reply = await send(http, "POST", origin + "/echo?x=1", headers, body)
    assert (status, reply) == (200, body)
    assert reply_headers[brc104.IDENTITY_KEY] == server_key


async def test_a_tampered_body_is_refused(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str
) -> None:
    server_key = await session_with(client, origin)
    json_type = {"content-type": "application/json"}
    headers = signed_request(
        client.peer, server_key, "POST", "/echo", headers=json_type, body=b'{"pay": 1}'
    )
    status, reply_headers, reply = await send(http, "POST", origin + "/echo", headers, b'{"pay":9}')
    assert status == 401
    assert error_code(reply) == "ERR_AUTH_FAILED"
    assert error_description(reply).startswith("ERR_INVALID_SIGNATURE")
    assert brc104.SIGNATURE not in reply_headers


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("path", "ERR_INVALID_SIGNATURE"),
        ("query", "ERR_INVALID_SIGNATURE"),
        ("method", "ERR_INVALID_SIGNATURE"),
        ("signed header", "ERR_INVALID_SIGNATURE"),
        ("content type", "ERR_INVALID_SIGNATURE"),
    ],
)
async def test_any_signed_part_of_the_request_is_covered(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str, change: str, expected: str
) -> None:
    server_key = await session_with(client, origin)
    body = b"text"
    app_headers = {"content-type": "text/plain", "x-bsv-note": "original"}
    headers = signed_request(
        client.peer, server_key, "POST", "/echo-text", query="?a=1", headers=app_headers, body=body
    )
    method, target = "POST", "/echo-text?a=1"
    if change == "path":
        target = "/echo-bin?a=1"
    elif change == "query":
        target = "/echo-text?a=2"
    elif change == "method":
        method = "PUT"
    elif change == "signed header":
        headers["x-bsv-note"] = "changed"
    else:
        headers["content-type"] = "text/html"
    status, _, reply = await send(http, method, origin + target, headers, body)
    assert status == 401
    assert error_description(reply).startswith(expected)


async def test_an_unsigned_header_is_not_covered(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str
) -> None:
    """Headers outside content-type, authorization and x-bsv-* are not signed (BRC-104):
    adding one changes nothing."""
    server_key = await session_with(client, origin)
    headers = signed_request(client.peer, server_key, "GET", "/hello")
    headers["X-Forwarded-For"] = "203.0.113.9"
    status, _, _ = await send(http, "GET", origin + "/hello", headers)
    assert status == 200


async def test_a_replayed_request_is_refused(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str
) -> None:
    server_key = await session_with(client, origin)
    body = b'{"transfer": 100}'
    json_type = {"content-type": "application/json"}
    headers = signed_request(client.peer, server_key, "POST", "/echo", headers=json_type, body=body)
    first = await send(http, "POST", origin + "/echo", headers, body)
    assert first[0] == 200
    status, _, reply = await send(http, "POST", origin + "/echo", headers, body)
    assert status == 401
    assert error_code(reply) == "ERR_AUTH_FAILED"
    assert error_description(reply).startswith("ERR_REPLAYED_MESSAGE")


async def test_a_swapped_identity_key_header_is_refused(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str
) -> None:
    server_key = await session_with(client, origin)
    headers = signed_request(client.peer, server_key, "GET", "/hello")
    headers[brc104.IDENTITY_KEY] = OTHER.identity_key
    status, _, reply = await send(http, "GET", origin + "/hello", headers)
    assert status == 401
    assert error_description(reply).startswith("ERR_IDENTITY_MISMATCH")


async def test_a_wrong_auth_version_is_a_400(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str
) -> None:
    server_key = await session_with(client, origin)
    headers = signed_request(client.peer, server_key, "GET", "/hello")
    headers[brc104.VERSION] = "0.2"
    status, _, reply = await send(http, "GET", origin + "/hello", headers)
    assert status == 400
    assert error_code(reply) == "ERR_MALFORMED_REQUEST"
    assert "unsupported BRC-103 version '0.2'" in error_description(reply)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (brc104.REQUEST_ID, "not base64!"),
        (brc104.REQUEST_ID, b64encode(b"short")),
        (brc104.SIGNATURE, "zz"),
        (brc104.NONCE, "***"),
        (brc104.IDENTITY_KEY, "02" + "zz" * 32),
    ],
)
async def test_malformed_auth_headers_are_a_400(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str, header: str, value: str
) -> None:
    server_key = await session_with(client, origin)
    headers = signed_request(client.peer, server_key, "GET", "/hello")
    headers[header] = value
    status, _, reply = await send(http, "GET", origin + "/hello", headers)
    assert status == 400
    assert error_code(reply) == "ERR_MALFORMED_REQUEST"


async def test_a_foreign_your_nonce_is_refused(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str
) -> None:
    server_key = await session_with(client, origin)
    headers = signed_request(client.peer, server_key, "GET", "/hello")
    headers[brc104.YOUR_NONCE] = create_nonce(OTHER)  # not made by the server's key
    status, _, reply = await send(http, "GET", origin + "/hello", headers)
    assert status == 401
    assert error_description(reply).startswith("ERR_INVALID_NONCE")


async def test_another_clients_session_nonce_is_refused(
    client: AuthFetch, http: aiohttp.ClientSession, origin: str
) -> None:
    """A your-nonce the server made, for someone else's session."""
    server_key = await session_with(client, origin)
    async with AuthFetch(OTHER) as other:
        await session_with(other, origin)
        other_nonce = other.peer.session(identity_key=server_key).peer_nonce
    assert other_nonce is not None
    headers = signed_request(client.peer, server_key, "GET", "/hello")
    headers[brc104.YOUR_NONCE] = other_nonce
    status, _, reply = await send(http, "GET", origin + "/hello", headers)
    assert status == 401
    assert error_description(reply).startswith("ERR_IDENTITY_MISMATCH")


# --- /.well-known/auth ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b"not json", "ERR_MALFORMED_MESSAGE", "not JSON"),
        (b"", "ERR_MALFORMED_MESSAGE", "not JSON"),
        (b"[1, 2]", "ERR_MALFORMED_MESSAGE", "a JSON object"),
        (b'{"a": 1, "a": 2}', "ERR_MALFORMED_MESSAGE", "duplicate"),
        (
            json.dumps(
                {"version": "0.2", "messageType": "initialRequest", "identityKey": "02" + "11" * 32}
            ).encode(),
            "ERR_UNSUPPORTED_VERSION",
            "version '0.2'",
        ),
        (
            json.dumps(
                {"version": "0.1", "messageType": "hello", "identityKey": "02" + "11" * 32}
            ).encode(),
            "ERR_MALFORMED_MESSAGE",
            "unknown messageType 'hello'",
        ),
        (
            json.dumps({"version": "0.1", "messageType": "initialRequest"}).encode(),
            "ERR_MALFORMED_MESSAGE",
            "identityKey",
        ),
        (
            json.dumps(
                {"version": "0.1", "messageType": "initialRequest", "identityKey": "02" + "11" * 32}
            ).encode(),
            "ERR_MALFORMED_MESSAGE",
            "lacks initialNonce",
        ),
    ],
)
async def test_malformed_auth_messages_are_a_400_with_a_json_error(
    http: aiohttp.ClientSession, origin: str, body: bytes, code: str, says: str
) -> None:
    status, headers, reply = await send(
        http, "POST", origin + brc104.AUTH_PATH, {"content-type": "application/json"}, body
    )
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert error_code(reply) == code
    assert says in error_description(reply)


async def test_a_stray_initial_response_is_a_401(http: aiohttp.ClientSession, origin: str) -> None:
    """An initialResponse for a handshake the server never started."""
    stranger = Peer(OTHER)
    request = stranger.initiate(0)
    responder = Peer(CLIENT)
    responder.receive(request, 0)
    (response,) = responder.messages_to_send()
    status, _, reply = await send(http, "POST", origin + brc104.AUTH_PATH, {}, response.to_bytes())
    assert status == 401
    assert error_code(reply) == "ERR_INVALID_NONCE"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_auth_endpoint_takes_only_post(
    http: aiohttp.ClientSession, origin: str, method: str
) -> None:
    status, _, reply = await send(http, method, origin + brc104.AUTH_PATH, {})
    assert status == 405
    assert error_code(reply) == "ERR_METHOD_NOT_ALLOWED"


async def test_a_handshake_by_hand_answers_with_a_signed_initial_response(
    http: aiohttp.ClientSession, origin: str
) -> None:
    peer = Peer(OTHER)
    request = peer.initiate(0)
    status, headers, reply = await send(
        http,
        "POST",
        origin + brc104.AUTH_PATH,
        {"content-type": "application/json"},
        request.to_bytes(),
    )
    assert status == 200
    assert headers[brc104.MESSAGE_TYPE] == "initialResponse"
    assert headers[brc104.IDENTITY_KEY] == SERVER.identity_key
    events = peer.receive(parse_message_bytes(reply), 0)
    assert [type(e).__name__ for e in events] == ["HandshakeCompleted"]


# --- the client facing servers that are not (quite) BRC-104 --------------------------------


async def test_a_plain_http_server_is_refused_without_hanging(client: AuthFetch) -> None:
    async def hello(_request: web.Request) -> web.Response:
        return web.json_response({"hello": "anyone"})

    app = web.Application()
    app.router.add_get("/hello", hello)
    async with serving(app) as url, asyncio.timeout(WAIT):
        with pytest.raises(UnauthenticatedResponseError) as info:
            await client.fetch(url + "/hello")
    assert info.value.status == 404  # no /.well-known/auth


async def test_a_server_answering_anything_with_200_is_refused(client: AuthFetch) -> None:
    async def anything(_request: web.Request) -> web.Response:
        return web.Response(text="ok, whatever you say")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    async with serving(app) as url, asyncio.timeout(WAIT):
        with pytest.raises(UnauthenticatedResponseError, match="no AuthMessage"):
            await client.fetch(url + "/hello")


async def test_a_server_that_drops_auth_headers_from_responses_is_refused(
    client: AuthFetch,
) -> None:
    """The handshake works, but the general response comes back unsigned with a 200."""

    @web.middleware
    async def strip(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.path != brc104.AUTH_PATH:
            for name in list(response.headers):
                if name.lower().startswith("x-bsv-auth"):
                    del response.headers[name]
        return response

    app = web.Application(middlewares=[strip])
    Brc104Server(SERVER).install(app)
    app.router.add_get("/hello", ok)
    async with serving(app) as url, asyncio.timeout(WAIT):
        with pytest.raises(UnauthenticatedResponseError, match="without BSV authentication"):
            await client.fetch(url + "/hello")


async def ok(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.mark.parametrize("tamper", ["body", "status", "signed header", "signature"])
async def test_a_response_altered_after_signing_is_refused(client: AuthFetch, tamper: str) -> None:
    @web.middleware
    async def alter(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.path == brc104.AUTH_PATH or not isinstance(response, web.Response):
            return response
        if tamper == "body":
            response.body = bytes(response.body or b"") + b" "  # type: ignore[arg-type]
        elif tamper == "status":
            response.set_status(201)
        elif tamper == "signed header":
            response.headers["x-bsv-echo"] = "no"
        else:
            signature = bytearray.fromhex(response.headers[brc104.SIGNATURE])
            signature[-1] ^= 1
            response.headers[brc104.SIGNATURE] = signature.hex()
        return response

    server = Brc104Server(SERVER)
    app = demo_app(server)
    app.middlewares.insert(0, alter)
    async with serving(app) as url, asyncio.timeout(WAIT):
        with pytest.raises(UnauthenticatedResponseError, match="does not verify"):
            await client.fetch(
                url + "/echo",
                method="POST",
                headers={"content-type": "application/json"},
                body=b'{"a":1}',
            )


async def test_a_body_over_the_server_limit_is_refused_unsigned(client: AuthFetch) -> None:
    """aiohttp's 413 comes before any signature: the client reports it, never trusts it."""
    async with serving(demo_app(Brc104Server(SERVER), max_body=1024)) as url:
        await client.fetch(url + "/hello")
        with pytest.raises(UnauthenticatedResponseError) as info:
            await client.fetch(
                url + "/echo-bin",
                method="POST",
                headers={"content-type": "application/octet-stream"},
                body=b"x" * 4096,
            )
    assert info.value.status == 413


async def test_an_unsigned_response_header_may_change(client: AuthFetch) -> None:
    """Only x-bsv-* and authorization response headers are signed; a proxy adding a
    Cache-Control header does not break the response."""

    @web.middleware
    async def add(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        return response

    app = demo_app(Brc104Server(SERVER))
    app.middlewares.insert(0, add)
    async with serving(app) as url:
        response = await client.fetch(url + "/hello")
    assert response.headers["Cache-Control"] == "no-store"


async def test_a_server_with_another_key_is_refused_when_pinned(client: AuthFetch) -> None:
    """A response signed by a different identity than the handshake's is refused."""

    @web.middleware
    async def swap(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.path != brc104.AUTH_PATH:
            response.headers[brc104.IDENTITY_KEY] = OTHER.identity_key
        return response

    app = demo_app(Brc104Server(SERVER))
    app.middlewares.insert(0, swap)
    async with serving(app) as url, asyncio.timeout(WAIT):
        with pytest.raises(Exception, match="answered as") as info:
            await client.fetch(url + "/hello")
    assert getattr(info.value, "code", None) == "ERR_IDENTITY_MISMATCH"


async def test_a_restarted_server_is_handshaken_with_again_transparently(
    client: AuthFetch,
) -> None:
    first = Brc104Server(SERVER)
    first_app = demo_app(first)
    first_posts = auth_posts(first_app)
    async with serving(first_app) as url:
        assert (await client.fetch(url + "/hello")).status == 200
        port = int(url.rsplit(":", 1)[1])
    assert first_posts == ["initialRequest"]
    second = Brc104Server(SERVER)  # same key, no sessions
    second_app = demo_app(second)
    second_posts = auth_posts(second_app)
    async with serving(second_app, port) as url:
        response = await client.fetch(url + "/hello")
        assert response.status == 200
        assert json.loads(response.body) == {"hello": CLIENT.identity_key}
        assert second_posts == ["initialRequest"]
        assert (await client.fetch(url + "/empty")).status == 204
    assert second_posts == ["initialRequest"]


# --- certificates over HTTP -----------------------------------------------------------------


def requested(*fields: str) -> RequestedCertificates:
    return RequestedCertificates((CERTIFIER.identity_key,), {CERT_TYPE: fields})


def master(certifier: Wallet = CERTIFIER, subject: Wallet = CLIENT) -> MasterCertificate:
    return MasterCertificate.issue(
        certifier, subject.identity_key, CERT_TYPE, {"name": "Alice", "role": "admin"}
    )


@pytest.fixture
async def cert_origin() -> AsyncIterator[str]:
    config = PeerConfig(
        requested_certificates=requested("name"), certificate_timeout_ms=CERT_TIMEOUT_MS
    )
    async with serving(demo_app(Brc104Server(SERVER, config))) as url:
        yield url


async def test_requested_certificates_reach_the_server_decrypted(cert_origin: str) -> None:
    config = PeerConfig(certificates=[master()])
    async with AuthFetch(CLIENT, config) as client, asyncio.timeout(WAIT):
        response = await client.fetch(cert_origin + "/hello")
        again = await client.fetch(cert_origin + "/hello")
    assert response.status == 200
    assert json.loads(response.body) == {
        "hello": CLIENT.identity_key,
        "certificates": [
            {"type": CERT_TYPE, "certifier": CERTIFIER.identity_key, "fields": {"name": "Alice"}}
        ],
    }
    assert json.loads(again.body) == json.loads(response.body)


async def test_a_client_without_certificates_gets_a_401_at_once(
    client: AuthFetch, http: aiohttp.ClientSession, cert_origin: str
) -> None:
    # Our client says it holds none (an empty certificateResponse, sent with the handshake):
    # its requests are refused at once, never held for the certificate timeout.
    server_key = await session_with(client, cert_origin)
    headers = signed_request(client.peer, server_key, "GET", "/hello")
    started = time.monotonic()
    status, reply_headers, reply = await send(http, "GET", cert_origin + "/hello", headers)
    held = time.monotonic() - started
    assert status == 401
    assert error_description(reply).startswith("ERR_CERTIFICATES_MISSING")
    assert brc104.SIGNATURE not in reply_headers
    assert held < 1.0


async def test_authfetch_without_certificates_gives_up_in_bounded_time(
    client: AuthFetch, cert_origin: str
) -> None:
    async with asyncio.timeout(WAIT):
        with pytest.raises(UnauthenticatedResponseError):
            await client.fetch(cert_origin + "/hello")


@pytest.mark.parametrize(
    ("certifier", "reveal", "code"),
    [
        (OTHER_CERTIFIER, ["name"], "ERR_UNREQUESTED_CERTIFICATE"),
        (CERTIFIER, ["name", "role"], "ERR_UNREQUESTED_CERTIFICATE"),
    ],
    ids=["unrequested certifier", "unrequested field"],
)
async def test_an_unrequested_certificate_is_refused(
    client: AuthFetch,
    http: aiohttp.ClientSession,
    cert_origin: str,
    certifier: Wallet,
    reveal: list[str],
    code: str,
) -> None:
    server_key = await session_with(client, cert_origin)
    shown = master(certifier).reveal(CLIENT, server_key, reveal)
    message = client.peer.create_certificate_response([shown], identity_key=server_key)
    json_type = {"content-type": "application/json"}
    status, _, reply = await send(
        http, "POST", cert_origin + brc104.AUTH_PATH, json_type, message.to_bytes()
    )
    assert status == 401
    assert error_code(reply) == code
    # The client holds nothing acceptable (it said so with the handshake): its requests
    # are refused.
    headers = signed_request(client.peer, server_key, "GET", "/hello")
    status, _, reply = await send(http, "GET", cert_origin + "/hello", headers)
    assert status == 401
    assert error_description(reply).startswith("ERR_CERTIFICATES_MISSING")


async def test_a_certificate_for_someone_else_is_refused(
    client: AuthFetch, http: aiohttp.ClientSession, cert_origin: str
) -> None:
    server_key = await session_with(client, cert_origin)
    shown = master(subject=OTHER).reveal(OTHER, server_key, ["name"])
    message = client.peer.create_certificate_response([shown], identity_key=server_key)
    status, _, reply = await send(
        http, "POST", cert_origin + brc104.AUTH_PATH, {}, message.to_bytes()
    )
    assert status == 401
    assert error_code(reply) == "ERR_INVALID_CERTIFICATE"


# --- concurrency --------------------------------------------------------------------------


async def test_concurrent_fetches_share_one_handshake(client: AuthFetch) -> None:
    server = Brc104Server(SERVER)
    app = demo_app(server)
    posts = auth_posts(app)
    async with serving(app) as url, asyncio.timeout(WAIT):
        responses = await asyncio.gather(
            *(
                client.fetch(
                    url + f"/echo?i={i}",
                    method="POST",
                    headers={"content-type": "application/json"},
                    body=json.dumps({"i": i}),
                )
                for i in range(20)
            )
        )
    assert [json.loads(r.body) for r in responses] == [{"i": i} for i in range(20)]
    assert all(r.identity_key == SERVER.identity_key for r in responses)
    assert posts == ["initialRequest"]
    assert len(server.peer.sessions) == 1
