"""The mesh CA: setup, node certificates and their profile, CSR checks, revocation and
the CRL, checked with the cryptography package and the openssl command line."""

from __future__ import annotations

import contextlib
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import ProtocolError
from trustmesh.pki.ca import (
    DEFAULT_NODE_VALIDITY,
    CertificateAuthority,
    check_node_id,
    load_csr,
)
from trustmesh.pki.errors import CsrRejected, PkiError, UnknownCertificate

PASS = b"correct horse battery"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    authority = CertificateAuthority.init(tmp_path / "ca", PASS, name="test mesh", now=NOW)
    yield authority
    authority.close()


def make_csr(
    node_id: str,
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | None = None,
    *,
    san: bool = True,
) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def test_init_writes_a_root_an_issuing_ca_and_encrypted_keys(ca: CertificateAuthority) -> None:
    d = ca.directory
    for name in ("root.key", "issuing.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
        assert b"ENCRYPTED" in (d / name).read_bytes()
    root, issuing = ca.root_cert, ca.issuing_cert
    assert root.subject == root.issuer
    assert issuing.issuer == root.subject
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issuing.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert issuing.not_valid_after_utc <= root.not_valid_after_utc
    assert (d / "chain.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 2
    assert ca.expiry_warnings(now=NOW) == []


def test_init_refuses_to_overwrite_and_open_needs_the_passphrase(
    ca: CertificateAuthority,
) -> None:
    with pytest.raises(PkiError, match="already holds a CA"):
        CertificateAuthority.init(ca.directory, PASS)
    with pytest.raises(ProtocolError):
        CertificateAuthority(ca.directory, b"wrong passphrase")
    reopened = CertificateAuthority(ca.directory, PASS)
    assert reopened.root_cert == ca.root_cert
    reopened.close()


def test_node_certificate_profile(ca: CertificateAuthority) -> None:
    cert = ca.issue(make_csr("edge-7.dc1"), "edge-7.dc1", now=NOW)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-7.dc1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-7.dc1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 0 < cert.serial_number < 2**127
    assert cert.not_valid_after_utc - NOW == DEFAULT_NODE_VALIDITY
    assert cert.issuer == ca.issuing_cert.subject
    [stored] = ca.store.by_node("edge-7.dc1")
    assert stored.serial == cert.serial_number


def test_serials_are_random(ca: CertificateAuthority) -> None:
    serials = {ca.issue(make_csr("n1"), "n1", now=NOW).serial_number for _ in range(8)}
    assert len(serials) == 8


@pytest.mark.parametrize("hours", [0.5, 24 * 7 + 1])
def test_validity_is_one_hour_to_seven_days(ca: CertificateAuthority, hours: float) -> None:
    with pytest.raises(PkiError, match="1 hour to 7 days"):
        ca.issue(make_csr("n1"), "n1", validity=timedelta(hours=hours), now=NOW)


def test_validity_never_outlives_the_issuing_ca(ca: CertificateAuthority) -> None:
    late = ca.issuing_cert.not_valid_after_utc - timedelta(days=2)
    cert = ca.issue(make_csr("n1"), "n1", validity=timedelta(days=7), now=late)
    assert cert.not_valid_after_utc == ca.issuing_cert.not_valid_after_utc
    warnings = ca.expiry_warnings(now=late)
    assert len(warnings) == 1 and "issuing CA certificate expires in 2 days" in warnings[0]
    with pytest.raises(PkiError, match="expires too soon"):
        ca.issue(make_csr("n1"), "n1", now=ca.issuing_cert.not_valid_after_utc)
    assert "EXPIRED" in ca.expiry_warnings(now=ca.root_cert.not_valid_after_utc)[-1]


def test_issued_chain_verifies_with_openssl(tmp_path: Path, require_openssl: str) -> None:
    ca = CertificateAuthority.init(tmp_path / "now-ca", PASS)  # valid by the real clock
    cert = ca.issue(make_csr("n1"), "n1")
    leaf = tmp_path / "n1.crt"
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    d = ca.directory
    args = [require_openssl, "verify", "-CAfile", str(d / "ca.crt")]
    args += ["-untrusted", str(d / "issuing.crt"), "-purpose", "sslclient", str(leaf)]
    ok = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    # Revoked, with the CRL: openssl refuses it.
    ca.revoke(serial=cert.serial_number, reason="keyCompromise")
    crl = tmp_path / "crl.pem"
    crl.write_bytes(ca.crl().public_bytes(serialization.Encoding.PEM))
    revoked = subprocess.run(
        [*args[:-1], "-crl_check", "-CRLfile", str(crl), str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr
    ca.close()


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()],
    ids=["p384", "ed25519"],
)
def test_other_allowed_key_types(ca: CertificateAuthority, key: object) -> None:
    assert isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)
    ca.issue(make_csr("n1", key), "n1", now=NOW)


def test_an_rsa_csr_is_refused_as_mesh_nodes_would_refuse_its_certificate(
    ca: CertificateAuthority,
) -> None:
    # A node's trust view takes EC and Ed25519 keys only: an RSA certificate was issued,
    # then refused on every link.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CsrRejected) as refused:
        ca.issue(make_csr("n1", key), "n1", now=NOW)
    assert str(refused.value) == (
        "RSA keys are not allowed: mesh nodes take only EC P-256, P-384 or Ed25519"
    )
    assert ca.store.by_node("n1") == []


def test_csr_checks(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrRejected, match="does not name node_id"):
        ca.issue(make_csr("other"), "n1", now=NOW)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CsrRejected, match="RSA keys are not allowed"):
        ca.issue(make_csr("n1", small), "n1", now=NOW)
    with pytest.raises(CsrRejected, match="curve"):
        ca.issue(make_csr("n1", ec.generate_private_key(ec.SECP256K1())), "n1", now=NOW)
    assert ca.issue(make_csr("n1", san=False), "n1", now=NOW)  # the CN alone names it


def test_csr_with_a_broken_self_signature_is_rejected(ca: CertificateAuthority) -> None:
    der = bytearray(make_csr("n1").public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    try:
        csr = load_csr(bytes(der))
    except CsrRejected:
        return  # the DER no longer parses: rejected all the same
    with pytest.raises(CsrRejected, match="self-signature"):
        ca.issue(csr, "n1", now=NOW)


@pytest.mark.parametrize("node_id", ["", "UPPER", "-lead", "a..b", "a_b", "x" * 64, "spa ce"])
def test_node_ids_are_dns_names(node_id: str) -> None:
    with pytest.raises(PkiError):
        check_node_id(node_id)


def test_revoke_by_serial_and_by_node(ca: CertificateAuthority) -> None:
    first = ca.issue(make_csr("n1"), "n1", now=NOW)
    second = ca.issue(make_csr("n1"), "n1", now=NOW)
    other = ca.issue(make_csr("n2"), "n2", now=NOW)
    assert ca.revoke(serial=other.serial_number, reason="superseded", now=NOW) == [
        other.serial_number
    ]
    assert sorted(ca.revoke(node_id="n1", reason="keyCompromise", now=NOW)) == sorted(
        [first.serial_number, second.serial_number]
    )
    assert ca.revoke(node_id="n1", now=NOW) == []  # again: nothing new
    crl = ca.crl(now=NOW)
    assert crl.is_signature_valid(ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert {r.serial_number for r in crl} == {
        first.serial_number,
        second.serial_number,
        other.serial_number,
    }
    entry = crl.get_revoked_certificate_by_serial_number(first.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    assert crl.next_update_utc == NOW + timedelta(hours=24)


def test_revoke_errors(ca: CertificateAuthority) -> None:
    with pytest.raises(UnknownCertificate):
        ca.revoke(serial=12345)
    with pytest.raises(UnknownCertificate):
        ca.revoke(node_id="nobody")
    with pytest.raises(PkiError, match="one of them"):
        ca.revoke()
    cert = ca.issue(make_csr("n1"), "n1", now=NOW)
    with pytest.raises(PkiError, match="unknown revocation reason"):
        ca.revoke(serial=cert.serial_number, reason="because")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_load_csr_raises_only_csr_rejected(data: bytes) -> None:
    with contextlib.suppress(CsrRejected):
        load_csr(data)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=900))
def test_truncated_csr_is_rejected(cut: int) -> None:
    der = make_csr("n1").public_bytes(serialization.Encoding.DER)
    if cut < len(der):
        with pytest.raises(CsrRejected):
            load_csr(der[:cut])


def test_renew_recertifies_near_expiry_with_the_same_keys(
    ca: CertificateAuthority, tmp_path: Path, require_openssl: str
) -> None:
    assert ca.renew(PASS, now=NOW) == []  # nothing due
    late = ca.issuing_cert.not_valid_after_utc - timedelta(days=10)
    node = ca.issue(make_csr("node-1"), "node-1", now=late - timedelta(hours=1))
    assert ca.expiry_warnings(now=late)
    old_issuing = ca.issuing_cert
    assert ca.renew(PASS, now=late) == ["issuing"]
    assert ca.issuing_cert.not_valid_after_utc > old_issuing.not_valid_after_utc
    assert ca.issuing_cert.public_key() == old_issuing.public_key()
    assert ca.expiry_warnings(now=late) == []
    reopened = CertificateAuthority(ca.directory, PASS)  # the files changed, not just memory
    try:
        assert reopened.issuing_cert == ca.issuing_cert
    finally:
        reopened.close()
    # A certificate issued before the renewal still chains through the renewed issuing CA.
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(node.public_bytes(serialization.Encoding.PEM))
    subprocess.run(
        [
            require_openssl,
            "verify",
            "-CAfile",
            str(ca.directory / "ca.crt"),
            "-untrusted",
            str(ca.directory / "issuing.crt"),
            "-attime",
            str(int(late.timestamp())),
            str(leaf),
        ],
        check=True,
        capture_output=True,
    )
    assert ca.renew(PASS, force=True, now=late) == ["root", "issuing"]
    assert [e.event for e in ca.store.audit(2)] == ["renew-ca", "renew-ca"]
