"""Enrollment and rotation without HTTP: tokens, CSR checks, the allow-list and node cap,
attestation plug-ins, rotation with overlap, and the store's atomic token spending."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from trustmesh.pki.attestation import (
    Attestation,
    AttestationPolicy,
    AttestationResult,
    enrollment_nonce,
    rotation_nonce,
)
from trustmesh.pki.ca import CertificateAuthority, token_hash
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.pki.errors import (
    AttestationFailed,
    CsrRejected,
    NotAuthenticated,
    PkiError,
    PolicyDenied,
    TokenRejected,
)
from trustmesh.pki.store import SqliteStore

PASS = b"registrar tests"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)  # when ca_on_each_store makes the CA


@pytest.fixture
def sqlite_ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    authority = CertificateAuthority.init(tmp_path / "ca", PASS, now=NOW)
    yield authority
    authority.close()


@pytest.fixture
def ca(ca_on_each_store: CertificateAuthority) -> CertificateAuthority:
    """A CA on each store: the registrar's rules hold on both."""
    return ca_on_each_store


def registrar(ca: CertificateAuthority, **policy: object) -> Registrar:
    return Registrar(ca, EnrollmentPolicy(**policy), MeshSettings())  # type: ignore[arg-type]


def csr_pem(node_id: str, key: object | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# --- tokens -------------------------------------------------------------------------------


def test_enroll_issues_a_certificate_and_spends_the_token(ca: CertificateAuthority) -> None:
    desk = registrar(ca)
    token = ca.create_token("node-1", now=NOW)
    issued = desk.enroll(token, csr_pem("node-1"), now=NOW)
    assert issued.record.node_id == "node-1"
    assert ca.store.get(issued.certificate.serial_number) == issued.record
    spent = ca.store.token(token_hash(token))
    assert spent is not None and spent.used_at == NOW
    with pytest.raises(TokenRejected, match="already used"):
        desk.enroll(token, csr_pem("node-1"), now=NOW)
    events = [(e.event, e.node_id) for e in ca.store.audit()]
    assert ("enroll", "node-1") in events and ("token", "node-1") in events


def test_tokens_are_stored_hashed(sqlite_ca: CertificateAuthority) -> None:
    ca = sqlite_ca
    token = ca.create_token("node-1", now=NOW)
    raw = (ca.directory / "ca.db").read_bytes()
    wal = ca.directory / "ca.db-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert token.encode() not in raw
    assert token.split("_", 1)[1].encode() not in raw
    assert hashlib.sha256(token.encode()).hexdigest() == token_hash(token)


def test_expired_unknown_and_foreign_tokens_are_refused(ca: CertificateAuthority) -> None:
    desk = registrar(ca)
    token = ca.create_token("node-1", ttl=timedelta(minutes=10), now=NOW)
    with pytest.raises(TokenRejected, match="expired"):
        desk.enroll(token, csr_pem("node-1"), now=NOW + timedelta(minutes=10))
    with pytest.raises(TokenRejected, match="unknown"):
        desk.enroll("tmenroll_" + "A" * 43, csr_pem("node-1"), now=NOW)
    with pytest.raises(TokenRejected, match="another node_id"):
        desk.enroll(token, csr_pem("node-2"), node_id="node-2", now=NOW)
    # The token names the node: a CSR for another name is refused, and the token survives.
    with pytest.raises(CsrRejected, match="does not name node_id 'node-1'"):
        desk.enroll(token, csr_pem("node-2"), now=NOW)
    assert desk.enroll(token, csr_pem("node-1"), now=NOW).record.node_id == "node-1"


def test_token_ttl_bounds(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="1 minute to 30 days"):
        ca.create_token("node-1", ttl=timedelta(seconds=5))
    with pytest.raises(PkiError, match="1 minute to 30 days"):
        ca.create_token("node-1", ttl=timedelta(days=31))
    with pytest.raises(PkiError, match="not a DNS name"):
        ca.create_token("Node_1")


def test_a_bad_csr_does_not_spend_the_token(ca: CertificateAuthority) -> None:
    desk = registrar(ca)
    token = ca.create_token("node-1", now=NOW)
    with pytest.raises(CsrRejected):
        desk.enroll(token, "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n", now=NOW)
    with pytest.raises(CsrRejected):
        desk.enroll(token, "not base64 !!", now=NOW)
    assert desk.enroll(token, csr_pem("node-1"), now=NOW)


def test_csr_with_a_broken_self_signature_is_refused(ca: CertificateAuthority) -> None:
    desk = registrar(ca)
    token = ca.create_token("node-1", now=NOW)
    der = x509.load_pem_x509_csr(csr_pem("node-1").encode()).public_bytes(
        serialization.Encoding.DER
    )
    tampered = der.replace(b"node-1", b"node-7", 1)  # signed bytes changed, structure intact
    assert not x509.load_der_x509_csr(tampered).is_signature_valid
    with pytest.raises(CsrRejected, match="self-signature"):
        desk.enroll(token, base64.b64encode(tampered).decode(), now=NOW)


@pytest.mark.parametrize("bits", [1024, 2048])
def test_an_rsa_csr_is_refused(ca: CertificateAuthority, bits: int) -> None:
    desk = registrar(ca)
    token = ca.create_token("node-1", now=NOW)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    with pytest.raises(CsrRejected, match="RSA keys are not allowed"):
        desk.enroll(token, csr_pem("node-1", key), now=NOW)


def test_a_base64_der_csr_enrolls(ca: CertificateAuthority) -> None:
    desk = registrar(ca)
    der = x509.load_pem_x509_csr(csr_pem("node-1").encode()).public_bytes(
        serialization.Encoding.DER
    )
    token = ca.create_token("node-1", now=NOW)
    assert desk.enroll(token, base64.b64encode(der).decode(), now=NOW)


def test_fifty_racing_connections_spend_one_token_once(
    sqlite_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Each thread has its own database connection, as separate CA processes would.
    (On PostgreSQL: tests/pki/test_store_postgres.py, across replicas.)"""
    ca = sqlite_ca
    token = ca.create_token("node-1", now=NOW)
    records = [ca.sign(x509.load_pem_x509_csr(csr_pem("node-1").encode()), "node-1", now=NOW)[1]]
    records += [
        ca.sign(x509.load_pem_x509_csr(csr_pem("node-1").encode()), "node-1", now=NOW)[1]
        for _ in range(49)
    ]
    start = threading.Barrier(len(records))
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(record: object) -> None:
        store = SqliteStore(ca.directory / "ca.db")
        try:
            start.wait(timeout=10)
            try:
                store.enroll(token_hash(token), record, now=NOW, max_nodes=None, actor="t")  # type: ignore[arg-type]
                outcome = "ok"
            except TokenRejected as exc:
                outcome = str(exc)
        finally:
            store.close()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt, args=(r,)) for r in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes.count("ok") == 1
    assert set(outcomes) == {"ok", "the enrollment token was already used"}
    assert len(ca.store.by_node("node-1")) == 1


# --- policy -------------------------------------------------------------------------------


def test_allow_list(ca: CertificateAuthority) -> None:
    desk = registrar(ca, allow=("edge-*", "relay-?.example"))
    for node_id in ("edge-7", "relay-1.example"):
        assert desk.enroll(ca.create_token(node_id, now=NOW), csr_pem(node_id), now=NOW)
    token = ca.create_token("relay-12.example", now=NOW)
    with pytest.raises(PolicyDenied, match="allow-list"):
        desk.enroll(token, csr_pem("relay-12.example"), now=NOW)
    assert ca.store.token(token_hash(token)).used_at is None  # type: ignore[union-attr]


def test_max_nodes_counts_distinct_live_nodes(ca: CertificateAuthority) -> None:
    desk = registrar(ca, max_nodes=2)
    for node_id in ("node-1", "node-2"):
        desk.enroll(ca.create_token(node_id, now=NOW), csr_pem(node_id), now=NOW)
    # A node enrolling again is not a new node.
    desk.enroll(ca.create_token("node-1", now=NOW), csr_pem("node-1"), now=NOW)
    token = ca.create_token("node-3", now=NOW)
    with pytest.raises(PolicyDenied, match="2 of 2"):
        desk.enroll(token, csr_pem("node-3"), now=NOW)
    # The refused enrollment changed nothing: the token is still good.
    assert ca.store.token(token_hash(token)).used_at is None  # type: ignore[union-attr]
    ca.revoke(node_id="node-2", reason="cessationOfOperation", now=NOW)
    assert desk.enroll(token, csr_pem("node-3"), now=NOW)


# --- attestation --------------------------------------------------------------------------


@dataclass
class RecordingVerifier:
    """A verifier for tests: accepts a payload equal to HMAC-free ``b"ok:" + nonce``."""

    type: str = "test"
    needs_challenge: bool = False
    seen: list[tuple[bytes, bytes]] = field(default_factory=list)

    def verify(
        self, attestation: Attestation, nonce: bytes, csr_public_key: CertificatePublicKeyTypes
    ) -> AttestationResult:
        spki = csr_public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.seen.append((nonce, spki))
        if attestation.payload == b"ok:" + nonce:
            return AttestationResult(True, "fine", {"pcr0": "00"})
        return AttestationResult(False, "quote does not match the nonce")


def _evidence(nonce: bytes) -> Attestation:
    return Attestation("test", b"ok:" + nonce)


def test_required_attestation(ca: CertificateAuthority) -> None:
    verifier = RecordingVerifier()
    desk = registrar(ca, attestation=AttestationPolicy("required", {"test": verifier}))
    key = ec.generate_private_key(ec.SECP256R1())
    token = ca.create_token("node-1", now=NOW)
    with pytest.raises(AttestationFailed, match="requires an attestation"):
        desk.enroll(token, csr_pem("node-1", key), now=NOW)
    with pytest.raises(AttestationFailed, match="no verifier for attestation type 'tpm'"):
        desk.enroll(token, csr_pem("node-1", key), attestation=Attestation("tpm", b"x"), now=NOW)
    with pytest.raises(AttestationFailed, match="does not match the nonce"):
        desk.enroll(token, csr_pem("node-1", key), attestation=_evidence(b"stale"), now=NOW)
    nonce = enrollment_nonce(token, key.public_key())
    issued = desk.enroll(token, csr_pem("node-1", key), attestation=_evidence(nonce), now=NOW)
    assert issued.attestation is not None and issued.attestation.claims == {"pcr0": "00"}
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert verifier.seen[-1] == (nonce, spki)


def test_none_policy_accepts_no_attestation_but_checks_one_that_is_sent(
    ca: CertificateAuthority,
) -> None:
    desk = registrar(ca, attestation=AttestationPolicy("none", {"test": RecordingVerifier()}))
    assert desk.enroll(ca.create_token("node-1", now=NOW), csr_pem("node-1"), now=NOW)
    token = ca.create_token("node-2", now=NOW)
    with pytest.raises(AttestationFailed):
        desk.enroll(token, csr_pem("node-2"), attestation=_evidence(b"wrong"), now=NOW)


def test_attestation_json_parsing() -> None:
    parsed = Attestation.from_json({"type": "tpm_quote", "payload": "aGk="})
    assert parsed == Attestation("tpm_quote", b"hi")
    for bad in ("x", {"type": "t"}, {"type": "", "payload": ""}, {"type": "t", "payload": "@@"}):
        with pytest.raises(PkiError):
            Attestation.from_json(bad)


# --- rotation -----------------------------------------------------------------------------


def _enrolled(ca: CertificateAuthority, desk: Registrar, node_id: str) -> list[x509.Certificate]:
    issued = desk.enroll(ca.create_token(node_id, now=NOW), csr_pem(node_id), now=NOW)
    return [issued.certificate, ca.issuing_cert]


def test_rotation_overlaps_and_audits(ca: CertificateAuthority) -> None:
    desk = registrar(ca)
    chain = _enrolled(ca, desk, "node-1")
    later = NOW + timedelta(hours=48)
    current = desk.authenticate(chain, now=later)
    rotated = desk.rotate(
        current, csr_pem("node-1"), current_serial=current.serial_hex, actor="10.0.0.1", now=later
    )
    old, new = chain[0], rotated.certificate
    assert new.serial_number != old.serial_number
    assert new.not_valid_before_utc < old.not_valid_after_utc  # overlap: both valid now
    assert new.not_valid_after_utc > old.not_valid_after_utc
    assert ca.store.get(old.serial_number).revoked_at is None  # type: ignore[union-attr]
    assert ("rotate", "node-1", "10.0.0.1") in [
        (e.event, e.node_id, e.actor) for e in ca.store.audit()
    ]


def test_rotation_refuses_revoked_foreign_expired_and_mismatched(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    desk = registrar(ca)
    with pytest.raises(NotAuthenticated, match="needs a client certificate"):
        desk.authenticate([], now=NOW)
    chain = _enrolled(ca, desk, "node-1")
    with pytest.raises(NotAuthenticated, match="does not verify"):
        desk.authenticate(chain, now=NOW + timedelta(days=4))  # expired
    other = CertificateAuthority.init(tmp_path / "other", PASS, now=NOW)
    try:
        foreign = other.issue(x509.load_pem_x509_csr(csr_pem("node-1").encode()), "node-1", now=NOW)
        with pytest.raises(NotAuthenticated, match="does not verify"):
            desk.authenticate([foreign, other.issuing_cert], now=NOW)
    finally:
        other.close()
    current = desk.authenticate(chain, now=NOW)
    with pytest.raises(PkiError, match="not the client certificate's serial"):
        desk.rotate(current, csr_pem("node-1"), current_serial="abc", now=NOW)
    with pytest.raises(CsrRejected, match="does not name node_id 'node-1'"):
        desk.rotate(current, csr_pem("node-2"), now=NOW)
    ca.revoke(node_id="node-1", reason="keyCompromise", now=NOW)
    with pytest.raises(PolicyDenied, match="revoked"):
        desk.authenticate(chain, now=NOW)


def test_rotation_nonce_binds_the_current_serial(ca: CertificateAuthority) -> None:
    verifier = RecordingVerifier()
    desk = registrar(ca)
    chain = _enrolled(ca, desk, "node-1")
    desk = registrar(ca, attestation=AttestationPolicy("required", {"test": verifier}))
    current = desk.authenticate(chain, now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    nonce = rotation_nonce(current.serial, key.public_key())
    assert nonce != enrollment_nonce("x", key.public_key())
    rotated = desk.rotate(current, csr_pem("node-1", key), attestation=_evidence(nonce), now=NOW)
    assert rotated.attestation is not None and rotated.attestation.ok


def test_admin_certificates_cannot_rotate_or_name_a_node(ca: CertificateAuthority) -> None:
    desk = registrar(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue_admin("alice", key.public_key(), now=NOW)
    record = desk.authenticate([cert, ca.issuing_cert], now=NOW)
    assert record.role == "admin"
    with pytest.raises(PolicyDenied, match="not admin ones"):
        desk.rotate(record, csr_pem("alice"), now=NOW)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == []
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:trustmesh:admin:alice"
    ]


def test_revoking_a_node_id_spares_admins_and_servers_of_that_name(
    ca: CertificateAuthority,
) -> None:
    desk = registrar(ca)
    node = _enrolled(ca, desk, "alice")[0]
    admin = ca.issue_admin("alice", ec.generate_private_key(ec.SECP256R1()).public_key(), now=NOW)
    server = ca.issue_server(["alice"], ec.generate_private_key(ec.SECP256R1()).public_key())
    assert ca.revoke(node_id="alice", now=NOW) == [node.serial_number]
    for kept in (admin, server):
        assert ca.store.get(kept.serial_number).revoked_at is None  # type: ignore[union-attr]
