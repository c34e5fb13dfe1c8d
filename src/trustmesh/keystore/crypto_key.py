"""A :class:`Signer` as a ``cryptography`` EC private key, so X.509 builders sign on the device.

    key = SignerPrivateKey(Pkcs11Signer.open(uri))
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())

cryptography's CSR, certificate and CRL builders accept any ``EllipticCurvePrivateKey``
and call its ``sign(data, ECDSA(SHA256()))``; this one hands the data to the Signer, so
the private key never leaves its token or TPM. Only SHA-256 is offered: it is what every
Signer hashes with, and what a token that lacks CKM_ECDSA_SHA384 could do anyway. The
key cannot be serialised or turned into numbers: it is not extractable.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.utils import Buffer

from trustmesh.crypto.keys import KeyKind, PublicKey
from trustmesh.errors import UnsupportedOperationError
from trustmesh.keystore.signer import Signer

_CURVES: dict[KeyKind, type[ec.EllipticCurve]] = {
    KeyKind.P256: ec.SECP256R1,
    KeyKind.SECP256K1: ec.SECP256K1,
}
SHA256_SIZE = 32


class SignerPrivateKey(ec.EllipticCurvePrivateKey):
    """An EC private key (P-256 or secp256k1) whose every signature is made by ``signer``."""

    def __init__(self, signer: Signer) -> None:
        curve = _CURVES.get(signer.kind)
        if curve is None:
            raise UnsupportedOperationError(
                f"only P-256 and secp256k1 keys act as EC keys for X.509, not {signer.kind}"
            )
        self._signer = signer
        self._curve = curve()
        self._public = ec.EllipticCurvePublicKey.from_encoded_point(
            self._curve, signer.public_key().to_bytes()
        )

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._curve

    @property
    def key_size(self) -> int:
        return self._curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA with SHA-256 over ``data``, or over a 32-byte digest given as
        ``ECDSA(Prehashed(SHA256()))``; a DER signature with a low S."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedOperationError(
                f"a device key signs ECDSA only, not {type(signature_algorithm).__name__}"
            )
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            if algorithm.digest_size != SHA256_SIZE or len(data) != SHA256_SIZE:
                raise UnsupportedOperationError(
                    "a device key signs 32-byte SHA-256 digests only, "
                    f"got a {len(data)}-byte digest"
                )
            return self._signer.sign_digest(bytes(data))
        if not isinstance(algorithm, hashes.SHA256):
            raise UnsupportedOperationError(
                f"a device key signs with ECDSA-SHA256 only, not {algorithm.name}; "
                "pass hashes.SHA256() to the builder"
            )
        return self._signer.sign(bytes(data))

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        """ECDH on the device: the shared point's x-coordinate, as cryptography's."""
        if not isinstance(algorithm, ec.ECDH):
            raise UnsupportedOperationError("a device key exchanges with ECDH() only")
        return self._signer.ecdh(PublicKey.from_cryptography(peer_public_key))

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise UnsupportedOperationError("a device key is not extractable: it has no numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise UnsupportedOperationError("a device key is not extractable: it cannot be saved")

    # One device key, one session: a copy is the same key, so it is this object.
    def __copy__(self) -> SignerPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> SignerPrivateKey:
        return self


__all__ = ["SignerPrivateKey"]
