"""Issue 16, items 1, 2, 4 and 5 over real HTTPS: a rotation whose body is held back
until its certificate is revoked or expired gets no certificate; a superseded
certificate gets 409; enrollment and rotation retries get the certificate already
issued; expired and revoked admin credentials get 401."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from ca_support import RunningCa, make_csr
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import trustmesh.api.ca as ca_api_module
from trustmesh.api.errors import json_body
from trustmesh.clock import SystemClock
from trustmesh.pki.ca import token_hash
from trustmesh.pki.store import admin_token_id

Factory = Callable[..., Any]


class Clock(SystemClock):
    """The CA API's clock: real time (so the TLS certificates verify) plus an offset."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return super().now() + self.offset


async def _held_back_rotation(
    running: RunningCa,
    cert_file: Path,
    key_file: Path,
    body: dict[str, str],
    meanwhile: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[int, dict[str, Any]]:
    """POST /v1/rotate whose body arrives only after the server has authenticated the
    client certificate and ``meanwhile`` has run.

    The handler authenticates, then awaits the body: the body is held back at that
    await (the HTTP layer may have buffered it already, so holding it back on the
    socket would not reach the window the handler leaves open)."""
    waiting = asyncio.Event()
    release = asyncio.Event()

    async def held_back(request: web.Request) -> dict[str, object]:
        waiting.set()
        await release.wait()
        return await json_body(request)

    monkeypatch.setattr(ca_api_module, "json_body", held_back)
    session = running.session(cert_file, key_file)

    async def post() -> tuple[int, dict[str, Any]]:
        async with session.post(f"{running.url}/v1/rotate", json=body) as response:
            return response.status, await response.json()

    request = asyncio.create_task(post())
    async with asyncio.timeout(30):
        await waiting.wait()
    meanwhile()
    release.set()
    async with asyncio.timeout(30):
        return await request


@pytest.mark.parametrize(
    ("what", "status", "code", "message"),
    [
        ("revoke node_id", 403, "policy_denied", "revoked (keyCompromise)"),
        ("revoke serial", 403, "policy_denied", "revoked (keyCompromise)"),
        ("expire", 401, "unauthenticated", "expired"),
    ],
)
async def test_a_rotation_held_back_until_its_certificate_is_revoked_gets_no_certificate(
    ca_api_factory: Factory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    what: str,
    status: int,
    code: str,
    message: str,
) -> None:
    """Today's code answers 200 with a fresh, unrevoked certificate."""
    clock = Clock()
    running: RunningCa = await ca_api_factory(clock=clock)
    cert_file, key_file, cert = running.write_node(tmp_path, "node-1")
    csr, _ = make_csr("node-1")

    def meanwhile() -> None:
        if what == "revoke node_id":
            running.ca.revoke(node_id="node-1", reason="keyCompromise")
        elif what == "revoke serial":
            running.ca.revoke(serial=cert.serial_number, reason="keyCompromise")
        else:
            clock.offset = cert.not_valid_after_utc - datetime.now(UTC) + timedelta(seconds=1)

    body = {"csr": csr}
    got, answer = await _held_back_rotation(
        running, cert_file, key_file, body, meanwhile, monkeypatch
    )
    assert (got, answer.get("error")) == (status, code), answer
    assert message in answer["message"]
    assert [c.serial for c in running.ca.store.by_node("node-1")] == [cert.serial_number]


async def _rotate(
    session: aiohttp.ClientSession, url: str, body: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{url}/v1/rotate", json=body) as response:
        return response.status, await response.json()


async def test_a_superseded_certificate_gets_409_and_a_retry_the_same_certificate(
    ca_api: RunningCa, tmp_path: Path
) -> None:
    cert_file, key_file, cert = ca_api.write_node(tmp_path, "node-1")
    session = ca_api.session(cert_file, key_file)
    csr, key = make_csr("node-1")
    status, first = await _rotate(session, ca_api.url, {"csr": csr})
    assert status == 200
    # The answer was lost: the node asks again with a new CSR for the same key.
    again_csr, _ = make_csr("node-1", key)
    status, again = await _rotate(session, ca_api.url, {"csr": again_csr})
    assert (status, again["serial"], again["certificate"]) == (
        200,
        first["serial"],
        first["certificate"],
    )
    for _ in range(2):  # today: two more live certificates
        status, refused = await _rotate(session, ca_api.url, {"csr": make_csr("node-1")[0]})
        assert (status, refused["error"]) == (409, "superseded")
        assert first["serial"] in refused["message"]
    live = [c for c in ca_api.ca.store.by_node("node-1") if c.revoked_at is None]
    assert [c.serial_hex for c in live] == [format(cert.serial_number, "x"), first["serial"]]
    assert live[1].replaces == cert.serial_number


async def test_current_cert_serial_mismatch_is_a_400_with_its_own_code(
    ca_api: RunningCa, tmp_path: Path
) -> None:
    cert_file, key_file, _ = ca_api.write_node(tmp_path, "node-1")
    body = {"csr": make_csr("node-1")[0], "current_cert_serial": "abc123"}
    status, answer = await _rotate(ca_api.session(cert_file, key_file), ca_api.url, body)
    assert (status, answer["error"]) == (400, "serial_mismatch")
    assert len(ca_api.ca.store.by_node("node-1")) == 1


async def test_an_enrollment_whose_answer_was_lost_is_answered_again(ca_api: RunningCa) -> None:
    """The first answer is dropped (the client goes away before reading it, as when the
    CA is killed after committing); the retry with the same token and key gets the same
    certificate, and another key is still refused."""
    token = ca_api.token("node-1")
    csr, key = make_csr("node-1")
    body = json.dumps({"token": token, "csr": csr}).encode()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", ca_api.server.port, ssl=ca_api.ssl_context(), server_hostname="127.0.0.1"
    )
    writer.write(
        b"POST /v1/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    async with asyncio.timeout(30):
        await reader.readuntil(b"\r\n")  # the CA has answered: it committed
    writer.close()
    (issued,) = ca_api.ca.store.by_node("node-1")
    session = ca_api.session()
    retry = {"token": token, "csr": make_csr("node-1", key)[0]}
    async with session.post(f"{ca_api.url}/v1/enroll", json=retry) as response:
        assert response.status == 200
        answer = await response.json()
    assert (answer["serial"], answer["certificate"]) == (issued.serial_hex, issued.pem)
    other = {"token": token, "csr": make_csr("node-1")[0]}
    async with session.post(f"{ca_api.url}/v1/enroll", json=other) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_token"
    assert len(ca_api.ca.store.by_node("node-1")) == 1


async def _revoke(
    session: aiohttp.ClientSession, url: str, serial: int, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any] | None]:
    body = {"serial": format(serial, "x")}
    async with session.post(f"{url}/v1/revoke", json=body, headers=headers or {}) as response:
        data = await response.read()
        return response.status, json.loads(data) if data else None


async def test_expired_and_revoked_admin_tokens_get_401(
    ca_api_factory: Factory, tmp_path: Path
) -> None:
    clock = Clock()
    running: RunningCa = await ca_api_factory(clock=clock)
    _, _, cert = running.write_node(tmp_path, "node-1")
    session = running.session()
    short = running.ca.create_admin_token("ops", ttl=timedelta(seconds=2))
    revoked = running.ca.create_admin_token("old")
    running.ca.revoke_admin_token(admin_token_id(token_hash(revoked)))
    status, answer = await _revoke(
        session, running.url, cert.serial_number, {"Authorization": f"Bearer {revoked}"}
    )
    assert (status, answer) == (
        401,
        {"error": "unauthenticated", "message": "the admin token is revoked"},
    )
    clock.offset = timedelta(seconds=3)
    status, answer = await _revoke(
        session, running.url, cert.serial_number, {"Authorization": f"Bearer {short}"}
    )
    assert (status, answer) == (
        401,
        {"error": "unauthenticated", "message": "the admin token is expired"},
    )
    clock.offset = timedelta(0)
    status, _ = await _revoke(
        session, running.url, cert.serial_number, {"Authorization": f"Bearer {short}"}
    )
    assert status == 204


def _write_admin(
    running: RunningCa, directory: Path, validity: timedelta
) -> tuple[Path, Path, x509.Certificate]:
    _, key = make_csr("alice")
    cert = running.ca.issue_admin("alice", key.public_key(), validity=validity)
    key_file, cert_file = directory / "admin.key", directory / "admin.crt"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + running.ca.issuing_cert.public_bytes(serialization.Encoding.PEM)
    )
    return cert_file, key_file, cert


async def test_expired_and_revoked_admin_certificates_get_401(
    ca_api_factory: Factory, tmp_path: Path
) -> None:
    clock = Clock()
    running: RunningCa = await ca_api_factory(clock=clock)
    _, _, node = running.write_node(tmp_path, "node-1")
    cert_file, key_file, admin = _write_admin(running, tmp_path, timedelta(hours=1))
    session = running.session(cert_file, key_file)
    clock.offset = timedelta(hours=2)
    status, answer = await _revoke(session, running.url, node.serial_number)
    assert status == 401 and answer is not None and "does not verify" in answer["message"]
    clock.offset = timedelta(0)
    running.ca.revoke(serial=admin.serial_number, reason="keyCompromise")
    status, answer = await _revoke(session, running.url, node.serial_number)
    assert status == 401 and answer is not None and "revoked" in answer["message"]
    record = running.ca.store.get(node.serial_number)
    assert record is not None and record.revoked_at is None
