"""A device identity authorizes the software TLS key (docs/protocols/keys.md): the CA
checks the binding at enrollment, copies it into the certificate, and rotates a bound
certificate only with the same identity's signature, so a stolen TLS key cannot buy
itself a successor. Peers verify gossip with the bound key."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.keystore.pkcs11 import Pkcs11Signer
from trustmesh.mesh.errors import BadSignature
from trustmesh.mesh.gossip import sign_message
from trustmesh.mesh.trust import TrustView
from trustmesh.pki.ca import CertificateAuthority, token_hash
from trustmesh.pki.challenge import Purpose
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.pki.errors import CsrRejected, PolicyDenied
from trustmesh.pki.extensions import (
    AttestedPlatform,
    ExtensionError,
    IdentityBinding,
    identity_binding_of,
    identity_key_of,
    spki_der,
)

PASS = b"binding tests"
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    authority = CertificateAuthority.init(tmp_path / "ca", PASS, now=NOW)
    yield authority
    authority.close()


def desk(ca: CertificateAuthority) -> Registrar:
    return Registrar(ca, EnrollmentPolicy(), MeshSettings())


def enroll(
    ca: CertificateAuthority, node_id: str, tls: PrivateKey, identity: object
) -> x509.Certificate:
    token = ca.create_token(node_id, now=NOW)
    context = Purpose.enroll(token_hash(token)).binding
    csr = make_csr(tls, node_id, identity, context)  # type: ignore[arg-type]
    return desk(ca).enroll(token, csr, now=NOW).certificate


def csr_with(key: PrivateKey, node_id: str, binding: IdentityBinding) -> str:
    """A CSR for ``key`` carrying ``binding`` as it is (an attacker's)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name.from_rfc4514_string(f"CN={node_id}"))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .add_extension(binding.extension(), critical=False)
        .sign(key.to_cryptography(), hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_a_token_identity_binds_the_tls_key_and_signs_what_peers_verify(
    ca: CertificateAuthority, token: str
) -> None:
    identity = Pkcs11Signer.generate(token.replace("?", ";object=binding-1?"), KeyKind.P256)
    tls = PrivateKey.generate(KeyKind.P256)
    cert = enroll(ca, "node-1", tls, identity)

    binding = identity_binding_of(cert)
    assert binding is not None
    identity_point = identity.public_key().to_bytes()
    bound = identity_key_of(cert)
    compressed = serialization.PublicFormat.CompressedPoint
    assert bound.public_bytes(serialization.Encoding.X962, compressed) == identity_point
    # The TLS key is the certificate's own key, not the identity.
    assert spki_der(cert.public_key()) == spki_der(tls.to_cryptography().public_key())

    # Gossip signed on the token verifies at a peer through the bound key; signed
    # with the TLS key, it does not.
    trust = TrustView([ca.root_cert], [ca.issuing_cert])
    chain = (cert.public_bytes(serialization.Encoding.DER),)
    now_ms = int(NOW.timestamp() * 1000)
    peer = trust.identity(chain, now_ms=now_ms)
    payload = {"type": "anomaly", "hash": "ab" * 32, "kind": "port-scan", "risk": 0.5, "meta": {}}
    good = sign_message(identity, "node-1", payload, now_ms=now_ms, chain=chain)
    peer.verify(good.signature, good.checked_signed_bytes())
    forged = sign_message(tls, "node-1", payload, now_ms=now_ms, chain=chain)
    with pytest.raises(BadSignature):
        peer.verify(forged.signature, forged.checked_signed_bytes())
    identity.close()


def test_a_binding_over_another_key_is_refused(ca: CertificateAuthority) -> None:
    identity = PrivateKey.generate(KeyKind.P256)
    tls, other = PrivateKey.generate(KeyKind.P256), PrivateKey.generate(KeyKind.P256)
    token = ca.create_token("node-2", now=NOW)
    context = Purpose.enroll(token_hash(token)).binding
    binding = IdentityBinding.make(identity, other.to_cryptography().public_key(), context)
    with pytest.raises(CsrRejected, match="does not verify"):
        desk(ca).enroll(token, csr_with(tls, "node-2", binding), now=NOW)
    # A binding of the right key, made for another token, is refused too.
    elsewhere = Purpose.enroll(token_hash("another token")).binding
    binding = IdentityBinding.make(identity, tls.to_cryptography().public_key(), elsewhere)
    with pytest.raises(CsrRejected, match="does not verify"):
        desk(ca).enroll(token, csr_with(tls, "node-2", binding), now=NOW)


def test_a_stolen_tls_key_cannot_rotate_a_bound_certificate(ca: CertificateAuthority) -> None:
    identity = PrivateKey.generate(KeyKind.P256)
    tls = PrivateKey.generate(KeyKind.P256)
    cert = enroll(ca, "node-3", tls, identity)
    current = ca.store.get(cert.serial_number)
    assert current is not None
    registrar = desk(ca)
    later = NOW + timedelta(hours=1)
    # The thief holds the TLS key only: a CSR without the identity's binding ...
    with pytest.raises(PolicyDenied, match="identity key is bound"):
        registrar.rotate(current, make_csr(PrivateKey.generate(KeyKind.P256), "node-3"), now=later)
    # ... or bound by an identity of their own, is refused.
    mine = PrivateKey.generate(KeyKind.P256)
    context = Purpose.rotate(current.serial).binding
    with pytest.raises(PolicyDenied, match="identity key is bound"):
        registrar.rotate(
            current,
            make_csr(PrivateKey.generate(KeyKind.P256), "node-3", mine, context),
            now=later,
        )
    # The binding the certificate shows, copied into a CSR for the same stolen key: it
    # was made for the enrollment, not for this rotation.
    copied = identity_binding_of(cert)
    assert copied is not None
    with pytest.raises(CsrRejected, match="for this request"):
        registrar.rotate(current, csr_with(tls, "node-3", copied), now=later)
    # The node, with its identity, rotates (a new key, or the same one); the binding
    # follows, and it is for this rotation only.
    new_tls = PrivateKey.generate(KeyKind.P256)
    issued = registrar.rotate(current, make_csr(new_tls, "node-3", identity, context), now=later)
    successor = ca.store.get(issued.certificate.serial_number)
    assert successor is not None
    replay = identity_binding_of(issued.certificate)
    assert replay is not None
    with pytest.raises(CsrRejected, match="for this request"):
        registrar.rotate(successor, csr_with(new_tls, "node-3", replay), now=later)
    assert identity_binding_of(issued.certificate) == IdentityBinding(
        identity_binding_of(cert).identity_spki,  # type: ignore[union-attr]
        identity_binding_of(issued.certificate).signature,  # type: ignore[union-attr]
    )


def test_an_unbound_node_rotates_as_before(ca: CertificateAuthority) -> None:
    tls = PrivateKey.generate(KeyKind.P256)
    token = ca.create_token("node-4", now=NOW)
    cert = desk(ca).enroll(token, make_csr(tls, "node-4"), now=NOW).certificate
    assert identity_binding_of(cert) is None
    assert identity_key_of(cert) == cert.public_key()
    current = ca.store.get(cert.serial_number)
    assert current is not None
    rotated = desk(ca).rotate(
        current, make_csr(PrivateKey.generate(KeyKind.P256), "node-4"), now=NOW + timedelta(hours=1)
    )
    assert identity_binding_of(rotated.certificate) is None


def test_a_secp256k1_identity_is_refused_for_the_mesh() -> None:
    with pytest.raises(ExtensionError, match="P-256"):
        IdentityBinding.make(
            PrivateKey.generate(KeyKind.SECP256K1),
            PrivateKey.generate(KeyKind.P256).to_cryptography().public_key(),
            b"",
        )


def test_the_extensions_round_trip() -> None:
    identity = PrivateKey.generate(KeyKind.P256)
    binding = IdentityBinding.make(identity, identity.to_cryptography().public_key(), b"x")
    assert IdentityBinding.from_der(binding.to_der()) == binding
    platform = AttestedPlatform(b"\x00\x58" + bytes(88), bytes(32), (0, 1, 7), "swtpm")
    assert AttestedPlatform.from_der(platform.to_der()) == platform


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_are_an_extension_or_a_typed_error(data: bytes) -> None:
    for parse in (IdentityBinding.from_der, AttestedPlatform.from_der):
        with contextlib.suppress(ExtensionError):
            parse(data)


_IDENTITY = PrivateKey.generate(KeyKind.P256)
GOOD_BINDING = IdentityBinding.make(
    _IDENTITY, _IDENTITY.to_cryptography().public_key(), b"enroll:"
).to_der()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_truncated_and_extended_extensions_are_typed_errors(data: st.DataObject) -> None:
    good = GOOD_BINDING
    cut = data.draw(st.integers(0, len(good) - 1))
    with pytest.raises(ExtensionError):
        IdentityBinding.from_der(good[:cut])
    with pytest.raises(ExtensionError):
        IdentityBinding.from_der(good + data.draw(st.binary(min_size=1, max_size=8)))
