"""The CA's CRL at scale: expired certificates leave it, and 100,000 revocations are
signed in one pass (not one copy of the list per entry)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.pki.ca import CRL_VALIDITY, CertificateAuthority

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    authority = CertificateAuthority.init(tmp_path / "ca", None, name="crl scale", now=NOW)
    yield authority
    authority.close()


def issue(ca: CertificateAuthority, node_id: str, validity: timedelta) -> x509.Certificate:
    key = PrivateKey.generate(KeyKind.P256)
    csr = x509.load_pem_x509_csr(make_csr(key, node_id).encode())
    return ca.issue(csr, node_id, validity=validity, now=NOW)


def listed(ca: CertificateAuthority, at: datetime) -> set[int]:
    return {entry.serial_number for entry in ca.crl(now=at)}


def test_a_revoked_certificate_leaves_the_crl_a_crl_validity_after_it_expires(
    ca: CertificateAuthority,
) -> None:
    short = issue(ca, "node-1", timedelta(hours=1))
    long = issue(ca, "node-2", timedelta(days=7))
    for cert in (short, long):
        ca.revoke(serial=cert.serial_number, now=NOW)
    expiry = short.not_valid_after_utc
    # Listed while it is valid, and on every CRL issued in the day after it expires (so
    # the first CRL beyond its validity lists it: RFC 5280 section 3.3).
    assert listed(ca, NOW) == {short.serial_number, long.serial_number}
    assert listed(ca, expiry + timedelta(hours=1)) == {short.serial_number, long.serial_number}
    assert listed(ca, expiry + CRL_VALIDITY) == {short.serial_number, long.serial_number}
    # Then gone; the certificate that is still valid stays.
    assert listed(ca, expiry + CRL_VALIDITY + timedelta(seconds=1)) == {long.serial_number}


def test_a_crl_of_100000_revocations_is_signed_whole_and_fast(ca: CertificateAuthority) -> None:
    count = 100_000
    not_after = int((NOW + timedelta(days=3)).timestamp())
    revoked_at = int(NOW.timestamp())
    rows = [
        (format(serial, "x"), f"node-{serial}", "node", revoked_at, not_after, "-", revoked_at)
        for serial in range(1 << 100, (1 << 100) + count)
    ]
    with sqlite3.connect(ca.directory / "ca.db") as db:  # the CA's own rows, written in bulk
        db.executemany(
            "INSERT INTO certificates (serial, node_id, role, not_before, not_after, pem,"
            " revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    started = time.perf_counter()
    crl = ca.crl(now=NOW)
    took = time.perf_counter() - started
    assert len(crl) == count
    issuer = ca.issuing_cert.public_key()
    assert isinstance(issuer, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(issuer)
    # One pass: about a second here. Adding the entries one by one copied the list each
    # time (20 s for the builder alone), and the PEM of every revoked row was read.
    assert took < 10.0, took
