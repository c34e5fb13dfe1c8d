"""trustmesh's BRC-103/BRC-104 against the TypeScript reference (@bsv/sdk 2.1.0, express 5 +
@bsv/auth-express-middleware 2.0.5), driven through tests/cli/ts_harness.py.

- our AuthFetch against the reference express server;
- the reference AuthFetch against our Brc104Server (in this process) and against
  ``trustmesh brc103 serve`` (a subprocess, together with ``trustmesh brc103 fetch``);
- BRC-52 certificates issued, revealed and verified across the two implementations, on their
  own and inside handshakes in both directions.

tests/interop/test_brc103_ts_selfcheck.py checks the reference side on its own: when a test
here fails, run that first.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiohttp import web
from clitools import TRUSTMESH, clean_env
from nodetools import JsonLines
from ts_harness import (
    TsCerts,
    TsServer,
    identity_key,
    start_ts_server,
    ts_certs_worker,
    ts_fetch_session,
    ts_fetch_session_async,
    ts_request,
)

from trustmesh.api.authfetch import AuthFetch, AuthResponse
from trustmesh.api.brc104 import Brc104Server
from trustmesh.api.brc104_demo import demo_app
from trustmesh.brc103 import http as brc104
from trustmesh.brc103.certificates import (
    Certificate,
    MasterCertificate,
    VerifiableCertificate,
    is_revocable,
)
from trustmesh.brc103.encoding import b64decode
from trustmesh.brc103.errors import CertificateError
from trustmesh.brc103.messages import RequestedCertificates
from trustmesh.brc103.peer import SIGNATURE_PROTOCOL, PeerConfig
from trustmesh.brc103.revocation import LocalRevocationRegistry
from trustmesh.brc103.wallet import Wallet
from trustmesh.errors import InvalidSignatureError

SERVER_KEY = "a1" * 32
CLIENT_KEY = "b2" * 32
CERTIFIER_KEY = "c3" * 32
VERIFIER_KEY = "d4" * 32
SERVER_ID = identity_key(SERVER_KEY)
CLIENT_ID = identity_key(CLIENT_KEY)
CERTIFIER_ID = identity_key(CERTIFIER_KEY)
VERIFIER_ID = identity_key(VERIFIER_KEY)
CERT_TYPE = base64.b64encode(b"trustmesh <-> TS interop type 01").decode()
OUTPOINT = "5e" * 32 + ".2"
WAIT = 10.0  # any one request or exchange; each takes well under a second


def wallet(key: str) -> Wallet:
    return Wallet.from_hex(key)


async def within(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, WAIT)


@asynccontextmanager
async def serving(server: Brc104Server) -> AsyncIterator[str]:
    """The demo app behind ``server`` on 127.0.0.1, a free port; yields its base URL."""
    runner = web.AppRunner(demo_app(server), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def response_signed_over(response: AuthResponse, client: Wallet, *, minus_one: bool) -> bool:
    """Whether the server's signature covers the response payload with an empty body
    written as varint(-1) (``minus_one``) or as varint(0)."""
    headers = response.headers
    payload = brc104.encode_response_payload(
        b64decode(headers[brc104.REQUEST_ID], "request id"),
        response.status,
        brc104.signed_response_headers(headers.items()),
        response.body,
        empty_as_minus_one=minus_one,
    )
    try:
        client.verify_signature(
            payload,
            bytes.fromhex(headers[brc104.SIGNATURE]),
            SIGNATURE_PROTOCOL,
            f"{headers[brc104.NONCE]} {headers[brc104.YOUR_NONCE]}",
            response.identity_key,
        )
    except InvalidSignatureError:
        return False
    return True


# --- our AuthFetch against the reference express server ---------------------------------


@pytest.fixture(scope="module")
def ts_server() -> Iterator[TsServer]:
    with start_ts_server(SERVER_KEY) as running:
        yield running


JSON = {"content-type": "application/json"}
# name: (path, method, headers, body); all sent in order by ONE AuthFetch.
OUR_REQUESTS: dict[str, tuple[str, str, dict[str, str] | None, str | bytes | None]] = {
    "hello": ("/hello", "GET", None, None),
    "query": ("/hello?q=1&name=a%20b&x=%C3%BC", "GET", None, None),
    "signed_headers": ("/hello", "GET", {"x-bsv-trace": "t-1", "authorization": "Bearer x"}, None),
    "echo": ("/echo", "POST", JSON, '{"a":1,"text":"héllo / ünïcode","list":[1,2.5,null]}'),
    "echo_no_body": ("/echo", "POST", JSON, None),  # "{}" is signed and sent, as TS does
    "text": ("/echo-text", "POST", {"content-type": "text/plain"}, "plain text ü"),
    "bin": ("/echo-bin", "POST", {"content-type": "application/octet-stream"}, b"\x00\xff\x10"),
    "empty": ("/empty", "GET", None, None),
    "teapot": ("/status/418", "GET", None, None),
}


class OurRun(NamedTuple):
    responses: dict[str, AuthResponse]
    session_nonces: list[str]  # our sessions afterwards
    session_peers: list[str | None]


@pytest.fixture(scope="module")
def ours_vs_express(ts_server: TsServer) -> OurRun:
    async def run() -> OurRun:
        responses: dict[str, AuthResponse] = {}
        async with AuthFetch(wallet(CLIENT_KEY)) as client:
            for name, (path, method, headers, body) in OUR_REQUESTS.items():
                responses[name] = await within(
                    client.fetch(ts_server.url + path, method=method, headers=headers, body=body)
                )
            sessions = list(client.peer.sessions)
        return OurRun(
            responses,
            [s.session_nonce for s in sessions],
            [s.peer_identity_key for s in sessions],
        )

    return asyncio.run(run())


def test_our_client_gets_hello_with_our_identity(ours_vs_express: OurRun) -> None:
    response = ours_vs_express.responses["hello"]
    assert response.status == 200
    assert json.loads(response.body) == {"hello": CLIENT_ID}
    assert response.identity_key == SERVER_ID


def test_our_client_signs_query_and_headers_as_express_rebuilds_them(
    ours_vs_express: OurRun,
) -> None:
    for name in ("query", "signed_headers"):
        response = ours_vs_express.responses[name]
        assert (response.status, json.loads(response.body)) == (200, {"hello": CLIENT_ID})


def test_our_client_echoes_json_with_a_signed_header(ours_vs_express: OurRun) -> None:
    response = ours_vs_express.responses["echo"]
    assert response.status == 200
    assert response.body.decode() == OUR_REQUESTS["echo"][3]  # already JSON.stringify form
    assert response.headers["x-bsv-echo"] == "yes"
    defaulted = ours_vs_express.responses["echo_no_body"]
    assert (defaulted.status, defaulted.body) == (200, b"{}")


def test_our_client_echoes_text_and_bytes(ours_vs_express: OurRun) -> None:
    text = ours_vs_express.responses["text"]
    assert (text.status, text.body) == (200, "plain text ü".encode())
    assert text.headers["x-bsv-echo"] == "yes"
    # Unlike the TS client, ours sends bytes as they are (no JSON.stringify).
    binary = ours_vs_express.responses["bin"]
    assert (binary.status, binary.body) == (200, b"\x00\xff\x10")


def test_our_client_accepts_an_empty_204_signed_as_minus_one(ours_vs_express: OurRun) -> None:
    # The express server signs an empty body as varint(-1); the TS client verifies varint(0)
    # and hangs (selfcheck). Ours got here, so it accepted -1: check that -1 is what was signed.
    response = ours_vs_express.responses["empty"]
    assert (response.status, response.body) == (204, b"")
    client = wallet(CLIENT_KEY)
    assert response_signed_over(response, client, minus_one=True)
    assert not response_signed_over(response, client, minus_one=False)


def test_our_client_gets_a_signed_status_code(ours_vs_express: OurRun) -> None:
    response = ours_vs_express.responses["teapot"]
    assert (response.status, json.loads(response.body)) == (418, {"status": 418})
    assert response_signed_over(response, wallet(CLIENT_KEY), minus_one=False)


def test_our_client_handshakes_once_for_all_requests(ours_vs_express: OurRun) -> None:
    [session_nonce] = ours_vs_express.session_nonces
    assert ours_vs_express.session_peers == [SERVER_ID]
    for response in ours_vs_express.responses.values():
        assert response.headers[brc104.YOUR_NONCE] == session_nonce


async def test_our_client_signs_the_query_it_sends(ts_server: TsServer) -> None:
    # A URL whose query aiohttp percent-encodes on the way out ("a b", "ü"). The TS client
    # signs and sends the encoded form (WHATWG URL) and gets 200 from express (baseline below);
    # ours must sign what it sends too.
    url = ts_server.url + "/hello?q=a b&x=ü"
    [baseline] = await ts_fetch_session_async([ts_request(url)], private_key_hex=CLIENT_KEY)
    assert (baseline["status"], json.loads(baseline["body"])) == (200, {"hello": CLIENT_ID})
    async with AuthFetch(wallet(CLIENT_KEY)) as client:
        response = await within(client.fetch(url))
    assert (response.status, json.loads(response.body)) == (200, {"hello": CLIENT_ID})


# --- the reference AuthFetch against our server (in this process) --------------------------

TS_REQUESTS: dict[str, tuple[str, str, dict[str, str] | None, str | bytes | None]] = {
    "hello": ("/hello", "GET", None, None),
    "query": ("/hello?q=a b&x=ü&y=%2F", "GET", None, None),
    "signed_headers": ("/hello", "GET", {"x-bsv-trace": "t-1", "authorization": "Bearer x"}, None),
    # Not in JSON.stringify form: the express server refuses it (401), ours verifies raw bytes.
    "echo": ("/echo", "POST", JSON, '{"a": 1}'),
    "echo_charset": ("/echo", "POST", {"content-type": "application/json; charset=utf-8"}, "[1]"),
    "echo_no_body": ("/echo", "POST", JSON, None),
    "text": ("/echo-text", "POST", {"content-type": "text/plain"}, "plain text ü"),
    "bin": ("/echo-bin", "POST", {"content-type": "application/octet-stream"}, b"\x00\xff"),
    "empty": ("/empty", "GET", None, None),
    "teapot": ("/status/418", "GET", None, None),
}


class TsRun(NamedTuple):
    results: dict[str, dict[str, Any]]
    sessions: int  # our server's sessions afterwards


@pytest.fixture(scope="module")
def ts_vs_ours() -> TsRun:
    async def run() -> TsRun:
        server = Brc104Server(wallet(SERVER_KEY))
        async with serving(server) as url:
            requests = [
                ts_request(url + path, method, headers, body)
                for path, method, headers, body in TS_REQUESTS.values()
            ]
            results = await ts_fetch_session_async(requests, private_key_hex=CLIENT_KEY)
            return TsRun(dict(zip(TS_REQUESTS, results, strict=True)), len(server.peer.sessions))

    return asyncio.run(run())


def test_ts_client_gets_hello_from_our_server(ts_vs_ours: TsRun) -> None:
    for name in ("hello", "query", "signed_headers"):
        result = ts_vs_ours.results[name]
        assert (result["status"], json.loads(result["body"])) == (200, {"hello": CLIENT_ID})
        assert result["headers"]["x-bsv-auth-identity-key"] == SERVER_ID


def test_ts_client_echoes_non_canonical_json(ts_vs_ours: TsRun) -> None:
    result = ts_vs_ours.results["echo"]
    assert (result["status"], result["body"]) == (200, '{"a": 1}')
    assert result["headers"]["x-bsv-echo"] == "yes"
    charset = ts_vs_ours.results["echo_charset"]
    assert (charset["status"], charset["body"]) == (200, "[1]")
    defaulted = ts_vs_ours.results["echo_no_body"]
    assert (defaulted["status"], defaulted["body"]) == (200, "{}")


def test_ts_client_echoes_text_and_stringified_bytes(ts_vs_ours: TsRun) -> None:
    text = ts_vs_ours.results["text"]
    assert (text["status"], text["body"]) == (200, "plain text ü")
    binary = ts_vs_ours.results["bin"]
    assert (binary["status"], binary["body"]) == (200, '{"0":0,"1":255}')


def test_ts_client_gets_our_empty_204(ts_vs_ours: TsRun) -> None:
    # The TS client hangs on the express server's 204 (varint(-1)); ours signs varint(0).
    result = ts_vs_ours.results["empty"]
    assert (result["status"], result["bodyHex"]) == (204, "")


def test_ts_client_gets_a_signed_error_status(ts_vs_ours: TsRun) -> None:
    teapot = ts_vs_ours.results["teapot"]
    assert (teapot["status"], json.loads(teapot["body"])) == (418, {"status": 418})


def test_ts_client_handshakes_once_with_our_server(ts_vs_ours: TsRun) -> None:
    assert ts_vs_ours.sessions == 1


async def test_both_clients_get_a_signed_404_from_our_server() -> None:
    # aiohttp's own HTTPNotFound (no such route) is signed like any other response (the
    # express server leaves the reference client hanging on its 404), and the connection
    # stays usable for the next request.
    server = Brc104Server(wallet(SERVER_KEY))
    async with serving(server) as url:
        missing, hello = await ts_fetch_session_async(
            [ts_request(url + "/no/such/route"), ts_request(url + "/hello")],
            private_key_hex=CLIENT_KEY,
        )
        async with AuthFetch(wallet(CLIENT_KEY)) as client:
            ours = await within(client.fetch(url + "/no/such/route"))
    assert missing["status"] == 404
    assert missing["headers"]["x-bsv-auth-identity-key"] == SERVER_ID
    assert (hello["status"], json.loads(hello["body"])) == (200, {"hello": CLIENT_ID})
    assert (ours.status, ours.identity_key) == (404, SERVER_ID)


# --- done when: `trustmesh brc103 serve` answers the TS client and `trustmesh brc103 fetch` ----


def test_cli_serve_answers_ts_client_and_cli_fetch(tmp_path: Path) -> None:
    server_key, client_key = tmp_path / "server.hex", tmp_path / "client.hex"
    server_key.write_text(SERVER_KEY + "\n")
    client_key.write_text(CLIENT_KEY)
    server_key.chmod(0o600)
    client_key.chmod(0o600)
    serve = subprocess.Popen(
        [TRUSTMESH, "brc103", "serve", "--host", "127.0.0.1", "--port", "0", "--key", server_key],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    assert serve.stdout is not None and serve.stderr is not None
    stdout = JsonLines(serve.stdout, "serve stdout")
    stderr = JsonLines(serve.stderr, "serve stderr")
    fetches: list[subprocess.Popen[bytes]] = []
    try:
        ready = stdout.wait_for(lambda line: True, "the listening line", WAIT)
        assert set(ready) == {"listening", "identityKey"}, stderr.dump()
        url = ready["listening"]
        assert url.startswith("http://127.0.0.1:")
        assert ready["identityKey"] == SERVER_ID

        fetch = [TRUSTMESH, "brc103", "fetch", "-v", "--key", str(client_key)]
        body = '{"n": [1, 2], "s": "ü"}'
        for extra in ([url + "/hello"], [url + "/echo", "-d", body]):
            fetches.append(
                subprocess.Popen(
                    [*fetch, *extra],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=clean_env(),
                )
            )
        # The TS client runs while our two fetch processes do.
        hello, echo = ts_fetch_session(
            [ts_request(url + "/hello"), ts_request(url + "/echo", "POST", JSON, body)],
            private_key_hex=CLIENT_KEY,
        )
        assert (hello["status"], json.loads(hello["body"])) == (200, {"hello": CLIENT_ID})
        assert hello["headers"]["x-bsv-auth-identity-key"] == SERVER_ID
        assert (echo["status"], echo["body"]) == (200, body)
        assert echo["headers"]["x-bsv-echo"] == "yes"

        outputs = [process.communicate(timeout=WAIT) for process in fetches]
        for process, (_, err) in zip(fetches, outputs, strict=True):
            assert process.returncode == 0, err.decode()
            assert err.decode().strip() == f"authenticated: HTTP 200 from {SERVER_ID}"
        assert json.loads(outputs[0][0]) == {"hello": CLIENT_ID}
        assert outputs[1][0].decode() == body

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=5) == 0, stderr.dump()
        stdout.wait_ended()
        stderr.wait_ended()
        assert stdout.lines == [ready]
    finally:
        everything: list[subprocess.Popen[Any]] = [*fetches, serve]
        for process in everything:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=WAIT)
        for process in fetches:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        stdout.close()  # joins the reader, then closes the pipe
        stderr.close()


# --- certificates, issued and checked across the implementations ---------------------------

FIELDS = {"name": "Alice Ünïcode", "email": "alice@example.org", "role": "admin"}


@pytest.fixture(scope="module")
def certs() -> Iterator[TsCerts]:
    with ts_certs_worker() as worker:
        yield worker


def ts_issue(certs: TsCerts, subject: str, fields: dict[str, str], **extra: str) -> dict[str, Any]:
    command = {
        "op": "issue",
        "certifierKey": CERTIFIER_KEY,
        "subject": subject,
        "type": CERT_TYPE,
        "fields": fields,
        **extra,
    }
    return certs(command)


def test_our_certificate_verifies_in_ts(certs: TsCerts) -> None:
    subject = wallet(CLIENT_KEY)
    master = MasterCertificate.issue(
        wallet(CERTIFIER_KEY), CLIENT_ID, CERT_TYPE, FIELDS, revocation_outpoint=OUTPOINT
    )
    # The signed preimage is byte for byte what the reference builds.
    binary = certs({"op": "binary", "certificate": master.certificate.to_json()})
    assert binary["hex"] == master.certificate.to_binary().hex()
    # Subject and certifier both open the master keyring with the reference code.
    for key, counterparty in ((CLIENT_KEY, CERTIFIER_ID), (CERTIFIER_KEY, CLIENT_ID)):
        command = {"key": key, "certificate": master.to_json(), "counterparty": counterparty}
        assert certs({"op": "decrypt", **command}) == {"fields": FIELDS}

    shown = master.reveal(subject, VERIFIER_ID, ["name", "role"])
    verified = certs({"op": "verify", "certificate": shown.to_json(), "verifierKey": VERIFIER_KEY})
    assert verified == {
        "valid": True,
        "signatureValid": True,
        "fields": {"name": FIELDS["name"], "role": "admin"},
    }
    # Someone else's key opens nothing; a changed field breaks the signature.
    other = certs({"op": "verify", "certificate": shown.to_json(), "verifierKey": SERVER_KEY})
    assert (other["valid"], other["signatureValid"]) == (False, True)
    forged = shown.to_json()
    forged["fields"]["role"] = forged["fields"]["email"]
    refused = certs({"op": "verify", "certificate": forged, "verifierKey": VERIFIER_KEY})
    assert (refused["valid"], refused["signatureValid"]) == (False, False)


def test_ts_certificate_verifies_in_ours(certs: TsCerts) -> None:
    subject, verifier = wallet(CLIENT_KEY), wallet(VERIFIER_KEY)
    ts_master = ts_issue(certs, CLIENT_ID, FIELDS, revocationOutpoint=OUTPOINT)
    master = MasterCertificate.from_json(ts_master)
    master.certificate.verify()
    assert master.certificate.revocation_outpoint == OUTPOINT
    assert master.to_json() == ts_master  # lossless, in the reference's key order
    assert master.decrypt_fields(subject) == FIELDS

    # Our reveal of their certificate, read by the reference verifier.
    ours = master.reveal(subject, VERIFIER_ID, ["email"])
    verified = certs({"op": "verify", "certificate": ours.to_json(), "verifierKey": VERIFIER_KEY})
    assert (verified["valid"], verified["fields"]) == (True, {"email": FIELDS["email"]})

    # Their reveal, read by us.
    command = {"subjectKey": CLIENT_KEY, "certificate": ts_master, "verifier": VERIFIER_ID}
    ts_shown = certs({"op": "reveal", "fieldsToReveal": ["name", "role"], **command})
    shown = VerifiableCertificate.from_json(ts_shown)
    shown.certificate.verify()
    assert shown.to_json() == ts_shown
    assert shown.decrypt_fields(verifier) == {"name": FIELDS["name"], "role": "admin"}
    with pytest.raises(CertificateError):
        shown.decrypt_fields(wallet(SERVER_KEY))

    forged = Certificate.from_json({**ts_master, "subject": VERIFIER_ID})
    with pytest.raises(CertificateError, match="signature"):
        forged.verify()


def test_ts_certificate_with_default_outpoint_verifies_in_ours(certs: TsCerts) -> None:
    # Without a revocation outpoint the reference writes a bare all-zero txid (no ".index"),
    # serialised as varint(NaN) = ff 00*8 (reference notes d.2).
    ts_master = ts_issue(certs, CLIENT_ID, {"name": "Bob"})
    assert ts_master["revocationOutpoint"] == "00" * 32
    master = MasterCertificate.from_json(ts_master)
    master.certificate.verify()
    assert not is_revocable(master.certificate.revocation_outpoint)
    assert master.certificate.to_json()["revocationOutpoint"] == "00" * 32
    binary = certs({"op": "binary", "certificate": ts_master})
    assert binary["hex"] == master.certificate.to_binary().hex()
    assert master.decrypt_fields(wallet(CLIENT_KEY)) == {"name": "Bob"}
    # ...and our reveal of it still verifies in the reference.
    shown = master.reveal(wallet(CLIENT_KEY), VERIFIER_ID, ["name"])
    verified = certs({"op": "verify", "certificate": shown.to_json(), "verifierKey": VERIFIER_KEY})
    assert (verified["valid"], verified["fields"]) == (True, {"name": "Bob"})


def check_field_order_both_ways(certs: TsCerts, names: list[str]) -> None:
    fields = {name: f"value of {name}" for name in names}
    ours = MasterCertificate.issue(wallet(CERTIFIER_KEY), CLIENT_ID, CERT_TYPE, fields)
    shown = ours.reveal(wallet(CLIENT_KEY), VERIFIER_ID, names)
    verified = certs({"op": "verify", "certificate": shown.to_json(), "verifierKey": VERIFIER_KEY})
    assert (verified["valid"], verified["fields"]) == (True, fields)
    theirs = MasterCertificate.from_json(ts_issue(certs, CLIENT_ID, fields))
    theirs.certificate.verify()
    assert theirs.decrypt_fields(wallet(CLIENT_KEY)) == fields


def test_field_names_sort_as_localecompare(certs: TsCerts) -> None:
    # The signature covers the fields in localeCompare order: case, punctuation, digits and
    # accented Latin letters must all sort as ICU sorts them.
    check_field_order_both_ways(
        certs,
        [
            *("b", "A", "a", "_x", "Z1", "é", "e", "field-2", "field_1", "Field1", "10", "9"),
            *("a b", "ab", "a-b", "ünï", "uni", "Ö", "o", "x.y", "x:y", "x@y", "x~y", "x$y"),
        ],
    )


def test_field_names_with_latin_letters_that_do_not_decompose(certs: TsCerts) -> None:
    # ß sorts as "ss", æ as "ae", ø and ł as o and l with a secondary difference (ICU root);
    # none of them has a Unicode decomposition.
    check_field_order_both_ways(certs, ["maß", "masz", "æra", "b", "øre", "p", "łódź", "m"])


# --- certificates inside handshakes ---------------------------------------------------------


def requested(*names: str) -> RequestedCertificates:
    return RequestedCertificates(certifiers=(CERTIFIER_ID,), types={CERT_TYPE: names})


async def test_our_client_validates_the_certificate_express_presents() -> None:
    # We issue the server's certificate; the reference server reveals it in its
    # initialResponse (only the requested field), our client checks and decrypts it.
    server_master = MasterCertificate.issue(
        wallet(CERTIFIER_KEY), SERVER_ID, CERT_TYPE, {"role": "server", "secret": "s"}
    )
    with start_ts_server(SERVER_KEY, certificates=[server_master.to_json()]) as server:
        async with AuthFetch(
            wallet(CLIENT_KEY), PeerConfig(requested_certificates=requested("role"))
        ) as client:
            response = await within(client.fetch(server.url + "/hello"))
            [session] = client.peer.sessions
    assert (response.status, json.loads(response.body)) == (200, {"hello": CLIENT_ID})
    assert session.certificates_validated
    [certificate] = session.certificates
    assert certificate.certificate.subject == SERVER_ID
    assert certificate.certificate.serial_number == server_master.certificate.serial_number
    assert certificate.decrypted_fields == {"role": "server"}


async def test_express_receives_the_certificate_our_client_presents(certs: TsCerts) -> None:
    # The reference issues our client's certificate; the reference server asks for it in its
    # initialResponse and our client answers with a certificateResponse.
    client_master = MasterCertificate.from_json(ts_issue(certs, CLIENT_ID, FIELDS))
    request = requested("name").to_json()
    with start_ts_server(SERVER_KEY, request_certificates=request) as server:
        config = PeerConfig(certificates=[client_master])
        async with AuthFetch(wallet(CLIENT_KEY), config) as client:
            response = await within(client.fetch(server.url + "/certs"))
            again = await within(client.fetch(server.url + "/hello"))
    assert response.status == 200
    [seen] = json.loads(response.body)["certificates"]
    assert (seen["subject"], seen["certifier"]) == (CLIENT_ID, CERTIFIER_ID)
    assert seen["serialNumber"] == client_master.certificate.serial_number
    assert seen["fields"] == {"name": FIELDS["name"]}
    assert (again.status, json.loads(again.body)) == (200, {"hello": CLIENT_ID})


async def test_ts_client_and_our_server_exchange_certificates(certs: TsCerts) -> None:
    # Our server asks the TS client for "name" and shows "role" when asked; the client's
    # certificate is ours, the server's is the reference's (default outpoint, no index).
    client_master = MasterCertificate.issue(
        wallet(CERTIFIER_KEY), CLIENT_ID, CERT_TYPE, FIELDS, revocation_outpoint=OUTPOINT
    )
    server_master = MasterCertificate.from_json(
        ts_issue(certs, SERVER_ID, {"role": "server", "secret": "s"})
    )
    config = PeerConfig(requested_certificates=requested("name"), certificates=[server_master])
    # The client's certificate has a revocable outpoint: a server needs a source to check it.
    server = Brc104Server(wallet(SERVER_KEY), config, revocation=LocalRevocationRegistry())
    async with serving(server) as url:
        first, second = await ts_fetch_session_async(
            [ts_request(url + "/hello"), ts_request(url + "/hello")],
            private_key_hex=CLIENT_KEY,
            certificates=[client_master.to_json()],
            request_certificates=requested("role").to_json(),
        )
    shown = [{"type": CERT_TYPE, "certifier": CERTIFIER_ID, "fields": {"name": FIELDS["name"]}}]
    for result in (first, second):
        assert result["status"] == 200
        assert json.loads(result["body"]) == {"hello": CLIENT_ID, "certificates": shown}
    [received] = first["certificatesReceived"]
    assert (received["subject"], received["fields"]) == (SERVER_ID, {"role": "server"})
    assert second["certificatesReceived"] == []
    [session] = server.peer.sessions
    assert session.certificates_validated
