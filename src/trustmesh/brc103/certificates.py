"""BRC-52 identity certificates as the reference SDKs build them (reference notes d).

A certificate binds a subject's identity key to fields that a certifier vouches for.
Every field value is AES-GCM encrypted under its own random key; the certifier signs the
binary form, which holds the ciphertexts. The subject holds the field keys in a *master
keyring* (encrypted to it); to show some fields to a verifier it re-encrypts just those
keys into a *verifier keyring*. The verifier can check the signature over all fields but
decrypt only the revealed ones.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Self

from trustmesh.brc103.collation import locale_sorted
from trustmesh.brc103.encoding import (
    b64decode,
    b64encode,
    is_public_key_hex,
    read_bytes,
    read_varint,
    write_varint,
)
from trustmesh.brc103.errors import CertificateError, CertificateFormatError, quoted
from trustmesh.brc103.wallet import Wallet, minimal_bytes
from trustmesh.crypto import brc2
from trustmesh.errors import (
    AuthenticationError,
    DecodeError,
    InvalidKeyError,
    InvalidSignatureError,
)

SIGNATURE_PROTOCOL = (2, "certificate signature")
FIELD_PROTOCOL = (2, "certificate field encryption")
NO_REVOCATION = "00" * 32 + ".0"  # an outpoint that nothing can spend: not revocable
MAX_FIELDS = 256
MAX_FIELD_NAME = 256  # UTF-8 bytes
MAX_FIELD_VALUE = 64 * 1024  # bytes of base64 ciphertext
MAX_SIGNATURE = 73
_OUTPOINT = re.compile(r"([0-9a-f]{64})(?:\.(0|[1-9][0-9]{0,9}))?")
_ANYONE = Wallet(b"\0" * 31 + b"\x01")  # verifies certifier signatures (counterparty anyone)


def parse_outpoint(text: str) -> tuple[bytes, int | None]:
    """``"<txid hex>.<index>"``; the reference also writes a bare txid (index ``None``)."""
    match = _OUTPOINT.fullmatch(text)
    if match is None:
        raise CertificateFormatError(f"revocation outpoint {text[:80]!r} is not <txid>.<index>")
    index = match.group(2)
    if index is not None and int(index) > 0xFFFFFFFF:
        raise CertificateFormatError("revocation output index out of range")
    return bytes.fromhex(match.group(1)), None if index is None else int(index)


def is_revocable(outpoint: str) -> bool:
    """False only for the 36 zero bytes (all-zero txid, output index 0), which nothing can
    spend, and for the reference's index-less all-zero txid (its "no outpoint" default).
    Any other outpoint, ``"00"*32 + ".1"`` included, names an output that may be spent:
    the certificate is revocable and must be checked. Raises CertificateFormatError for
    text that is not an outpoint."""
    txid, index = parse_outpoint(outpoint)
    return any(txid) or index not in (0, None)


@dataclass(frozen=True, slots=True)
class Certificate:
    """A signed certificate; ``fields`` maps names to base64 ciphertexts.

    Field values are kept as text: the signature covers the base64 text, and a value
    that is not base64 fails only when someone tries to decrypt it."""

    type: str  # base64 of 32 bytes
    serial_number: str  # base64 of 32 bytes
    subject: str  # identity key hex
    certifier: str  # identity key hex
    revocation_outpoint: str
    fields: dict[str, str]
    signature: bytes = b""

    def __post_init__(self) -> None:
        for what, value in (("type", self.type), ("serialNumber", self.serial_number)):
            if len(b64decode(value, what, CertificateFormatError)) != 32:
                raise CertificateFormatError(f"certificate {what} must be 32 bytes of base64")
        for what, value in (("subject", self.subject), ("certifier", self.certifier)):
            if not is_public_key_hex(value):
                raise CertificateFormatError(f"certificate {what} is not a compressed key in hex")
        parse_outpoint(self.revocation_outpoint)
        if len(self.fields) > MAX_FIELDS:
            raise CertificateFormatError(f"a certificate has at most {MAX_FIELDS} fields")
        for name, value in self.fields.items():
            _check_field_name(name)
            if not isinstance(value, str) or len(value) > MAX_FIELD_VALUE:
                raise CertificateFormatError(
                    f"field {quoted(name)} is not text of at most {MAX_FIELD_VALUE} characters"
                )
        if len(self.signature) > MAX_SIGNATURE:
            raise CertificateFormatError("the certificate signature is too long for DER ECDSA")

    # --- binary form ------------------------------------------------------------------

    def to_binary(self, *, include_signature: bool = True) -> bytes:
        """The reference's ``toBinary``; without the signature it is what gets signed."""
        txid, index = parse_outpoint(self.revocation_outpoint)
        out = bytearray()
        out += b64decode(self.type, "type")
        out += b64decode(self.serial_number, "serialNumber")
        out += bytes.fromhex(self.subject)
        out += bytes.fromhex(self.certifier)
        out += txid
        # A bare txid is Number(undefined) = NaN in the reference: written as ff + 0 * 8.
        out += b"\xff" + bytes(8) if index is None else write_varint(index)
        out += write_varint(len(self.fields))
        for name in locale_sorted(list(self.fields)):
            name_bytes = name.encode("utf-8")
            value_bytes = self.fields[name].encode("utf-8")
            out += write_varint(len(name_bytes)) + name_bytes
            out += write_varint(len(value_bytes)) + value_bytes
        if include_signature:
            out += self.signature
        return bytes(out)

    @classmethod
    def from_binary(cls, data: bytes) -> Certificate:
        try:
            return cls._from_binary(data)
        except CertificateFormatError:
            raise
        except DecodeError as exc:
            raise CertificateFormatError(f"certificate binary: {exc}") from None

    @classmethod
    def _from_binary(cls, data: bytes) -> Certificate:
        offset = 0
        type_id, offset = read_bytes(data, offset, 32, "type")
        serial, offset = read_bytes(data, offset, 32, "serialNumber")
        subject, offset = read_bytes(data, offset, 33, "subject")
        certifier, offset = read_bytes(data, offset, 33, "certifier")
        txid, offset = read_bytes(data, offset, 32, "revocation txid")
        if data[offset : offset + 9] == b"\xff" + bytes(8):
            outpoint, offset = txid.hex(), offset + 9
        else:
            index, offset = read_varint(data, offset)
            if index < 0 or index > 0xFFFFFFFF:
                raise CertificateFormatError("revocation output index out of range")
            outpoint = f"{txid.hex()}.{index}"
        count, offset = read_varint(data, offset)
        if count < 0 or count > MAX_FIELDS:
            raise CertificateFormatError(f"field count {count} out of range")
        fields: dict[str, str] = {}
        for _ in range(count):
            size, offset = read_varint(data, offset)
            if size > MAX_FIELD_NAME:
                raise CertificateFormatError("field name too long", offset=offset)
            raw_name, offset = read_bytes(data, offset, size, "field name")
            size, offset = read_varint(data, offset)
            if size > MAX_FIELD_VALUE:
                raise CertificateFormatError("field value too long", offset=offset)
            raw_value, offset = read_bytes(data, offset, size, "field value")
            try:
                name, value = raw_name.decode("utf-8"), raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise CertificateFormatError("field text is not UTF-8", offset=offset) from None
            if name in fields:
                raise CertificateFormatError(f"field {quoted(name)} appears twice")
            fields[name] = value
        return cls(
            type=b64encode(type_id),
            serial_number=b64encode(serial),
            subject=subject.hex(),
            certifier=certifier.hex(),
            revocation_outpoint=outpoint,
            fields=fields,
            signature=data[offset:],
        )

    # --- signature --------------------------------------------------------------------

    @property
    def key_id(self) -> str:
        return f"{self.type} {self.serial_number}"

    def sign(self, certifier: Wallet) -> Self:
        """Signed by ``certifier`` (which becomes the certificate's certifier)."""
        unsigned = replace(self, certifier=certifier.identity_key, signature=b"")
        signature = certifier.create_signature(
            unsigned.to_binary(include_signature=False), SIGNATURE_PROTOCOL, self.key_id
        )
        return replace(unsigned, signature=signature)

    def verify(self) -> None:
        """Raise :class:`CertificateError` unless the certifier signed this certificate."""
        if not self.signature:
            raise CertificateError("the certificate is not signed")
        try:
            _ANYONE.verify_signature(
                self.to_binary(include_signature=False),
                self.signature,
                SIGNATURE_PROTOCOL,
                self.key_id,
                self.certifier,
            )
        except (InvalidSignatureError, InvalidKeyError):
            raise CertificateError("the certifier's signature does not verify") from None

    # --- JSON form --------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The reference's key order: type, serialNumber, subject, certifier,
        revocationOutpoint, fields, signature."""
        return {
            "type": self.type,
            "serialNumber": self.serial_number,
            "subject": self.subject,
            "certifier": self.certifier,
            "revocationOutpoint": self.revocation_outpoint,
            "fields": dict(self.fields),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, obj: object) -> Certificate:
        data = _object(obj, "certificate")
        signature = _string(data, "signature", required=False) or ""
        try:
            raw_signature = bytes.fromhex(signature)
        except ValueError:
            raise CertificateFormatError("certificate signature is not hex") from None
        return cls(
            type=_string(data, "type"),
            serial_number=_string(data, "serialNumber"),
            subject=_string(data, "subject"),
            certifier=_string(data, "certifier"),
            revocation_outpoint=_string(data, "revocationOutpoint"),
            fields=_string_map(data, "fields"),
            signature=raw_signature,
        )


@dataclass(frozen=True, slots=True)
class MasterCertificate:
    """A certificate and its master keyring: each field key, encrypted certifier→subject."""

    certificate: Certificate
    master_keyring: dict[str, str]

    @classmethod
    def issue(
        cls,
        certifier: Wallet,
        subject: str,
        certificate_type: str,
        fields: dict[str, str],
        *,
        serial_number: str | None = None,
        revocation_outpoint: str = NO_REVOCATION,
    ) -> MasterCertificate:
        """Encrypt ``fields`` (name → plaintext), build the master keyring for ``subject``
        and sign, as the reference's ``issueCertificateForSubject`` does."""
        if not fields:
            raise CertificateError("a certificate needs at least one field")
        encrypted: dict[str, str] = {}
        keyring: dict[str, str] = {}
        for name, value in fields.items():
            _check_field_name(name)
            field_key = os.urandom(32)
            encrypted[name] = b64encode(brc2.encrypt(field_key, value.encode("utf-8")))
            keyring[name] = b64encode(
                certifier.encrypt(minimal_bytes(field_key), FIELD_PROTOCOL, name, subject)
            )
        certificate = Certificate(
            type=certificate_type,
            serial_number=serial_number or b64encode(os.urandom(32)),
            subject=subject,
            certifier=certifier.identity_key,
            revocation_outpoint=revocation_outpoint,
            fields=encrypted,
        ).sign(certifier)
        return cls(certificate, keyring)

    def field_key(self, subject: Wallet, name: str) -> bytes:
        """The subject's view of one field key (from the master keyring)."""
        sealed = self.master_keyring.get(name)
        if sealed is None:
            raise CertificateError(f"the master keyring has no key for field {quoted(name)}")
        try:
            return subject.decrypt(
                b64decode(sealed, f"master key {quoted(name)}", CertificateFormatError),
                FIELD_PROTOCOL,
                name,
                self.certificate.certifier,
            )
        except (AuthenticationError, DecodeError):
            raise CertificateError(
                f"cannot decrypt the master key of field {quoted(name)}"
            ) from None

    def decrypt_fields(self, subject: Wallet) -> dict[str, str]:
        return {
            name: _open_field(self.certificate, name, self.field_key(subject, name))
            for name in self.certificate.fields
        }

    def reveal(self, subject: Wallet, verifier: str, names: list[str]) -> VerifiableCertificate:
        """A verifiable certificate whose keyring lets ``verifier`` read ``names`` only."""
        if subject.identity_key != self.certificate.subject:
            raise CertificateError("only the certificate's subject can reveal its fields")
        keyring: dict[str, str] = {}
        for name in names:
            if name not in self.certificate.fields:
                raise CertificateError(f"the certificate has no field {quoted(name)}")
            key = self.field_key(subject, name)
            keyring[name] = b64encode(
                subject.encrypt(
                    key, FIELD_PROTOCOL, f"{self.certificate.serial_number} {name}", verifier
                )
            )
        return VerifiableCertificate(self.certificate, keyring)

    def to_json(self) -> dict[str, Any]:
        return {**self.certificate.to_json(), "masterKeyring": dict(self.master_keyring)}

    @classmethod
    def from_json(cls, obj: object) -> MasterCertificate:
        data = _object(obj, "master certificate")
        rest = {k: v for k, v in data.items() if k != "masterKeyring"}
        return cls(Certificate.from_json(rest), _string_map(data, "masterKeyring"))


@dataclass(frozen=True, slots=True)
class VerifiableCertificate:
    """A certificate with a keyring for one verifier: the fields it may read."""

    certificate: Certificate
    keyring: dict[str, str]
    decrypted_fields: dict[str, str] = field(default_factory=dict, compare=False)

    def decrypt_fields(self, verifier: Wallet) -> dict[str, str]:
        """Every revealed field in plain text; :class:`CertificateError` if any fails."""
        if not self.keyring:
            raise CertificateError("the certificate reveals no fields")
        cert = self.certificate
        out: dict[str, str] = {}
        for name, sealed in self.keyring.items():
            if name not in cert.fields:
                raise CertificateError(f"the keyring reveals {quoted(name)}, which is not a field")
            try:
                key = verifier.decrypt(
                    b64decode(sealed, f"keyring {quoted(name)}", CertificateFormatError),
                    FIELD_PROTOCOL,
                    f"{cert.serial_number} {name}",
                    cert.subject,
                )
            except (AuthenticationError, DecodeError):
                raise CertificateError(f"cannot decrypt the key of field {quoted(name)}") from None
            out[name] = _open_field(cert, name, key)
        return out

    def to_json(self) -> dict[str, Any]:
        return {**self.certificate.to_json(), "keyring": dict(self.keyring)}

    @classmethod
    def from_json(cls, obj: object) -> VerifiableCertificate:
        data = _object(obj, "verifiable certificate")
        rest = {k: v for k, v in data.items() if k != "keyring"}
        return cls(Certificate.from_json(rest), _string_map(data, "keyring"))


def _open_field(cert: Certificate, name: str, key: bytes) -> str:
    try:
        plain = brc2.decrypt(key, b64decode(cert.fields[name], name, CertificateFormatError))
        return plain.decode("utf-8")
    except (AuthenticationError, DecodeError, InvalidKeyError, UnicodeDecodeError):
        raise CertificateError(f"field {quoted(name)} does not decrypt with its key") from None


def _check_field_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise CertificateFormatError("a field name is a non-empty string")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise CertificateFormatError("a field name holds a lone surrogate") from None
    if size > MAX_FIELD_NAME:
        raise CertificateFormatError(f"field name longer than {MAX_FIELD_NAME} bytes")


def _object(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CertificateFormatError(f"{what} is not a JSON object")
    return obj


def _string(data: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise CertificateFormatError(f"certificate {key} must be a string")
    return value


def _string_map(data: dict[str, Any], key: str) -> dict[str, str]:
    value = data.get(key)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CertificateFormatError(f"certificate {key} must map names to strings")
    return dict(value)
