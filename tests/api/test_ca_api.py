"""The CA's HTTP API over real HTTPS (trustmesh TLS) on loopback: enrollment, the token
race, rotation over mTLS, admin revocation, the CRL's caching headers, JSON errors and
rate limits. Clock-dependent behaviour runs the same app over plain HTTP with a fake
clock (a far-future clock would make the real TLS certificates look not yet valid)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from ca_support import RunningCa, make_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from trustmesh.api.ca import ca_app
from trustmesh.api.ca_server import CaServer
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.clock import FakeClock
from trustmesh.pki.ca import CRL_VALIDITY, CertificateAuthority
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar

Factory = Callable[..., Any]


async def _enroll(
    session: aiohttp.ClientSession, url: str, token: str, node_id: str
) -> tuple[int, dict[str, Any]]:
    pem, _ = make_csr(node_id)
    async with session.post(f"{url}/v1/enroll", json={"token": token, "csr": pem}) as response:
        return response.status, await response.json()


async def test_enroll_returns_certificate_chain_and_mesh_config(ca_api_factory: Factory) -> None:
    settings = MeshSettings(("10.0.0.1:9443", "10.0.0.2:9443"), 4, "https://ca.example/v1/crl")
    running: RunningCa = await ca_api_factory(settings=settings)
    status, body = await _enroll(running.session(), running.url, running.token("node-1"), "node-1")
    assert status == 200
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    chain = x509.load_pem_x509_certificates(body["ca_cert"].encode())
    assert chain == [running.ca.issuing_cert, running.ca.root_cert]
    cert.verify_directly_issued_by(chain[0])
    assert body["serial"] == format(cert.serial_number, "x")
    assert body["config"] == {
        "bootstrap_peers": ["10.0.0.1:9443", "10.0.0.2:9443"],
        "gossip_fanout": 4,
        "crl_url": "https://ca.example/v1/crl",
    }
    assert "warnings" not in body


async def test_fifty_parallel_enrollments_with_one_token_give_one_certificate(
    ca_api: RunningCa,
) -> None:
    token = ca_api.token("node-1")
    session = ca_api.session()
    results = await asyncio.gather(
        *(_enroll(session, ca_api.url, token, "node-1") for _ in range(50))
    )
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [400] * 49
    refusals = {body["error"] for status, body in results if status == 400}
    assert refusals == {"invalid_token"}
    assert len(ca_api.ca.store.by_node("node-1")) == 1


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "JSON object body"),
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"csr": "x"}', 400, "missing field 'token'"),
        (b'{"token": 5, "csr": "x"}', 400, "must be a string"),
        (b"\xff\xfe", 400, "not valid JSON"),
    ],
)
async def test_malformed_requests_get_json_errors(
    ca_api: RunningCa, body: bytes, status: int, message: str
) -> None:
    async with ca_api.session().post(f"{ca_api.url}/v1/enroll", data=body) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        answer = await response.json()
    assert message in answer["message"]


async def test_router_errors_and_oversized_bodies_are_json(ca_api: RunningCa) -> None:
    session = ca_api.session()
    async with session.get(f"{ca_api.url}/v1/nope") as response:
        assert response.status == 404
        assert (await response.json())["error"] == "not_found"
    async with session.get(f"{ca_api.url}/v1/enroll") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await response.json())["error"] == "method_not_allowed"
    async with session.post(f"{ca_api.url}/v1/enroll", data=b"x" * (128 * 1024)) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "too_large"


async def test_rate_limit_answers_429_until_the_bucket_refills(ca_api_factory: Factory) -> None:
    now = [0.0]
    running: RunningCa = await ca_api_factory(limiter=RateLimiter(1.0, 2, clock=lambda: now[0]))
    session = running.session()
    statuses = []
    for _ in range(3):
        status, body = await _enroll(session, running.url, "tmenroll_unknown", "node-1")
        statuses.append(status)
    assert statuses == [400, 400, 429]
    assert body["error"] == "rate_limited"
    async with session.post(f"{running.url}/v1/enroll", json={}) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
    now[0] += 1.0
    status, _ = await _enroll(session, running.url, "tmenroll_unknown", "node-1")
    assert status == 400  # a token back in the bucket: the request is served again


# --- rotation -------------------------------------------------------------------------------


async def test_rotate_over_mtls(ca_api: RunningCa, tmp_path: Path) -> None:
    cert_file, key_file, old = ca_api.write_node(tmp_path, "node-1")
    pem, _ = make_csr("node-1")
    body = {"csr": pem, "current_cert_serial": format(old.serial_number, "x")}
    async with ca_api.session(cert_file, key_file).post(
        f"{ca_api.url}/v1/rotate", json=body
    ) as response:
        assert response.status == 200
        answer = await response.json()
    new = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert answer["previous_serial"] == format(old.serial_number, "x")
    assert new.serial_number != old.serial_number
    assert datetime.fromisoformat(answer["valid_not_before"]) < old.not_valid_after_utc
    assert datetime.fromisoformat(answer["valid_not_after"]) >= old.not_valid_after_utc


async def test_rotate_without_with_foreign_and_with_revoked_certificates(
    ca_api_factory: Factory, tmp_path: Path
) -> None:
    running: RunningCa = await ca_api_factory()
    other: RunningCa = await ca_api_factory()
    pem, _ = make_csr("node-1")
    url = f"{running.url}/v1/rotate"
    async with running.session().post(url, json={"csr": pem}) as response:
        assert response.status == 401
        assert (await response.json())["error"] == "unauthenticated"
    foreign_cert, foreign_key, _ = other.write_node(tmp_path / "other", "node-1")
    async with running.session(foreign_cert, foreign_key).post(url, json={"csr": pem}) as response:
        assert response.status == 401
        assert "does not verify" in (await response.json())["message"]
    cert_file, key_file, cert = running.write_node(tmp_path, "node-1")
    running.ca.revoke(serial=cert.serial_number, reason="keyCompromise")
    async with running.session(cert_file, key_file).post(url, json={"csr": pem}) as response:
        assert response.status == 403
        answer = await response.json()
    assert answer["error"] == "policy_denied"
    assert "revoked" in answer["message"]


# --- revocation -----------------------------------------------------------------------------


async def _crl(session: aiohttp.ClientSession, url: str) -> x509.CertificateRevocationList:
    async with session.get(f"{url}/v1/crl") as response:
        assert response.status == 200
        assert response.content_type == "application/pkix-crl"
        return x509.load_der_x509_crl(await response.read())


async def test_admin_token_revokes_by_node_and_the_crl_follows(
    ca_api: RunningCa, tmp_path: Path
) -> None:
    session = ca_api.session()
    serials = [ca_api.write_node(tmp_path, "node-1")[2].serial_number for _ in range(2)]
    before = await _crl(session, ca_api.url)
    assert len(before) == 0
    admin = ca_api.ca.create_admin_token("ops")
    body = {"node_id": "node-1", "reason": "keyCompromise"}
    headers = {"Authorization": f"Bearer {admin}"}
    async with session.post(f"{ca_api.url}/v1/revoke", json=body, headers=headers) as response:
        assert response.status == 204
        assert await response.read() == b""
    after = await _crl(session, ca_api.url)
    assert after.is_signature_valid(ca_api.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert sorted(r.serial_number for r in after) == sorted(serials)
    entry = after.get_revoked_certificate_by_serial_number(serials[0])
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert [e.actor for e in ca_api.ca.store.audit(2)] == ["token:ops", "token:ops"]


async def test_revoke_needs_admin_credentials(ca_api: RunningCa, tmp_path: Path) -> None:
    cert_file, key_file, cert = ca_api.write_node(tmp_path, "node-1")
    body = {"serial": format(cert.serial_number, "x")}
    url = f"{ca_api.url}/v1/revoke"
    async with ca_api.session().post(url, json=body) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
    bad = {"Authorization": "Bearer tmadmin_forged"}
    async with ca_api.session().post(url, json=body, headers=bad) as response:
        assert response.status == 401
    async with ca_api.session(cert_file, key_file).post(url, json=body) as response:
        assert response.status == 403  # a node is not an admin
    assert ca_api.ca.store.get(cert.serial_number).revoked_at is None  # type: ignore[union-attr]


async def test_admin_certificate_revokes_by_serial(ca_api: RunningCa, tmp_path: Path) -> None:
    _, _, cert = ca_api.write_node(tmp_path, "node-1")
    admin_key = tmp_path / "admin.key"
    _, key = make_csr("alice")
    admin_cert = ca_api.ca.issue_admin("alice", key.public_key())
    admin_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    admin_file = tmp_path / "admin.crt"
    admin_file.write_bytes(
        admin_cert.public_bytes(serialization.Encoding.PEM)
        + ca_api.ca.issuing_cert.public_bytes(serialization.Encoding.PEM)
    )
    session = ca_api.session(admin_file, admin_key)
    url = f"{ca_api.url}/v1/revoke"
    cases: list[tuple[dict[str, str], int]] = [
        ({"serial": "zz"}, 400),
        ({"serial": "abc123"}, 404),
        ({"serial": format(cert.serial_number, "x"), "node_id": "node-9"}, 400),
        ({"serial": format(cert.serial_number, "x"), "reason": "bored"}, 400),
        ({}, 400),
        ({"serial": format(cert.serial_number, "x"), "reason": "superseded"}, 204),
        ({"serial": format(cert.serial_number, "x")}, 204),  # again: nothing new, still fine
    ]
    for body, status in cases:
        async with session.post(url, json=body) as response:
            assert response.status == status, body
    record = ca_api.ca.store.get(cert.serial_number)
    assert record is not None and record.reason == "superseded"
    assert ca_api.ca.store.audit(1)[0].actor == "cert:alice"


async def test_crl_etag_cache_control_and_pem(ca_api: RunningCa, tmp_path: Path) -> None:
    session = ca_api.session()
    url = f"{ca_api.url}/v1/crl"
    async with session.get(url) as response:
        etag = response.headers["ETag"]
        assert response.headers["Cache-Control"] == "public, max-age=60, must-revalidate"
        assert response.headers["Vary"] == "Accept"
        der = await response.read()
    async with session.get(url, headers={"If-None-Match": etag}) as response:
        assert response.status == 304
        assert response.headers["ETag"] == etag
    async with session.get(url, params={"format": "pem"}) as response:
        assert response.content_type == "application/x-pem-file"
        pem_etag = response.headers["ETag"]
        pem = await response.read()
    assert pem_etag != etag
    assert x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER) == der
    async with session.get(url, headers={"Accept": "application/x-pem-file"}) as response:
        assert (await response.read()).startswith(b"-----BEGIN X509 CRL-----")
    async with session.get(url, params={"format": "xml"}) as response:
        assert response.status == 400
    # A revocation, even by another process on the same database, makes a new CRL.
    _, _, cert = ca_api.write_node(tmp_path, "node-1")
    other = CertificateAuthority(ca_api.directory, b"api-test-passphrase")
    try:
        other.revoke(serial=cert.serial_number)
    finally:
        other.close()
    async with session.get(url, headers={"If-None-Match": etag}) as response:
        assert response.status == 200
        assert response.headers["ETag"] != etag
        crl = x509.load_der_x509_crl(await response.read())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


# --- the clock: CRL refresh and CA expiry warnings (plain HTTP, fake clock) -----------------


@pytest.fixture
async def clocked(
    tmp_path: Path,
) -> AsyncIterator[tuple[TestClient[Any, Any], FakeClock, CertificateAuthority]]:
    clock = FakeClock(datetime(2026, 11, 22, 12, 0, tzinfo=UTC))
    ca = CertificateAuthority.init(tmp_path / "ca", b"pw", clock=clock)
    registrar = Registrar(ca, EnrollmentPolicy(), MeshSettings())
    app = ca_app(registrar, limiter=RateLimiter(100.0, 100))  # the CA's clock
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield client, clock, ca
    await client.close()
    ca.close()


async def test_crl_is_signed_again_before_next_update(
    clocked: tuple[TestClient[Any, Any], FakeClock, CertificateAuthority],
) -> None:
    client, clock, _ = clocked
    first = x509.load_der_x509_crl(await (await client.get("/v1/crl")).read())
    clock.advance(timedelta(hours=11))
    same = x509.load_der_x509_crl(await (await client.get("/v1/crl")).read())
    assert same.last_update_utc == first.last_update_utc
    clock.advance(timedelta(hours=2))  # past half of its 24 hours
    fresh = x509.load_der_x509_crl(await (await client.get("/v1/crl")).read())
    assert fresh.last_update_utc == clock.now().replace(microsecond=0)
    assert fresh.next_update_utc == clock.now().replace(microsecond=0) + CRL_VALIDITY


async def test_ca_expiry_warnings_show_in_the_api(
    clocked: tuple[TestClient[Any, Any], FakeClock, CertificateAuthority],
) -> None:
    client, clock, ca = clocked
    healthy = await (await client.get("/v1/health")).json()
    assert healthy["status"] == "ok" and healthy["warnings"] == []
    clock.set(ca.issuing_cert.not_valid_after_utc - timedelta(days=10))
    health = await (await client.get("/v1/health")).json()
    assert health["status"] == "warning"
    assert "issuing CA certificate expires in 10 days" in health["warnings"][0]
    clock.set(ca.issuing_cert.not_valid_after_utc - timedelta(days=2))
    token = ca.create_token("node-1")  # at the fake now, as the API's enroll below
    pem, _ = make_csr("node-1")
    response = await client.post("/v1/enroll", json={"token": token, "csr": pem})
    assert response.status == 200
    body = await response.json()
    assert "renew it now" in body["warnings"][0]
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert cert.not_valid_after_utc == ca.issuing_cert.not_valid_after_utc  # capped by the CA


async def test_form_bodies_and_pem_answers_for_curl_users(
    ca_api: RunningCa, tmp_path: Path
) -> None:
    """`curl --data-urlencode token=T --data-urlencode csr@node.csr -H 'Accept:
    application/x-pem-file' -o node.crt` enrolls without any JSON tooling."""
    pem, _ = make_csr("node-1")
    form = {"token": ca_api.token("node-1"), "csr": pem}
    headers = {"Accept": "application/x-pem-file"}
    session = ca_api.session()
    async with session.post(f"{ca_api.url}/v1/enroll", data=form, headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "application/x-pem-file"
        chain = x509.load_pem_x509_certificates(await response.read())
    assert [c.subject for c in chain[1:]] == [ca_api.ca.issuing_cert.subject]
    assert ca_api.ca.store.get(chain[0].serial_number) is not None
    # The same form again is a retry (same token, same key): the same certificate. The
    # token with another key, twice-given fields and an empty form are 400s with JSON.
    async with session.post(f"{ca_api.url}/v1/enroll", data=form, headers=headers) as response:
        assert response.status == 200
        assert x509.load_pem_x509_certificates(await response.read())[0] == chain[0]
    other = {**form, "csr": make_csr("node-1")[0]}
    async with session.post(f"{ca_api.url}/v1/enroll", data=other) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_token"
    async with session.post(
        f"{ca_api.url}/v1/enroll",
        data=b"token=a&token=b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as response:
        assert response.status == 400
        assert "given twice" in (await response.json())["message"]


async def test_an_rsa_csr_is_invalid_csr_and_leaves_the_token_unspent(ca_api: RunningCa) -> None:
    # Nodes refuse RSA certificates (their trust view takes EC and Ed25519): the CA
    # says so at enrollment instead of issuing one.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-1")]))
        .sign(key, hashes.SHA256())
    )
    token = ca_api.token("node-1")
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    body = {"token": token, "csr": pem}
    async with ca_api.session().post(f"{ca_api.url}/v1/enroll", json=body) as response:
        assert response.status == 400
        answer = await response.json()
    assert answer == {
        "error": "invalid_csr",
        "message": "RSA keys are not allowed: mesh nodes take only EC P-256, P-384 or Ed25519",
    }
    assert ca_api.ca.store.by_node("node-1") == []
    status, _ = await _enroll(ca_api.session(), ca_api.url, token, "node-1")
    assert status == 200  # the token was not spent on the refused CSR


async def test_a_bad_answer_format_is_refused_before_anything_is_issued(
    ca_api: RunningCa,
) -> None:
    token = ca_api.token("node-1")
    pem, _ = make_csr("node-1")
    session = ca_api.session()
    url = f"{ca_api.url}/v1/enroll"
    async with session.post(url, params={"format": "xml"}, json={"token": token, "csr": pem}) as r:
        assert r.status == 400
        assert (await r.json())["message"] == "format is pem or json"
    assert ca_api.ca.store.by_node("node-1") == []
    async with session.post(url, params={"format": "json"}, json={"token": token, "csr": pem}) as r:
        assert r.status == 200  # the token was not spent by the refused request


async def test_the_server_certificate_names_every_san(ca_api: RunningCa) -> None:
    server = CaServer(
        ca_api.server.registrar,
        b"api-test-passphrase",
        "127.0.0.1",
        0,
        names=("127.0.0.1", "ca.mesh.example"),
    )
    await server.start()
    try:
        served = [c for c in ca_api.ca.store.all() if c.role == "server"][-1]
        cert = x509.load_pem_x509_certificate(served.pem.encode())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["ca.mesh.example"]
        assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        async with ca_api.session().get(f"{server.url}/v1/health") as response:
            assert response.status == 200
    finally:
        await server.stop()


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_revoking_a_node_id_no_certificate_can_have_is_a_404_on_each_store(
    ca_api_factory: Callable[..., Any], request: pytest.FixtureRequest, store: str
) -> None:
    """A NUL (which PostgreSQL cannot hold) or any name that is not a node_id: no
    certificate has it, whatever the store, and the answer says so instead of a 500."""
    db = request.getfixturevalue("postgres_dsn") if store == "postgresql" else None
    running: RunningCa = await ca_api_factory(db=db)
    session = running.session()
    headers = {"Authorization": f"Bearer {running.ca.create_admin_token('ops')}"}
    for node_id in ("node\x00-1", "NODE 1"):
        body = {"node_id": node_id, "reason": "keyCompromise"}
        async with session.post(f"{running.url}/v1/revoke", json=body, headers=headers) as response:
            assert response.status == 404
            assert (await response.json())["error"] == "unknown_certificate"
