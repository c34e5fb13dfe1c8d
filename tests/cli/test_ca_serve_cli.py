"""``trustmesh ca serve`` as a process: admin client certificates, the rate limit, the
server certificate's name, and kill -9 in the middle of issuing.

One CA and one server (127.0.0.1, a generous rate limit) serve the module; the tests that
need other options start their own server on the same CA (or, for kill -9, a CA of its
own). Every server is stopped with SIGTERM and must exit 0, except the one killed.
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from catools import (
    JSON,
    PASS,
    WAIT,
    OpenSsl,
    SharedCa,
    concurrently,
    curl,
    require_curl,
    serving,
    shared_ca,
    split_pem,
    trustmesh,
)

from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.pki.ca import CertificateAuthority


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCa]:
    with shared_ca(tmp_path_factory, "serve-ca") as running:
        yield running


def csr_pem(node_id: str) -> str:
    return make_csr(PrivateKey.generate(KeyKind.P256), node_id)


# --- admin client certificates --------------------------------------------------------------


def test_an_admin_certificate_revokes_and_a_node_certificate_may_not(
    shared: SharedCa, require_openssl: str, tmp_path: Path
) -> None:
    openssl = OpenSsl(require_openssl, tmp_path)
    ca, d = shared.ca_cert, shared.directory
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    made_alice, made_bob = concurrently(
        (("ca", "admin-cert", "--dir", d, "--name", "alice", "--out", alice, "--no-encrypt"), PASS),
        (("ca", "admin-cert", "--dir", d, "--name", "bob", "--out", bob, "--json"), PASS),
    )
    assert made_alice.returncode == 0, made_alice.stderr
    assert made_bob.returncode == 0, made_bob.stderr
    assert json.loads(made_bob.stdout)["name"] == "bob"
    for folder in (alice, bob):
        assert {p.name for p in folder.iterdir()} == {"admin.key", "admin.crt", "ca.crt"}
        assert (folder / "ca.crt").read_bytes() == ca.read_bytes()
        assert (folder / "admin.key").stat().st_mode & 0o777 == 0o600
    assert (alice / "admin.key").read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert (bob / "admin.key").read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    admin_crt = alice / "admin.crt"
    leaf_pem, issuing_pem = split_pem(admin_crt.read_text())
    assert issuing_pem == (d / "issuing.crt").read_text()
    verified = openssl.run("verify", "-CAfile", ca, "-untrusted", admin_crt, admin_crt)
    assert verified.returncode == 0, verified.stderr
    (leaf := tmp_path / "alice-leaf.crt").write_text(leaf_pem)
    names = openssl("x509", "-in", leaf, "-noout", "-ext", "subjectAltName")
    assert "URI:urn:trustmesh:admin:alice" in names and "DNS:" not in names

    # A node to revoke, enrolled with curl.
    key, csr = openssl.csr("v", "node-v")
    body = json.dumps({"token": shared.authority.create_token("node-v"), "csr": csr.read_text()})
    reply = curl(f"{shared.url}/v1/enroll", "--cacert", ca, "-H", JSON, "-d", body)
    assert reply.status == 200, reply
    victim = int(reply.json()["serial"], 16)
    (node_crt := tmp_path / "v.crt").write_text(reply.json()["certificate"])
    revoke_v = json.dumps({"node_id": "node-v", "reason": "keyCompromise"})

    # The node's own certificate is not an admin's.
    as_node = ("--cacert", ca, "--cert", node_crt, "--key", key, "-H", JSON)
    reply = curl(f"{shared.url}/v1/revoke", *as_node, "-d", revoke_v)
    assert reply.error(403, "forbidden") == "'node-v' is not an admin of this CA"
    record = shared.authority.store.get(victim)
    assert record is not None and record.revoked_at is None

    # No credentials, or a bearer token the CA never made: 401, asking for a bearer token.
    for extra in ((), ("-H", "Authorization: Bearer tmadmin_forged")):
        reply = curl(f"{shared.url}/v1/revoke", "--cacert", ca, "-H", JSON, *extra, "-d", revoke_v)
        reply.error(401, "unauthenticated")
        assert reply.headers["www-authenticate"] == "Bearer"

    # Alice's certificate (unencrypted key) revokes: 204, recorded with her name.
    as_alice = ("--cacert", ca, "--cert", admin_crt, "--key", alice / "admin.key", "-H", JSON)
    reply = curl(f"{shared.url}/v1/revoke", *as_alice, "-d", revoke_v)
    assert (reply.status, reply.body) == (204, b""), reply
    record = shared.authority.store.get(victim)
    assert record is not None and record.revoked_at is not None
    assert record.reason == "keyCompromise"
    [entry] = [e for e in shared.authority.store.audit(20) if e.event == "revoke"]
    assert (entry.serial, entry.actor) == (format(victim, "x"), "cert:alice")

    # Bob's key is encrypted with $TRUSTMESH_PASSPHRASE: curl opens it with --pass. He
    # gets past authentication: the serial he names is unknown (404), not a 401 or 403.
    as_bob = ("--cacert", ca, "--cert", bob / "admin.crt", "--key", bob / "admin.key")
    reply = curl(
        f"{shared.url}/v1/revoke", *as_bob, "--pass", PASS, "-H", JSON, "-d", '{"serial": "abc"}'
    )
    assert reply.error(404, "unknown_certificate") == "no certificate with serial abc"

    # An admin certificate is no node certificate: it cannot rotate.
    rotation = json.dumps({"csr": csr_pem("alice")})
    reply = curl(f"{shared.url}/v1/rotate", *as_alice, "-d", rotation)
    reply.error(403, "policy_denied")


# --- rate limiting ------------------------------------------------------------------------------


def test_the_third_quick_request_is_rate_limited(shared: SharedCa, tmp_path: Path) -> None:
    first, third = (shared.authority.create_token(n) for n in ("node-r1", "node-r2"))
    bodies = [
        {"token": first, "csr": csr_pem("node-r1")},
        {"token": first, "csr": csr_pem("node-r1")},  # spent: a refusal counts too
        {"token": third, "csr": csr_pem("node-r2")},
    ]
    with serving(shared.directory, "--rate", "1", "--burst", "2") as server:
        # One curl for all requests (--next), so they come within milliseconds: the
        # bucket (2 tokens, refilled at 1 per second) is empty at the third.
        each = ("--noproxy", "*", "--max-time", str(WAIT), "--cacert", shared.ca_cert)
        options: list[str | Path] = []
        for i, body in enumerate(bodies):
            (request := tmp_path / f"body{i}.json").write_text(json.dumps(body))
            options += [
                *(*each, "-H", JSON, "-d", f"@{request}"),
                *("-D", tmp_path / f"head{i}", "-o", tmp_path / f"out{i}"),
                *("-w", "%{http_code}\n", f"{server.url}/v1/enroll", "--next"),
            ]
        options += [  # health is not rate limited
            *(*each, "-o", tmp_path / "out3", "-w", "%{http_code}\n"),
            f"{server.url}/v1/health",
        ]
        done = subprocess.run(
            [require_curl(), "-q", "-sS", *map(str, options)],
            capture_output=True,
            text=True,
            timeout=WAIT + 5,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["200", "400", "429", "200"], (done.stdout, server.errors())
        assert server.terminate() == 0, server.errors()

    status, *lines = (tmp_path / "head2").read_bytes().decode().strip().split("\r\n")
    assert status == "HTTP/1.1 429 Too Many Requests"
    headers = {name.lower(): value for name, _, value in (h.partition(": ") for h in lines)}
    assert headers["content-type"].startswith("application/json")
    assert headers["retry-after"] == "1"
    assert json.loads((tmp_path / "out2").read_text()) == {
        "error": "rate_limited",
        "message": "too many requests from this client; retry in 1 s",
    }
    # The refused request did not spend its token: it enrolls on the other server.
    again = f"@{tmp_path / 'body2.json'}"
    reply = curl(f"{shared.url}/v1/enroll", "--cacert", shared.ca_cert, "-H", JSON, "-d", again)
    assert reply.status == 200, reply
    assert reply.json()["node_id"] == "node-r2"


# --- the server certificate's name ---------------------------------------------------------------


def peer_names(port: int, name: str, ca_cert: Path) -> tuple[tuple[str, str], ...]:
    """The subjectAltName of the server at 127.0.0.1:port, verified for ``name``."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        cert = tls.getpeercert()
    assert cert is not None
    names: tuple[tuple[str, str], ...] = cert["subjectAltName"]  # type: ignore[assignment]
    return names


def test_the_server_certificate_names_the_host(shared: SharedCa) -> None:
    ca = shared.ca_cert
    assert peer_names(shared.server.port, "127.0.0.1", ca) == (("IP Address", "127.0.0.1"),)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        peer_names(shared.server.port, "localhost", ca)

    with serving(shared.directory, "--host", "localhost") as server:
        assert server.url == f"https://localhost:{server.port}"
        assert peer_names(server.port, "localhost", ca) == (("DNS", "localhost"),)
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            peer_names(server.port, "127.0.0.1", ca)
        health = curl(f"{server.url}/v1/health", "--cacert", ca)
        assert health.status == 200 and health.json()["status"] == "ok"
        assert server.terminate() == 0, server.errors()


# --- kill -9 during issuance ---------------------------------------------------------------------

ENROLLMENTS = 48
KILL_AFTER = 8  # successful enrollments before the kill


def enroll_once(port: int, context: ssl.SSLContext, token: str, csr: str) -> tuple[int, Any]:
    """One POST /v1/enroll on a connection of its own: (status, JSON body)."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=WAIT)
    try:
        body = json.dumps({"token": token, "csr": csr})
        connection.request("POST", "/v1/enroll", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_kill_9_during_issuance_loses_no_certificate(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    authority = CertificateAuthority.init(directory, PASS.encode())
    try:
        node_ids = [f"node-k{i}" for i in range(ENROLLMENTS)]
        tokens = {n: authority.create_token(n) for n in node_ids}
    finally:
        authority.close()
    csrs = {n: csr_pem(n) for n in node_ids}
    context = ssl.create_default_context(cafile=str(directory / "ca.crt"))

    received: dict[str, str] = {}  # node_id -> serial, from 200 answers
    failed: list[BaseException] = []
    lock = threading.Lock()
    enough = threading.Event()

    with serving(directory, "--rate", "1000", "--burst", "1000") as server:

        def client(node_id: str) -> None:
            try:
                status, answer = enroll_once(server.port, context, tokens[node_id], csrs[node_id])
            except (OSError, http.client.HTTPException) as exc:  # the server died
                with lock:
                    failed.append(exc)
                return
            assert status == 200, answer
            assert answer["node_id"] == node_id
            with lock:
                received[node_id] = answer["serial"]
                if len(received) >= KILL_AFTER:
                    enough.set()

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(client, n) for n in node_ids]
            assert enough.wait(WAIT), server.errors()
            assert server.kill() == -9
            for future in futures:
                future.result(timeout=WAIT)
    assert len(received) >= KILL_AFTER
    assert failed, "every enrollment finished before the kill: it killed nothing in flight"

    # Every certificate a client received is in the CA's list, as valid, for its node.
    listing = trustmesh("ca", "list", "--dir", directory, "--jsonl")
    assert listing.returncode == 0, listing.stderr
    rows = {row["serial"]: row for row in map(json.loads, listing.stdout.splitlines())}
    for node_id, serial in received.items():
        assert serial in rows, f"{node_id}: certificate {serial} was handed out but not kept"
        assert (rows[serial]["node_id"], rows[serial]["state"]) == (node_id, "valid")

    # The database is intact, and consistent: each spent token names a kept certificate
    # and each node certificate spent a token (the server may have committed some it had
    # no time to send).
    with closing(sqlite3.connect(directory / "ca.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        orphans = db.execute(
            "SELECT COUNT(*) FROM tokens t LEFT JOIN certificates c ON c.serial = t.used_serial"
            " WHERE t.used_at IS NOT NULL AND c.serial IS NULL"
        ).fetchone()
        assert orphans == (0,)
        spent = db.execute("SELECT COUNT(*) FROM tokens WHERE used_at IS NOT NULL").fetchone()
        nodes = db.execute("SELECT COUNT(*) FROM certificates WHERE role = 'node'").fetchone()
        assert spent == nodes
        unspent = [row[0] for row in db.execute("SELECT node_id FROM tokens WHERE used_at IS NULL")]
    assert spent[0] >= len(received)

    # Restarted, the CA answers a retry (the same token and key) with the certificate
    # already issued, also to a client whose answer the kill lost (issue 16, item 4);
    # it refuses a spent token with another key, and still enrolls with an unspent one.
    with serving(directory, "--rate", "1000", "--burst", "1000") as server:
        for node_id in received:
            status, answer = enroll_once(server.port, context, tokens[node_id], csrs[node_id])
            assert (status, answer["serial"]) == (200, received[node_id]), answer
            status, answer = enroll_once(server.port, context, tokens[node_id], csr_pem(node_id))
            assert (status, answer) == (
                400,
                {"error": "invalid_token", "message": "the enrollment token was already used"},
            )
        lost = [n for n in node_ids if n not in received and n not in unspent]
        for node_id in lost:  # committed, but the answer never left
            status, answer = enroll_once(server.port, context, tokens[node_id], csrs[node_id])
            assert status == 200, answer
            assert rows[answer["serial"]]["node_id"] == node_id  # the one committed
        assert unspent, "every token was spent"
        node_id = unspent[0]
        status, answer = enroll_once(server.port, context, tokens[node_id], csrs[node_id])
        assert status == 200, answer
        assert server.terminate() == 0, server.errors()
