"""The CA's issuing key on a PKCS#11 token (SoftHSM2), shared by CA replicas (issue 23):
certificates and CRLs it signs verify with the issuing CA's key and chain to the root,
the key never leaves the token, replicas on one PostgreSQL database sign with it from
threads at once, and the CA renews around it."""

from __future__ import annotations

import secrets
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.errors import PkiError
from trustmesh.pki.keysign import KEY_URI_FILE, DeviceIssuingKey, _with_signature

PASS = b"issuing key on a token"
DER = Encoding.DER


def key_uri(token: str) -> str:
    """A new object label on the session's token."""
    path, _, query = token.partition("?")
    return f"{path};object=ca-issuing-{secrets.token_hex(4)}?{query}"


def csr(node_id: str) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )


def chains(ca: CertificateAuthority, cert: x509.Certificate) -> bool:
    verifier = PolicyBuilder().store(Store([ca.root_cert])).build_client_verifier()
    verifier.verify(cert, [ca.issuing_cert])
    return True


def test_a_ca_whose_issuing_key_is_on_a_token_issues_and_signs_crls(
    token: str, tmp_path: Path
) -> None:
    uri = key_uri(token)
    with CertificateAuthority.init(tmp_path / "ca", PASS, issuing_key=uri) as ca:
        assert not (tmp_path / "ca" / "issuing.key").exists()
        assert (tmp_path / "ca" / KEY_URI_FILE).read_text().strip() == uri
        cert = ca.issue(csr("node-1"), "node-1")
        assert chains(ca, cert)
        ca.revoke(serial=cert.serial_number, reason="keyCompromise")
        crl = ca.crl()
        assert crl.is_signature_valid(ca.issuing_cert.public_key())  # type: ignore[arg-type]
        assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        # The root renews the issuing CA around the same token key.
        assert ca.renew(PASS, force=True) == ["root", "issuing"]
        assert chains(ca, ca.issue(csr("node-2"), "node-2"))
    # The key was made sensitive and not extractable: the token never gives it out.
    private = DeviceIssuingKey.open(uri).signer._private  # type: ignore[attr-defined]
    assert private[pkcs11.Attribute.SENSITIVE] and not private[pkcs11.Attribute.EXTRACTABLE]


def test_replicas_sign_with_one_token_key_at_once(
    token: str, tmp_path: Path, postgres_dsn: str
) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory, PASS, issuing_key=key_uri(token), db=postgres_dsn).close()
    replicas = [CertificateAuthority(directory, PASS, db=postgres_dsn) for _ in range(2)]
    issued: list[x509.Certificate] = []
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def issue(replica: CertificateAuthority, n: int) -> None:
        try:
            start.wait(timeout=30)
            for i in range(5):
                issued.append(replica.issue(csr(f"n-{n}-{i}"), f"n-{n}-{i}"))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=issue, args=(replicas[n % 2], n)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert not failures, failures
        assert len(issued) == 40 and all(chains(replicas[0], cert) for cert in issued)
        assert len(replicas[1].store.all()) == 40  # both replicas' records, in one database
    finally:
        for replica in replicas:
            replica.close()


def test_a_key_that_is_not_the_issuing_cas_never_issues(token: str, tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory, PASS, issuing_key=key_uri(token)).close()
    other = DeviceIssuingKey.generate(key_uri(token))
    (directory / KEY_URI_FILE).write_text(other.uri)  # the wrong label on the same token
    with pytest.raises(PkiError, match="is not this CA's"):
        CertificateAuthority(directory, PASS)


def test_the_signature_is_put_in_place_of_the_drafts() -> None:
    """The DER surgery alone, on a certificate and on a CRL large enough for every
    length form: the signature replaced (DER ECDSA signatures vary in length), all the
    rest untouched, and the result verifies."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "surgery")])
    now = datetime(2026, 12, 7, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    revoked = [
        x509.RevokedCertificateBuilder().serial_number(n).revocation_date(now).build()
        for n in range(1, 5000)
    ]
    crl = (
        x509.CertificateRevocationListBuilder(revoked_certificates=revoked)
        .issuer_name(name)
        .last_update(now)
        .next_update(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert len(crl.public_bytes(DER)) > 65536  # a three-byte length
    for _ in range(8):
        signature = key.sign(cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        again = x509.load_der_x509_certificate(_with_signature(cert.public_bytes(DER), signature))
        assert again.signature == signature
        assert again.tbs_certificate_bytes == cert.tbs_certificate_bytes
        assert again.signature_algorithm_oid == cert.signature_algorithm_oid
        again.verify_directly_issued_by(cert)
        signature = key.sign(crl.tbs_certlist_bytes, ec.ECDSA(hashes.SHA256()))
        listed = x509.load_der_x509_crl(_with_signature(crl.public_bytes(DER), signature))
        assert listed.signature == signature and listed.is_signature_valid(key.public_key())
        assert listed.tbs_certlist_bytes == crl.tbs_certlist_bytes
