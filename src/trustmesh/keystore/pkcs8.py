"""PKCS#8 key files: plaintext, or encrypted with PBES2 (scrypt + AES-256-CBC).

``cryptography`` reads every PKCS#8 variant OpenSSL writes, scrypt included, but it
writes encrypted PKCS#8 only with PBKDF2 at 2048 iterations. So this module writes the
``EncryptedPrivateKeyInfo`` itself (RFC 5958 / RFC 8018 with the RFC 7914 scrypt KDF,
the same structure as ``openssl pkcs8 -topk8 -scrypt``) from real primitives, and
leaves all reading to ``cryptography``.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from trustmesh.crypto.keys import PrivateKey
from trustmesh.errors import KeyStoreError, PassphraseError

# scrypt cost: N=2**14, r=8, p=1 uses 16 MiB, within OpenSSL's 32 MiB default limit.
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_SIZE = 16

_OID_PBES2 = "1.2.840.113549.1.5.13"
_OID_SCRYPT = "1.3.6.1.4.1.11591.4.11"
_OID_AES256_CBC = "2.16.840.1.101.3.4.1.42"


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        head = bytes((size,))
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        head = bytes((0x80 | len(raw),)) + raw
    return bytes((tag,)) + head + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray((40 * arcs[0] + arcs[1],))
    for arc in arcs[2:]:
        group = [arc & 0x7F]
        arc >>= 7
        while arc:
            group.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(group))
    return _der(0x06, bytes(body))


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _pem(label: str, der: bytes) -> bytes:
    text = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return (
        "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n"
    ).encode()


def encode_private_key(key: PrivateKey, passphrase: bytes | None) -> bytes:
    """PKCS#8 PEM of ``key``; encrypted with scrypt + AES-256-CBC when a passphrase is given."""
    info = key.to_cryptography().private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if passphrase is None:
        return _pem("PRIVATE KEY", info)
    if not passphrase:
        raise PassphraseError("an empty passphrase cannot protect a key")
    salt = os.urandom(SALT_SIZE)
    iv = os.urandom(16)
    kek = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(info) + padder.finalize()
    encryptor = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    scrypt_params = _seq(
        _der(0x04, salt), _der_int(SCRYPT_N), _der_int(SCRYPT_R), _der_int(SCRYPT_P)
    )
    pbes2_params = _seq(
        _seq(_der_oid(_OID_SCRYPT), scrypt_params),
        _seq(_der_oid(_OID_AES256_CBC), _der(0x04, iv)),
    )
    encrypted_info = _seq(_seq(_der_oid(_OID_PBES2), pbes2_params), _der(0x04, ciphertext))
    return _pem("ENCRYPTED PRIVATE KEY", encrypted_info)


def is_encrypted(pem: bytes) -> bool:
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem or b"Proc-Type: 4,ENCRYPTED" in pem


def decode_private_key(pem: bytes, passphrase: bytes | None) -> PrivateKey:
    """Load a PEM private key (PKCS#8, or the SEC1 form OpenSSL also writes)."""
    try:
        loaded = serialization.load_pem_private_key(pem, passphrase if is_encrypted(pem) else None)
    except TypeError as exc:
        raise PassphraseError(f"passphrase needed: {exc}") from None
    except ValueError as exc:
        if is_encrypted(pem):
            raise PassphraseError("wrong passphrase, or the key file is corrupt") from None
        raise KeyStoreError(f"not a valid PEM private key: {exc}") from None
    except Exception as exc:  # cryptography raises its own unsupported-algorithm errors
        raise KeyStoreError(f"cannot load private key: {exc}") from None
    return PrivateKey.from_cryptography(loaded)
