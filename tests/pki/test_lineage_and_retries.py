"""Issue 16, items 1, 2, 4 and 5 without HTTP: the rotation's currency check in the
transaction that issues, rotation lineage (one successor per certificate, idempotent
retries), idempotent enrollment, the schema migration of older databases, and admin
tokens that expire and can be revoked."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.pki.ca import CertificateAuthority, token_hash
from trustmesh.pki.enroll import EnrollmentPolicy, Issued, MeshSettings, Registrar
from trustmesh.pki.errors import (
    CertificateExpired,
    CertificateRevoked,
    PkiError,
    SerialMismatch,
    Superseded,
    TokenRejected,
    UnknownAdminToken,
)
from trustmesh.pki.store import SqliteStore, admin_token_id, spki_sha256

PASS = b"lineage tests"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)  # when ca_on_each_store makes the CA


@pytest.fixture
def ca(ca_on_each_store: CertificateAuthority) -> CertificateAuthority:
    """A CA on each store: every test here is a contract both stores keep."""
    return ca_on_each_store


@pytest.fixture
def desk(ca: CertificateAuthority) -> Registrar:
    return Registrar(ca, EnrollmentPolicy(), MeshSettings())


def csr_pem(node_id: str, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def enrolled(ca: CertificateAuthority, desk: Registrar, node_id: str = "node-1") -> Issued:
    return desk.enroll(ca.create_token(node_id, now=NOW), csr_pem(node_id), now=NOW)


def rotate(desk: Registrar, issued: Issued, csr: str, when: datetime = NOW) -> Issued:
    current = desk.authenticate([issued.certificate, desk.ca.issuing_cert], now=when)
    return desk.rotate(current, csr, now=when)


def live(ca: CertificateAuthority, node_id: str, when: datetime = NOW) -> list[str]:
    return [c.serial_hex for c in ca.store.by_node(node_id) if c.is_live(when)]


# --- item 1: the currency check is in the transaction that issues --------------------------


@pytest.mark.parametrize("how", ["node_id", "serial"])
def test_a_revocation_after_authentication_stops_the_rotation(
    ca: CertificateAuthority, desk: Registrar, how: str
) -> None:
    """The API authenticates when the request arrives and rotates when its body has
    come; a revocation in between must win."""
    first = enrolled(ca, desk)
    current = desk.authenticate([first.certificate, ca.issuing_cert], now=NOW)
    if how == "node_id":
        ca.revoke(node_id="node-1", reason="keyCompromise", now=NOW)
    else:
        ca.revoke(serial=first.record.serial, reason="keyCompromise", now=NOW)
    with pytest.raises(CertificateRevoked, match="revoked"):
        desk.rotate(current, csr_pem("node-1"), now=NOW)
    assert [c.serial for c in ca.store.by_node("node-1")] == [first.record.serial]


def test_a_certificate_that_expired_after_authentication_does_not_rotate(
    ca: CertificateAuthority, desk: Registrar
) -> None:
    first = enrolled(ca, desk)
    current = desk.authenticate([first.certificate, ca.issuing_cert], now=NOW)
    later = first.record.not_after + timedelta(seconds=1)
    with pytest.raises(CertificateExpired, match="expired"):
        desk.rotate(current, csr_pem("node-1"), now=later)
    assert live(ca, "node-1") == [first.record.serial_hex]


# --- item 2: lineage -----------------------------------------------------------------------


def test_one_certificate_rotated_three_times_yields_one_successor(
    ca: CertificateAuthority, desk: Registrar
) -> None:
    """Today's code answers each of the three with a new live certificate (four live in
    all); only the first may succeed."""
    first = enrolled(ca, desk)
    second = rotate(desk, first, csr_pem("node-1"))
    assert second.record.replaces == first.record.serial
    for _ in range(2):
        with pytest.raises(Superseded, match=f"already replaced by {second.record.serial_hex}"):
            rotate(desk, first, csr_pem("node-1"))
    assert live(ca, "node-1") == [first.record.serial_hex, second.record.serial_hex]
    # The newest one rotates on, and the lineage is recorded in the store and audit log.
    third = rotate(desk, second, csr_pem("node-1"))
    stored = ca.store.get(third.record.serial)
    assert stored is not None and stored.replaces == second.record.serial
    assert ca.store.get(first.record.serial).replaces is None  # type: ignore[union-attr]
    rotations = [e for e in ca.store.audit() if e.event == "rotate"]
    assert [(e.serial, e.detail["replaces"]) for e in rotations] == [
        (third.record.serial_hex, second.record.serial_hex),
        (second.record.serial_hex, first.record.serial_hex),
    ]


def test_a_retry_with_the_same_key_gets_the_certificate_already_issued(
    ca: CertificateAuthority, desk: Registrar
) -> None:
    first = enrolled(ca, desk)
    key = ec.generate_private_key(ec.SECP256R1())
    second = rotate(desk, first, csr_pem("node-1", key))
    again = rotate(desk, first, csr_pem("node-1", key))  # a new CSR, the same key
    assert again.retried and not second.retried
    assert again.certificate == second.certificate
    assert again.record == ca.store.get(second.record.serial)
    assert len(ca.store.by_node("node-1")) == 2
    assert ca.store.audit(1)[0].event == "rotate-retry"
    # Once the successor is revoked, a retry gets nothing: the old one is superseded.
    ca.revoke(serial=second.record.serial, now=NOW)
    with pytest.raises(Superseded):
        rotate(desk, first, csr_pem("node-1", key))


def test_only_the_newest_live_certificate_rotates(
    ca: CertificateAuthority, desk: Registrar
) -> None:
    older = enrolled(ca, desk)
    newer = enrolled(ca, desk)  # enrolled again with a new token
    with pytest.raises(Superseded, match=f"newer certificate \\({newer.record.serial_hex}\\)"):
        rotate(desk, older, csr_pem("node-1"))
    assert rotate(desk, newer, csr_pem("node-1")).record.replaces == newer.record.serial


def test_current_cert_serial_must_be_the_client_certificates_and_is_audited(
    ca: CertificateAuthority, desk: Registrar
) -> None:
    first = enrolled(ca, desk)
    current = desk.authenticate([first.certificate, ca.issuing_cert], now=NOW)
    with pytest.raises(SerialMismatch, match="not the client certificate's serial"):
        desk.rotate(current, csr_pem("node-1"), current_serial="abc123", now=NOW)
    with pytest.raises(PkiError, match="not a hex serial"):
        desk.rotate(current, csr_pem("node-1"), current_serial="zz", now=NOW)
    spelled = ":".join(f"{b:02x}" for b in first.record.serial.to_bytes(16, "big"))
    desk.rotate(current, csr_pem("node-1"), current_serial=spelled, now=NOW)
    entry = ca.store.audit(1)[0]
    assert entry.event == "rotate"
    assert entry.detail["current_cert_serial"] == first.record.serial_hex
    assert entry.detail["replaces"] == first.record.serial_hex


# --- item 4: enrollment is idempotent ------------------------------------------------------


def test_an_enrollment_retried_with_the_same_key_gets_the_same_certificate(
    ca: CertificateAuthority, desk: Registrar
) -> None:
    """The CA committed, then died before its answer left: the client asks again with
    the same token and key. Today's code refuses with 'already used'."""
    token = ca.create_token("node-1", now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    first = desk.enroll(token, csr_pem("node-1", key), now=NOW)
    later = NOW + timedelta(hours=2)  # past the token's hour: it was spent in time
    again = desk.enroll(token, csr_pem("node-1", key), now=later)
    assert again.retried and again.certificate == first.certificate
    assert len(ca.store.by_node("node-1")) == 1
    assert ca.store.audit(1)[0].event == "enroll-retry"
    # Another key with the spent token is refused, as is the same key once revoked.
    with pytest.raises(TokenRejected, match="already used"):
        desk.enroll(token, csr_pem("node-1"), now=NOW)
    ca.revoke(serial=first.record.serial, now=NOW)
    with pytest.raises(TokenRejected, match="already used"):
        desk.enroll(token, csr_pem("node-1", key), now=NOW)
    assert len(ca.store.by_node("node-1")) == 1
    # An unspent token past its expiry is refused, and stays unspent.
    stale = ca.create_token("node-2", now=NOW)
    with pytest.raises(TokenRejected, match="expired"):
        desk.enroll(stale, csr_pem("node-2"), now=later)
    unspent = ca.store.token(token_hash(stale))
    assert unspent is not None and unspent.used_at is None


# --- the schema of older databases ---------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY, node_id TEXT NOT NULL, role TEXT NOT NULL DEFAULT 'node',
    not_before INTEGER NOT NULL, not_after INTEGER NOT NULL, pem TEXT NOT NULL,
    revoked_at INTEGER, reason TEXT
);
CREATE TABLE admin_tokens (hash TEXT PRIMARY KEY, label TEXT NOT NULL,
                           created_at INTEGER NOT NULL);
"""


def test_an_older_database_is_migrated_when_opened(
    ca: CertificateAuthority, desk: Registrar, tmp_path: Path
) -> None:
    issued = enrolled(ca, desk)
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO certificates VALUES (?, 'node-1', 'node', ?, ?, ?, NULL, NULL)",
            (
                issued.record.serial_hex,
                int(issued.record.not_before.timestamp()),
                int(issued.record.not_after.timestamp()),
                issued.record.pem,
            ),
        )
        db.execute("INSERT INTO admin_tokens VALUES (?, 'ops', ?)", ("ab" * 32, NOW.timestamp()))
        db.commit()
    store = SqliteStore(path)
    try:
        record = store.get(issued.record.serial)
        assert record is not None and record.replaces is None
        assert record.spki_sha256 == spki_sha256(issued.certificate.public_key())
        (token,) = store.admin_tokens()
        assert token.id == admin_token_id("ab" * 32)
        assert token.expires_at == NOW + timedelta(hours=24)  # old tokens expire too
    finally:
        store.close()
    SqliteStore(path).close()  # opening again changes nothing and does not fail


# --- item 5: admin tokens expire and can be revoked ----------------------------------------


def test_admin_tokens_have_a_ttl_an_id_and_can_be_revoked(ca: CertificateAuthority) -> None:
    short = ca.create_admin_token("ops", ttl=timedelta(seconds=2), now=NOW)
    default = ca.create_admin_token("oncall", now=NOW)
    records = {t.label: t for t in ca.store.admin_tokens()}
    assert records["ops"].expires_at == NOW + timedelta(seconds=2)
    assert records["oncall"].expires_at == NOW + timedelta(hours=24)
    assert records["ops"].id == admin_token_id(token_hash(short))
    found = ca.store.admin_token(token_hash(short))
    assert found is not None and found.state(NOW) == "valid"
    assert found.state(NOW + timedelta(seconds=2)) == "expired"
    assert ca.revoke_admin_token(records["oncall"].id, now=NOW) is True
    assert ca.revoke_admin_token(records["oncall"].id, now=NOW) is False
    revoked = ca.store.admin_token(token_hash(default))
    assert revoked is not None and revoked.state(NOW) == "revoked"
    with pytest.raises(UnknownAdminToken):
        ca.revoke_admin_token("0" * 16, now=NOW)
    for ttl in (timedelta(0), timedelta(days=91)):
        with pytest.raises(PkiError, match="1 second to 90 days"):
            ca.create_admin_token(ttl=ttl, now=NOW)
    assert ca.store.audit(1)[0].event == "admin-token-revoke"


def test_admin_certificates_expire_and_can_be_revoked(
    ca: CertificateAuthority, desk: Registrar
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_admin("alice", key.public_key(), validity=timedelta(hours=1), now=NOW)
    chain = [cert, ca.issuing_cert]
    assert desk.authenticate(chain, now=NOW).role == "admin"
    with pytest.raises(PkiError, match="does not verify"):
        desk.authenticate(chain, now=NOW + timedelta(hours=2))
    ca.revoke(serial=cert.serial_number, now=NOW)
    with pytest.raises(CertificateRevoked):
        desk.authenticate(chain, now=NOW)
    with pytest.raises(PkiError, match="1 second to 365 days"):
        ca.issue_admin("bob", key.public_key(), validity=timedelta(days=366), now=NOW)
