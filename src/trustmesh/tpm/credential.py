"""Tying an AK to an EK: TPM2_MakeCredential done by the CA, and EK certificate checks.

The CA does not trust that an AK lives in the same TPM as an EK because a node says
so. It encrypts a secret to the EK, bound to the AK's name (TPM 2.0 Part 1, 24:
credential protection); only that TPM can run TPM2_ActivateCredential, and it
releases the secret only if an object with that name is loaded in it. The node sends
the secret back, and the CA knows the AK is that TPM's.

    seed                                    random, nameAlg-digest-sized
    encrypted secret   RSA EK:  RSA-OAEP(nameAlg, label "IDENTITY\\0", seed)
                       ECC EK:  ephemeral point; seed = KDFe(nameAlg, ECDH Z,
                                "IDENTITY", ephemeral x, EK x)
    symKey           = KDFa(nameAlg, seed, "STORAGE", AK name, "", EK's key bits)
    encIdentity      = AES-CFB(symKey, IV 0, TPM2B_DIGEST(secret))
    HMACkey          = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)
    outerHMAC        = HMAC(nameAlg, HMACkey, encIdentity || AK name)
    TPM2B_ID_OBJECT  = TPM2B(TPM2B_DIGEST(outerHMAC) || encIdentity)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # where cryptography keeps CFB since 47; TPM credentials are defined with it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover (cryptography < 47)
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from trustmesh.errors import DecodeError, InvalidKeyError, ProtocolError
from trustmesh.tpm import structs

# tpm2-tools' credential file (tpm2_makecredential -o, tpm2_activatecredential -i):
# this magic and version, then TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET.
TOOLS_CREDENTIAL_MAGIC = 0xBADCC0DE
TOOLS_CREDENTIAL_VERSION = 1

MAX_CHAIN = 8

_HASH_CLASSES: dict[int, type[hashes.HashAlgorithm]] = {
    structs.TPM_ALG_SHA1: hashes.SHA1,
    structs.TPM_ALG_SHA256: hashes.SHA256,
    structs.TPM_ALG_SHA384: hashes.SHA384,
    structs.TPM_ALG_SHA512: hashes.SHA512,
}


class CredentialError(ProtocolError):
    """A credential cannot be made for this EK, AK name or secret."""


class EkCertificateError(ProtocolError):
    """The EK certificate does not parse, is out of date, or chains to no trusted CA."""


EkPublic = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | bytes


def kdfa(
    hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa (Part 1, 11.4.10.2): SP 800-108 counter-mode HMAC; the label is followed by
    one zero octet and the output size in bits ends every block's input."""
    name = structs.HASHES[hash_alg]
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        block = struct.pack(">I", counter) + label + b"\0" + context_u + context_v
        out += hmac.digest(key, block + struct.pack(">I", bits), name)
    return out[: (bits + 7) // 8]


def kdfe(hash_alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe (Part 1, 11.4.10.3): SP 800-56A concatenation KDF over the ECDH x coordinate;
    the label is followed by one zero octet."""
    name = structs.HASHES[hash_alg]
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        data = struct.pack(">I", counter) + z + label + b"\0" + party_u + party_v
        out += hashlib.new(name, data).digest()
    return out[: (bits + 7) // 8]


def _standard_ek(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> structs.TpmtPublic:
    """The public area of the TCG EK template for this key (EK Credential Profile 2.x):
    RSA 2048 and P-256 (L-1, L-2, H-1, H-2) name with SHA-256 and wrap with AES-128-CFB;
    P-384 (H-3), RSA 3072 and 4096 (H-6, H-7) with SHA-384 and AES-256; P-521 (H-4) with
    SHA-512 and AES-256. Only the fields a credential uses are filled in."""
    attributes = structs.TPMA_OBJECT_RESTRICTED | structs.TPMA_OBJECT_DECRYPT
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size not in (2048, 3072, 4096):
            raise CredentialError(f"no standard EK template has RSA {key.key_size}")
        big = key.key_size > 2048
        name_alg = structs.TPM_ALG_SHA384 if big else structs.TPM_ALG_SHA256
        symmetric = structs.SymDef(structs.TPM_ALG_AES, 256 if big else 128, structs.TPM_ALG_CFB)
        numbers = key.public_numbers()
        rsa_parms = structs.RsaParms(symmetric, structs.Scheme(), key.key_size, numbers.e)
        modulus = numbers.n.to_bytes((key.key_size + 7) // 8, "big")
        return structs.TpmtPublic(
            structs.TPM_ALG_RSA, name_alg, attributes, b"", rsa_parms, modulus, b""
        )
    templates = {
        "secp256r1": (structs.TPM_ECC_NIST_P256, structs.TPM_ALG_SHA256, 128),
        "secp384r1": (structs.TPM_ECC_NIST_P384, structs.TPM_ALG_SHA384, 256),
        "secp521r1": (structs.TPM_ECC_NIST_P521, structs.TPM_ALG_SHA512, 256),
    }
    if key.curve.name not in templates:
        raise CredentialError(f"no standard EK template has the curve {key.curve.name}")
    curve, name_alg, key_bits = templates[key.curve.name]
    symmetric = structs.SymDef(structs.TPM_ALG_AES, key_bits, structs.TPM_ALG_CFB)
    size = (key.curve.key_size + 7) // 8
    point_numbers = key.public_numbers()
    point = structs.EccPoint(
        point_numbers.x.to_bytes(size, "big"), point_numbers.y.to_bytes(size, "big")
    )
    ecc_parms = structs.EccParms(symmetric, structs.Scheme(), curve, structs.Scheme())
    return structs.TpmtPublic(structs.TPM_ALG_ECC, name_alg, attributes, b"", ecc_parms, point, b"")


def _ek_area(
    ek_public: EkPublic,
) -> tuple[structs.TpmtPublic, rsa.RSAPublicKey | ec.EllipticCurvePublicKey]:
    if isinstance(ek_public, bytes):
        try:
            area = structs.parse_public(ek_public)
            key = structs.public_key_of(area)
        except (DecodeError, InvalidKeyError) as exc:
            raise CredentialError(f"EK public: {exc}") from None
        needed = structs.TPMA_OBJECT_RESTRICTED | structs.TPMA_OBJECT_DECRYPT
        if not area.has(needed) or area.has(structs.TPMA_OBJECT_SIGN):
            raise CredentialError("the EK is not a restricted decryption (storage) key")
        return area, key
    if isinstance(ek_public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return _standard_ek(ek_public), ek_public
    raise CredentialError(f"EK public of type {type(ek_public).__name__} is not supported")


def make_credential(
    ek_public: EkPublic,
    ak_name: bytes,
    secret: bytes,
    *,
    random: Callable[[int], bytes] = os.urandom,
) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET).

    ``ek_public`` is the EK's TPM2B_PUBLIC, or its key from the EK certificate (then
    the TCG template for that key is assumed: nameAlg SHA-256 and AES-128-CFB for RSA
    2048 and P-256, see :func:`_standard_ek`). ``ak_name`` is the AK's name (nameAlg ||
    digest). ``secret`` is 1 to nameAlg-digest-size bytes. ``random`` gives the seed
    (and, for an ECC EK, the ephemeral key), so tests can pin it.
    """
    area, key = _ek_area(ek_public)
    name_alg = area.name_alg
    digest_size = structs.DIGEST_SIZES[name_alg]
    if not 1 <= len(secret) <= digest_size:
        raise CredentialError(f"the secret is {len(secret)} bytes; it must be 1..{digest_size}")
    if not 2 <= len(ak_name) <= structs.MAX_NAME:
        raise CredentialError(f"the AK name is {len(ak_name)} bytes")
    symmetric = area.parameters.symmetric
    if symmetric.algorithm != structs.TPM_ALG_AES or symmetric.mode != structs.TPM_ALG_CFB:
        raise CredentialError("the EK's symmetric algorithm is not AES-CFB")
    if symmetric.key_bits not in (128, 192, 256):
        raise CredentialError(f"the EK's AES key size {symmetric.key_bits} is not valid")

    if isinstance(key, rsa.RSAPublicKey):
        seed = random(digest_size)
        hash_class = _HASH_CLASSES[name_alg]
        oaep = padding.OAEP(
            mgf=padding.MGF1(hash_class()), algorithm=hash_class(), label=b"IDENTITY\0"
        )
        try:
            encrypted = key.encrypt(seed, oaep)
        except ValueError:  # the key is too small for OAEP with this hash
            raise CredentialError(
                f"a {key.key_size}-bit RSA EK cannot carry a {digest_size}-byte seed"
            ) from None
    else:
        seed, encrypted = _ecdh_seed(key, name_alg, random)

    sym_key = kdfa(name_alg, seed, b"STORAGE", ak_name, b"", symmetric.key_bits)
    plain = structs.tpm2b(secret)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(plain) + encryptor.finalize()
    hmac_key = kdfa(name_alg, seed, b"INTEGRITY", b"", b"", digest_size * 8)
    outer_hmac = hmac.digest(hmac_key, enc_identity + ak_name, structs.HASHES[name_alg])
    id_object = structs.tpm2b(structs.tpm2b(outer_hmac) + enc_identity)
    return id_object, structs.tpm2b(encrypted)


def _ecdh_seed(
    key: ec.EllipticCurvePublicKey, name_alg: int, random: Callable[[int], bytes]
) -> tuple[bytes, bytes]:
    """An ephemeral key on the EK's curve; the seed comes from the ECDH shared x."""
    curve = key.curve
    size = (curve.key_size + 7) // 8
    order = _ORDERS[curve.name]
    # 8 extra bytes make the reduction's bias negligible; the scalar is in 1..n-1.
    scalar = int.from_bytes(random(size + 8), "big") % (order - 1) + 1
    ephemeral = ec.derive_private_key(scalar, curve)
    z = ephemeral.exchange(ec.ECDH(), key)  # the x coordinate, curve-size bytes
    ours = ephemeral.public_key().public_numbers()
    theirs = key.public_numbers()
    ours_x, ours_y = ours.x.to_bytes(size, "big"), ours.y.to_bytes(size, "big")
    bits = structs.DIGEST_SIZES[name_alg] * 8
    seed = kdfe(name_alg, z, b"IDENTITY", ours_x, theirs.x.to_bytes(size, "big"), bits)
    return seed, structs.marshal_ecc_point(structs.EccPoint(ours_x, ours_y))


_ORDERS = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
        "581a0db248b0a77aecec196accc52973",
        16,
    ),
    "secp521r1": int(
        "01ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"
        "fffa51868783bf2f966b7fcc0148f709a5d03bb5c9b8899c47aebb6fb71e91386409",
        16,
    ),
}


def tools_credential_file(id_object: bytes, encrypted_secret: bytes) -> bytes:
    """The credential as the file ``tpm2_activatecredential -i`` reads."""
    header = struct.pack(">II", TOOLS_CREDENTIAL_MAGIC, TOOLS_CREDENTIAL_VERSION)
    return header + id_object + encrypted_secret


def verify_ek_certificate(
    cert_der: bytes, trusted: Sequence[x509.Certificate], now: datetime
) -> x509.Certificate:
    """The EK certificate, once it chains by signature to a cert in ``trusted``.

    Each link is checked with ``verify_directly_issued_by`` and every certificate on the
    path must be valid at ``now``; the walk goes on up through ``trusted`` (so an
    intermediate there is checked against its root when the root is there too) until a
    self-signed certificate or one whose issuer is not in ``trusted``. EK certificates
    carry TCG extensions that WebPKI validation refuses, so none is used here.
    """
    try:
        return _verify_ek_certificate(cert_der, trusted, now)
    except (ValueError, TypeError) as exc:
        # cryptography parses names and times lazily: a malformed one surfaces here.
        raise EkCertificateError(f"the EK certificate does not parse: {exc}") from None


def _verify_ek_certificate(
    cert_der: bytes, trusted: Sequence[x509.Certificate], now: datetime
) -> x509.Certificate:
    if now.tzinfo is None:
        raise EkCertificateError("now must be an aware datetime")
    now = now.astimezone(UTC)
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise EkCertificateError("the EK certificate is not DER X.509") from None
    _check_time(cert, now, "the EK certificate")
    current = cert
    anchored = False
    for _depth in range(MAX_CHAIN):
        issuer = _issuer_in(current, trusted)
        if issuer is None:
            break
        _check_time(issuer, now, f"the CA {issuer.subject.rfc4514_string()!r}")
        if not _is_ca(issuer):
            raise EkCertificateError(f"{issuer.subject.rfc4514_string()!r} is not a CA")
        anchored = True
        if issuer.issuer == issuer.subject and _signed_by(issuer, issuer):
            break
        current = issuer
    else:
        raise EkCertificateError(f"the chain is longer than {MAX_CHAIN}")
    if not anchored:
        raise EkCertificateError(
            f"the EK certificate's issuer {cert.issuer.rfc4514_string()!r} is not trusted "
            "(no trusted certificate signed it)"
        )
    return cert


def _issuer_in(
    cert: x509.Certificate, trusted: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in trusted:
        if candidate != cert and candidate.subject == cert.issuer and _signed_by(cert, candidate):
            return candidate
    return None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        # ValueError: names differ; TypeError: a key or signature type not supported.
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return cert.version == x509.Version.v1  # a v1 root predates the extension
    except ValueError:  # extensions that do not parse (e.g. one twice)
        return False
    return constraints.ca


def _check_time(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise EkCertificateError(f"{what} is not valid before {cert.not_valid_before_utc}")
    if now > cert.not_valid_after_utc:
        raise EkCertificateError(f"{what} expired at {cert.not_valid_after_utc}")
