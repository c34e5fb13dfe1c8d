"""The CA and its registrar read time only through their injected clock: a FakeClock
moves certificate validity, token expiry and the CRL's dates; ``now=`` still overrides."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.clock import SYSTEM_CLOCK, FakeClock
from trustmesh.pki.ca import (
    BACKDATE,
    CRL_VALIDITY,
    DEFAULT_NODE_VALIDITY,
    CertificateAuthority,
    token_hash,
)
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.pki.errors import TokenRejected
from trustmesh.pki.store import admin_token_id

PASS = b"clock test"
START = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> Iterator[CertificateAuthority]:
    authority = CertificateAuthority.init(tmp_path / "ca", PASS, clock=clock)
    yield authority
    authority.close()


def csr(node_id: str) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )


def csr_pem(node_id: str) -> str:
    return csr(node_id).public_bytes(serialization.Encoding.PEM).decode()


def test_the_ca_is_created_and_reopened_with_its_clock(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    assert ca.clock is clock
    assert ca.root_cert.not_valid_before_utc == START - BACKDATE
    assert ca.issuing_cert.not_valid_before_utc == START - BACKDATE
    reopened = CertificateAuthority(ca.directory, PASS)
    try:
        assert reopened.clock is SYSTEM_CLOCK  # the default
    finally:
        reopened.close()


def test_a_certificate_is_valid_from_the_fake_now(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    clock.advance(timedelta(days=3, seconds=17))
    cert = ca.issue(csr("node-1"), "node-1")
    start = clock.now()
    assert cert.not_valid_before_utc == start - BACKDATE
    assert cert.not_valid_after_utc == start + DEFAULT_NODE_VALIDITY
    record = ca.store.get(cert.serial_number)
    assert record is not None and record.not_before == start - BACKDATE


def test_now_overrides_the_clock_for_one_call(ca: CertificateAuthority) -> None:
    other = START + timedelta(days=40)
    cert = ca.issue(csr("node-1"), "node-1", now=other)
    assert cert.not_valid_before_utc == other - BACKDATE
    crl = ca.crl(now=other)
    assert crl.last_update_utc == other


def test_the_crl_dates_follow_the_clock(ca: CertificateAuthority, clock: FakeClock) -> None:
    first = ca.crl()
    assert first.last_update_utc == START
    assert first.next_update_utc == START + CRL_VALIDITY
    clock.advance(timedelta(hours=5))
    second = ca.crl()
    assert second.last_update_utc == START + timedelta(hours=5)
    assert second.next_update_utc == START + timedelta(hours=5) + CRL_VALIDITY
    number = second.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == clock.time_ms()


def test_a_revocation_is_dated_by_the_clock(ca: CertificateAuthority, clock: FakeClock) -> None:
    cert = ca.issue(csr("node-1"), "node-1")
    clock.advance(90)
    ca.revoke(serial=cert.serial_number)
    (entry,) = list(ca.crl())
    assert entry.revocation_date_utc == START + timedelta(seconds=90)


def test_an_enrollment_token_expires_when_the_clock_passes_its_ttl(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    registrar = Registrar(ca, EnrollmentPolicy(), MeshSettings())
    assert registrar.clock is clock  # the CA's, by default
    early = ca.create_token("node-1", ttl=timedelta(minutes=10))
    late = ca.create_token("node-2", ttl=timedelta(minutes=10))
    clock.advance(timedelta(minutes=10) - timedelta(seconds=1))
    issued = registrar.enroll(early, csr_pem("node-1"))
    assert issued.record.not_before == clock.now() - BACKDATE
    clock.advance(1)
    with pytest.raises(TokenRejected, match="expired"):
        registrar.enroll(late, csr_pem("node-2"))
    known = ca.store.token(token_hash(late))
    assert known is not None and known.used_at is None  # refused, not spent


def test_a_registrar_may_have_its_own_clock(ca: CertificateAuthority, clock: FakeClock) -> None:
    token = ca.create_token("node-1", ttl=timedelta(minutes=5))
    ahead = FakeClock(START + timedelta(hours=1))
    registrar = Registrar(ca, EnrollmentPolicy(), MeshSettings(), clock=ahead)
    with pytest.raises(TokenRejected, match="expired"):
        registrar.enroll(token, csr_pem("node-1"))
    # ``now=`` wins over either clock.
    issued = registrar.enroll(token, csr_pem("node-1"), now=START + timedelta(minutes=1))
    assert issued.record.not_before == START + timedelta(minutes=1) - BACKDATE


def test_an_admin_token_lives_for_its_ttl_on_the_clock(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    token = ca.create_admin_token("ops", ttl=timedelta(seconds=30))
    known = ca.store.admin_token(token_hash(token))
    assert known is not None
    assert known.created_at == START
    assert known.expires_at == START + timedelta(seconds=30)
    assert known.state(clock.now()) == "valid"
    clock.advance(30)
    assert known.state(clock.now()) == "expired"
    clock.advance(5)
    assert ca.revoke_admin_token(admin_token_id(token_hash(token)))
    revoked = ca.store.admin_token(token_hash(token))
    assert revoked is not None and revoked.revoked_at == clock.now()


def test_expiry_warnings_read_the_clock(ca: CertificateAuthority, clock: FakeClock) -> None:
    assert ca.expiry_warnings() == []
    clock.set(ca.issuing_cert.not_valid_after_utc - timedelta(days=10))
    (warning,) = ca.expiry_warnings()
    assert "issuing CA certificate expires in 10 days" in warning
    clock.set(ca.root_cert.not_valid_after_utc + timedelta(seconds=1))
    assert all("EXPIRED" in w for w in ca.expiry_warnings())
