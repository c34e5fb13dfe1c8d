"""The TypeScript reference harness works against itself (TS client <-> TS server, TS certs).

These tests check the harness (tests/cli/ts_harness.py, tests/interop/brc103_js/*.mjs), not
trustmesh: when a trustmesh interop test fails, this file tells whether the reference side
still behaves as recorded. They also pin reference quirks trustmesh must live with.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from ts_harness import (
    FETCH_TIMEOUT_EXIT,
    TsCerts,
    TsScriptError,
    TsServer,
    identity_key,
    start_ts_server,
    ts_certs,
    ts_certs_worker,
    ts_fetch,
    ts_fetch_async,
    ts_fetch_session,
    ts_request,
)

SERVER_KEY = "11" * 32
CLIENT_KEY = "22" * 32
CERTIFIER_KEY = "33" * 32
CERT_TYPE = base64.b64encode(b"trustmesh interop test type 0001").decode()
OUTPOINT = "ab" * 32 + ".1"


@pytest.fixture(scope="module")
def server() -> Iterator[TsServer]:
    with start_ts_server(SERVER_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def certs() -> Iterator[TsCerts]:
    with ts_certs_worker() as worker:
        yield worker


# The requests of one TS client session (one Node start-up and handshake for all of them).
SESSION = {
    "hello": ("/hello", "GET", None, None),
    "echo": ("/echo", "POST", "application/json", '{"a":1,"text":"héllo / ünïcode"}'),
    "text": ("/echo-text", "POST", "text/plain", "plain text"),
    "bin": ("/echo-bin", "POST", "application/octet-stream", b"\x00\xff\x10"),
    "teapot": ("/status/418?q=1", "GET", None, None),
}


@pytest.fixture(scope="module")
def responses(server: TsServer) -> dict[str, dict[str, Any]]:
    requests = [
        ts_request(server.url + path, method, {"content-type": ctype} if ctype else None, body)
        for path, method, ctype, body in SESSION.values()
    ]
    results = ts_fetch_session(requests, private_key_hex=CLIENT_KEY)
    return dict(zip(SESSION, results, strict=True))


def test_server_reports_its_identity_key(server: TsServer) -> None:
    assert server.identity_key == identity_key(SERVER_KEY)
    assert server.url.startswith("http://127.0.0.1:")


def test_hello_returns_the_client_identity_key(
    server: TsServer, responses: dict[str, dict[str, Any]]
) -> None:
    response = responses["hello"]
    assert response["status"] == 200
    assert json.loads(response["body"]) == {"hello": identity_key(CLIENT_KEY)}
    # AuthFetch adds the server's authenticated key; the server's content-type is not signed
    # and never reaches the caller.
    assert response["headers"] == {"x-bsv-auth-identity-key": server.identity_key}
    assert response["certificatesReceived"] == []


def test_echo_returns_the_json_body_and_a_signed_header(
    responses: dict[str, dict[str, Any]],
) -> None:
    response = responses["echo"]
    assert response["status"] == 200
    assert response["body"] == SESSION["echo"][3]  # already in JSON.stringify form
    assert response["headers"]["x-bsv-echo"] == "yes"


def test_echo_text(responses: dict[str, dict[str, Any]]) -> None:
    assert (responses["text"]["status"], responses["text"]["body"]) == (200, "plain text")


def test_binary_request_bodies_are_json_stringified_by_authfetch(
    responses: dict[str, dict[str, Any]],
) -> None:
    # AuthFetch 2.1.0 runs every non-string body (Uint8Array, number[], ArrayBuffer, Blob)
    # through JSON.stringify before signing and sending it: bytes 00 ff 10 go out as
    # '{"0":0,"1":255,"2":16}'. The signature covers what is sent, so servers just echo it.
    assert responses["bin"]["status"] == 200
    assert bytes.fromhex(responses["bin"]["bodyHex"]) == b'{"0":0,"1":255,"2":16}'


def test_status_code_is_signed_and_returned(responses: dict[str, dict[str, Any]]) -> None:
    assert responses["teapot"]["status"] == 418
    assert json.loads(responses["teapot"]["body"]) == {"status": 418}


def test_authfetch_hangs_on_an_empty_response_body(server: TsServer) -> None:
    # The express server signs an empty body as varint(-1), AuthFetch verifies against
    # varint(0) and never settles (reference notes f.2). fetch.mjs's own timeout ends it.
    with pytest.raises(TsScriptError) as failure:
        ts_fetch(server.url + "/empty", private_key_hex=CLIENT_KEY, timeout_ms=800)
    assert failure.value.returncode == FETCH_TIMEOUT_EXIT


def issue_reveal(certs: TsCerts, fields_to_reveal: list[str], verifier: str) -> tuple[Any, Any]:
    master = certs(
        {
            "op": "issue",
            "certifierKey": CERTIFIER_KEY,
            "subject": identity_key(CLIENT_KEY),
            "type": CERT_TYPE,
            "fields": {"name": "Alice", "email": "alice@example.org"},
            "revocationOutpoint": OUTPOINT,
        }
    )
    verifiable = certs(
        {
            "op": "reveal",
            "subjectKey": CLIENT_KEY,
            "certificate": master,
            "fieldsToReveal": fields_to_reveal,
            "verifier": verifier,
        }
    )
    return master, verifiable


def test_certificate_issue_reveal_verify_round_trip(certs: TsCerts) -> None:
    master, verifiable = issue_reveal(certs, ["name"], identity_key(SERVER_KEY))
    assert master["certifier"] == identity_key(CERTIFIER_KEY)
    assert set(master["masterKeyring"]) == {"name", "email"}
    # The TS wire key order (it is signed over in certificateResponse messages).
    assert list(verifiable) == [
        "type",
        "serialNumber",
        "subject",
        "certifier",
        "revocationOutpoint",
        "fields",
        "signature",
        "keyring",
    ]
    assert set(verifiable["keyring"]) == {"name"}

    verified = certs({"op": "verify", "certificate": verifiable, "verifierKey": SERVER_KEY})
    assert verified == {"valid": True, "signatureValid": True, "fields": {"name": "Alice"}}

    tampered = {**verifiable, "fields": {**verifiable["fields"], "name": master["fields"]["email"]}}
    rejected = certs({"op": "verify", "certificate": tampered, "verifierKey": SERVER_KEY})
    assert (rejected["valid"], rejected["signatureValid"]) == (False, False)


async def test_certificates_are_exchanged_over_http(certs: TsCerts) -> None:
    # Both sides request and present certificates in the handshake: the server gets the
    # client's certificate (initiator -> certificateResponse), the client the server's one
    # (in the initialResponse). Also exercises the harness's asyncio variant.
    certifier = identity_key(CERTIFIER_KEY)
    server_master = certs(
        {
            "op": "issue",
            "certifierKey": CERTIFIER_KEY,
            "subject": identity_key(SERVER_KEY),
            "type": CERT_TYPE,
            "fields": {"role": "server"},
            "revocationOutpoint": OUTPOINT,
        }
    )
    client_master, _ = issue_reveal(certs, [], identity_key(SERVER_KEY))
    with start_ts_server(
        SERVER_KEY,
        request_certificates={"certifiers": [certifier], "types": {CERT_TYPE: ["name"]}},
        certificates=[server_master],
    ) as cert_server:
        response = await ts_fetch_async(
            cert_server.url + "/certs",
            private_key_hex=CLIENT_KEY,
            request_certificates={"certifiers": [certifier], "types": {CERT_TYPE: ["role"]}},
            certificates=[client_master],
        )
    assert response["status"] == 200
    [seen_by_server] = json.loads(response["body"])["certificates"]
    assert seen_by_server["subject"] == identity_key(CLIENT_KEY)
    assert seen_by_server["fields"] == {"name": "Alice"}  # only the requested field
    [seen_by_client] = response["certificatesReceived"]
    assert seen_by_client["subject"] == identity_key(SERVER_KEY)
    assert seen_by_client["fields"] == {"role": "server"}


def test_one_shot_certs_command_and_worker_errors(certs: TsCerts) -> None:
    master, _ = issue_reveal(certs, [], identity_key(SERVER_KEY))
    command = {"op": "decrypt", "key": CLIENT_KEY, "certificate": master}
    decrypted = ts_certs({**command, "counterparty": master["certifier"]})
    assert decrypted == {"fields": {"name": "Alice", "email": "alice@example.org"}}
    with pytest.raises(TsScriptError, match="unknown op"):
        certs({"op": "toString"})
    # The worker survives a failed command.
    assert certs({"op": "binary", "certificate": master})["hex"].endswith(master["signature"])
