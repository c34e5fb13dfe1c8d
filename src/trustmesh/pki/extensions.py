"""trustmesh's own X.509 extensions (docs/protocols/keys.md, attestation.md).

Both live under trustmesh's OID arc, a UUID OID (ITU-T X.667): 2.25.<uuid>.

**Identity binding** (``ARC.1``, in a CSR and in the certificate issued for it)::

    IdentityBinding ::= SEQUENCE {
        identity   SubjectPublicKeyInfo,  -- the long-term identity key (on a device)
        signature  OCTET STRING }         -- ECDSA by it over binding_message(tls SPKI, context)

A node whose identity key lives on a TPM or token has its TLS key in software. The
identity key signs each TLS key it authorizes, for one request: the context is the
enrollment token's hash, or the serial of the certificate being rotated (the bytes of
``pki.challenge.Purpose``). The CA checks that signature, and on a rotation that the
identity has not changed. A binding copied out of a certificate is for a serial that
has rotated already, so a stolen TLS key dies with its certificate. Gossip, bundles and
attestation are signed by the identity key, and a peer verifies them with the key this
extension names.

**Attested platform** (``ARC.2``, in a certificate the CA issued on a TPM quote)::

    AttestedPlatform ::= SEQUENCE {
        akPublic     OCTET STRING,   -- the AK's TPM2B_PUBLIC
        pcrDigest    OCTET STRING,   -- SHA-256 of the quoted PCR values
        pcrs         OCTET STRING,   -- the PCR indices quoted, one byte each
        deviceClass  UTF8String,
        clock        INTEGER }       -- the TPM's clock (ms) in the enrollment's quote

A peer checks a link quote against this AK and these PCRs (docs/protocols/attestation.md);
the CA takes a report of a failing quote only if its clock is later than this one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

from asn1crypto import core, keys
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from trustmesh.crypto.keys import KeyKind
from trustmesh.errors import DecodeError
from trustmesh.keystore.signer import Signer

ARC = "2.25.274108523048361355409331474874914895874"
IDENTITY_BINDING_OID = x509.ObjectIdentifier(ARC + ".1")
ATTESTED_PLATFORM_OID = x509.ObjectIdentifier(ARC + ".2")
BINDING_LABEL = b"trustmesh/identity-binding/v1\x00"
MAX_EXTENSION = 4096


class ExtensionError(DecodeError):
    """A trustmesh extension that does not parse, or an identity binding that does not verify."""


class _IdentityBinding(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar = [("identity", keys.PublicKeyInfo), ("signature", core.OctetString)]


class _AttestedPlatform(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar = [
        ("ak_public", core.OctetString),
        ("pcr_digest", core.OctetString),
        ("pcrs", core.OctetString),
        ("device_class", core.UTF8String),
        ("clock", core.Integer),
    ]


def spki_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def device_public_key(identity: Signer) -> ec.EllipticCurvePublicKey:
    """A mesh identity's public key (P-256, or :class:`ExtensionError`)."""
    public = identity.public_key()
    if public.kind is not KeyKind.P256:
        raise ExtensionError(f"a mesh identity key is P-256, not {public.kind}")
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public.to_bytes())


def binding_message(tls_spki: bytes, context: bytes) -> bytes:
    """What the identity key signs to authorize a TLS key for one request."""
    return BINDING_LABEL + hashlib.sha256(tls_spki).digest() + hashlib.sha256(context).digest()


@dataclass(frozen=True)
class IdentityBinding:
    identity_spki: bytes
    signature: bytes

    @classmethod
    def make(cls, identity: Signer, tls_key: PublicKeyTypes, context: bytes) -> IdentityBinding:
        """The identity key (on its device) authorizes ``tls_key`` for ``context``."""
        identity_spki = spki_der(device_public_key(identity))
        message = binding_message(spki_der(tls_key), context)
        return cls(identity_spki, identity.sign(message))

    def to_der(self) -> bytes:
        return bytes(
            _IdentityBinding(
                {
                    "identity": keys.PublicKeyInfo.load(self.identity_spki),
                    "signature": self.signature,
                }
            ).dump()
        )

    def extension(self) -> x509.UnrecognizedExtension:
        return x509.UnrecognizedExtension(IDENTITY_BINDING_OID, self.to_der())

    @classmethod
    def from_der(cls, der: bytes) -> IdentityBinding:
        if len(der) > MAX_EXTENSION:
            raise ExtensionError("an identity binding is at most 4 KiB")
        try:
            parsed = _IdentityBinding.load(der, strict=True)
            spki = bytes(parsed["identity"].dump())
            signature = bytes(parsed["signature"].native)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            raise ExtensionError(f"the identity binding does not parse: {exc}") from None
        return cls(spki, signature)

    def identity_key(self) -> ec.EllipticCurvePublicKey:
        try:
            key = serialization.load_der_public_key(self.identity_spki)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ExtensionError(f"the identity key does not parse: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ExtensionError("a mesh identity key is ECDSA P-256")
        return key

    def verify(self, tls_key: PublicKeyTypes, context: bytes) -> ec.EllipticCurvePublicKey:
        """The identity key, once its signature over ``tls_key`` for ``context`` checks."""
        key = self.identity_key()
        message = binding_message(spki_der(tls_key), context)
        try:
            key.verify(self.signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise ExtensionError(
                "the identity key's signature over the TLS key does not verify for this"
                " request (a binding is for one enrollment or one rotation)"
            ) from None
        return key


@dataclass(frozen=True)
class AttestedPlatform:
    ak_public: bytes
    pcr_digest: bytes
    pcrs: tuple[int, ...]
    device_class: str
    clock: int = 0

    def to_der(self) -> bytes:
        return bytes(
            _AttestedPlatform(
                {
                    "ak_public": self.ak_public,
                    "pcr_digest": self.pcr_digest,
                    "pcrs": bytes(self.pcrs),
                    "device_class": self.device_class,
                    "clock": self.clock,
                }
            ).dump()
        )

    def extension(self) -> x509.UnrecognizedExtension:
        return x509.UnrecognizedExtension(ATTESTED_PLATFORM_OID, self.to_der())

    @classmethod
    def from_der(cls, der: bytes) -> AttestedPlatform:
        if len(der) > MAX_EXTENSION:
            raise ExtensionError("an attested-platform extension is at most 4 KiB")
        try:
            parsed = _AttestedPlatform.load(der, strict=True)
            platform = cls(
                bytes(parsed["ak_public"].native),
                bytes(parsed["pcr_digest"].native),
                tuple(bytes(parsed["pcrs"].native)),
                str(parsed["device_class"].native),
                int(parsed["clock"].native),
            )
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            raise ExtensionError(f"the attested-platform extension does not parse: {exc}") from None
        if (
            any(i > 23 for i in platform.pcrs)
            or len(platform.pcr_digest) != 32
            or platform.clock < 0
        ):
            raise ExtensionError("the attested-platform extension names PCRs 0..23 and a digest")
        return platform


def _extension_value(extensions: x509.Extensions, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(value, x509.UnrecognizedExtension):
        raise ExtensionError(f"extension {oid.dotted_string} is not ours")
    return bytes(value.value)


def identity_binding_of(
    item: x509.Certificate | x509.CertificateSigningRequest,
) -> IdentityBinding | None:
    """The identity binding a certificate or CSR carries, or None."""
    der = _extension_value(item.extensions, IDENTITY_BINDING_OID)
    return None if der is None else IdentityBinding.from_der(der)


def attested_platform_of(cert: x509.Certificate) -> AttestedPlatform | None:
    der = _extension_value(cert.extensions, ATTESTED_PLATFORM_OID)
    return None if der is None else AttestedPlatform.from_der(der)


def identity_key_of(cert: x509.Certificate) -> PublicKeyTypes:
    """The key a node signs gossip, bundles and attestations with: the bound identity
    key when the certificate names one (the CA checked its signature), else the
    certificate's own key."""
    binding = identity_binding_of(cert)
    return cert.public_key() if binding is None else binding.identity_key()
