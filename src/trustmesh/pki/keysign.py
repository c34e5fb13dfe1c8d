"""The CA's issuing key where the process cannot hold it: on a PKCS#11 token (an HSM, or
SoftHSM2), shared by every CA replica that reaches the token.

``cryptography``'s builders sign only with a key object they hold. So a certificate or
CRL for a device key is built and signed once with a throwaway EC key, which fixes
every byte the signature covers (the TBS, whose signature algorithm is
ecdsa-with-SHA256 for any EC key); the device then signs those TBS bytes, and the
signature value is put in place of the throwaway's. The result is checked against the
issuing CA's public key before it is used, so a wrong key or token never issues.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from trustmesh.crypto.keys import KeyKind, P256PublicKey
from trustmesh.errors import ProtocolError
from trustmesh.keystore.signer import Signer
from trustmesh.keystore.uri import PKCS11_SCHEME, generate_signer, open_signer
from trustmesh.pki.errors import PkiError, StoreUnavailable

# The file, in the CA directory, that names the issuing key on a token instead of
# issuing.key: one PKCS#11 URI line (the PIN comes from its pin-source, never the file).
KEY_URI_FILE = "issuing-key.uri"

SoftwareKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]  # noqa: UP007

# Signs the drafts whose TBS a device key then signs; its own signature is discarded.
_DRAFT_KEY = ec.generate_private_key(ec.SECP256R1())
_DER = serialization.Encoding.DER
# One token operation at a time in this process, whichever key or session: PKCS#11
# sessions must not be used by two threads at once, and a module's own locking is not
# something to count on. (Replicas are processes: each signs on its own.)
_TOKEN_LOCK = threading.Lock()


class DeviceIssuingKey:
    """An issuing key on a token, signing X.509 (one token operation at a time)."""

    def __init__(self, signer: Signer, uri: str) -> None:
        public = signer.public_key()
        if not isinstance(public, P256PublicKey):
            raise PkiError(f"the CA's issuing key on a token must be P-256, not {signer.kind}")
        self.signer = signer
        self.uri = uri
        self._public = public.cryptography

    @classmethod
    def open(cls, uri: str) -> DeviceIssuingKey:
        return cls(open_signer(uri, kinds={KeyKind.P256}), uri)

    @classmethod
    def generate(cls, uri: str) -> DeviceIssuingKey:
        """A new P-256 key on the token ``uri`` names (never extractable)."""
        if not uri.startswith(PKCS11_SCHEME):
            raise PkiError("--issuing-key takes a pkcs11: URI (the key is made on the token)")
        signer, spec = generate_signer(uri, KeyKind.P256, out=None)
        return cls(signer, spec)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        draft = builder.sign(_DRAFT_KEY, hashes.SHA256())
        der = self._signed(draft.public_bytes(_DER), draft.tbs_certificate_bytes)
        return x509.load_der_x509_certificate(der)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        draft = builder.sign(_DRAFT_KEY, hashes.SHA256())
        return x509.load_der_x509_crl(
            self._signed(draft.public_bytes(_DER), draft.tbs_certlist_bytes)
        )

    def _signed(self, draft: bytes, tbs: bytes) -> bytes:
        """``draft`` with the token's signature of ``tbs``, checked first."""
        import pkcs11  # only a CA with a token key gets here

        try:
            with _TOKEN_LOCK:
                signature = self.signer.sign(tbs)
        except (ProtocolError, pkcs11.PKCS11Error) as exc:  # the token away or refusing
            raise StoreUnavailable(f"the issuing key's token did not sign: {exc}") from None
        _check(signature, tbs, self._public)
        return _with_signature(draft, signature)


IssuingKey = Union[SoftwareKey, DeviceIssuingKey]  # noqa: UP007


def sign_certificate(builder: x509.CertificateBuilder, key: IssuingKey) -> x509.Certificate:
    if isinstance(key, DeviceIssuingKey):
        return key.sign_certificate(builder)
    return builder.sign(key, _hash_for(key))


def sign_crl(
    builder: x509.CertificateRevocationListBuilder, key: IssuingKey
) -> x509.CertificateRevocationList:
    if isinstance(key, DeviceIssuingKey):
        return key.sign_crl(builder)
    return builder.sign(key, _hash_for(key))


def load_device_key(directory: Path) -> DeviceIssuingKey | None:
    """The issuing key on a token that ``directory/issuing-key.uri`` names, if any."""
    path = directory / KEY_URI_FILE
    if not path.exists():
        return None
    return DeviceIssuingKey.open(path.read_text().strip())


def _hash_for(key: SoftwareKey) -> hashes.SHA256 | None:
    return hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _check(signature: bytes, tbs: bytes, public: ec.EllipticCurvePublicKey) -> None:
    try:
        public.verify(signature, tbs, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:  # a fault of ours or the token's, never the client's
        raise RuntimeError("the token's key did not sign as the issuing CA's key") from None


def _with_signature(der: bytes, signature: bytes) -> bytes:
    """``der`` (a Certificate or CertificateList: SEQUENCE {tbs, algorithm, BIT STRING})
    with its signature value replaced by ``signature``."""
    body, end = _value(der, 0)
    if end != len(der):
        raise PkiError("a draft certificate with bytes after it")
    _, tbs_end = _value(der, body)
    _, algorithm_end = _value(der, tbs_end)
    bits = b"\x00" + signature  # no unused bits
    content = der[body:algorithm_end] + b"\x03" + _length(len(bits)) + bits
    return b"\x30" + _length(len(content)) + content


def _value(der: bytes, at: int) -> tuple[int, int]:
    """Where the value of the DER element at ``at`` starts, and where the element ends."""
    first = der[at + 1]
    if first < 0x80:
        return at + 2, at + 2 + first
    count = first & 0x7F
    start = at + 2 + count
    return start, start + int.from_bytes(der[at + 2 : start], "big")


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw
