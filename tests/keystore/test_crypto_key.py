"""cryptography's X.509 builders sign with a Signer through SignerPrivateKey: on a
SoftHSM2 token and with a file key, and their signatures verify."""

from __future__ import annotations

import copy
import datetime
import hashlib
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.errors import UnsupportedOperationError
from trustmesh.keystore.crypto_key import SignerPrivateKey
from trustmesh.keystore.pkcs11 import Pkcs11Signer
from trustmesh.keystore.signer import Signer

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-1.mesh")])
NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def uri(base: str, label: str) -> str:
    path, _, query = base.partition("?")
    return f"{path};object={label}?{query}"


@pytest.fixture(params=["token", "file"])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[KeyKind.P256, KeyKind.SECP256K1], ids=str)
def signer(request: pytest.FixtureRequest, store: str) -> Iterator[Signer]:
    kind: KeyKind = request.param
    if store == "file":
        yield PrivateKey.generate(kind)
        return
    token: str = request.getfixturevalue("token")
    device = Pkcs11Signer.generate(uri(token, f"x509-{kind}-{request.node.name}"), kind)
    yield device
    device.close()


def test_a_csr_is_signed_by_the_signer(signer: Signer) -> None:
    key = SignerPrivateKey(signer)
    csr = x509.CertificateSigningRequestBuilder().subject_name(NAME).sign(key, hashes.SHA256())
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    # The signature is the Signer's: it verifies under the Signer's own public key too.
    signer.public_key().verify(csr.signature, csr.tbs_certrequest_bytes)


def test_a_certificate_is_signed_by_the_signer(signer: Signer) -> None:
    key = SignerPrivateKey(signer)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate.verify_directly_issued_by(certificate)
    signer.public_key().verify(certificate.signature, certificate.tbs_certificate_bytes)


def test_sign_takes_data_or_a_prehashed_digest(signer: Signer) -> None:
    key = SignerPrivateKey(signer)
    public = key.public_key()
    public.verify(key.sign(b"data", ec.ECDSA(hashes.SHA256())), b"data", ec.ECDSA(hashes.SHA256()))
    digest = hashlib.sha256(b"data").digest()
    prehashed = ec.ECDSA(Prehashed(hashes.SHA256()))
    public.verify(key.sign(digest, prehashed), digest, prehashed)


def test_the_key_describes_its_curve_and_agrees_on_ecdh(signer: Signer) -> None:
    key = SignerPrivateKey(signer)
    expected = ec.SECP256R1 if signer.kind is KeyKind.P256 else ec.SECP256K1
    assert isinstance(key.curve, expected) and key.key_size == 256
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert copy.copy(key) is key and copy.deepcopy(key) is key
    peer = ec.generate_private_key(expected())
    assert key.exchange(ec.ECDH(), peer.public_key()) == peer.exchange(ec.ECDH(), key.public_key())


def test_other_algorithms_and_extraction_are_refused() -> None:
    key = SignerPrivateKey(PrivateKey.generate(KeyKind.P256))
    with pytest.raises(UnsupportedOperationError, match="SHA256 only, not sha384"):
        key.sign(b"data", ec.ECDSA(hashes.SHA384()))
    with pytest.raises(UnsupportedOperationError, match="32-byte"):
        key.sign(b"\x00" * 48, ec.ECDSA(Prehashed(hashes.SHA384())))
    with pytest.raises(UnsupportedOperationError, match="SHA256 only"):
        x509.CertificateSigningRequestBuilder().subject_name(NAME).sign(key, hashes.SHA512())
    with pytest.raises(UnsupportedOperationError, match="not extractable"):
        key.private_numbers()
    with pytest.raises(UnsupportedOperationError, match="not extractable"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(UnsupportedOperationError, match="P-256 and secp256k1"):
        SignerPrivateKey(PrivateKey.generate(KeyKind.ED25519))
