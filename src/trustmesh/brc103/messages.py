"""AuthMessages: the five BRC-103 message types, parsed strictly and written as the
TypeScript reference writes them (reference notes a).

Byte fields (``payload``, ``signature``) are JSON arrays of integers 0-255. Two members
are signed as JSON text, ``requestedCertificates`` and ``certificates``; a parsed message
keeps their received values so the signature is checked over exactly what was sent
(re-serialised the way ``JSON.stringify`` does, key order kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from trustmesh.brc103.certificates import VerifiableCertificate
from trustmesh.brc103.encoding import b64decode, is_public_key_hex, js_stringify
from trustmesh.brc103.errors import (
    Brc103Error,
    MalformedMessageError,
    UnsupportedVersionError,
)
from trustmesh.crypto.brc42 import parse_public_key
from trustmesh.errors import DecodeError, InvalidKeyError
from trustmesh.wire.jsonwire import compact_json, strict_loads

VERSION = "0.1"
MAX_MESSAGE_SIZE = 8 * 1024 * 1024
MAX_NONCE_TEXT = 256  # base64 characters; references use 44 and 64
MAX_SIGNATURE = 80
MAX_CERTIFICATES = 64
MAX_REQUESTED = 256
MAX_TEXT = 64 * 1024  # requestedCertificates as JSON text


class MessageType(StrEnum):
    INITIAL_REQUEST = "initialRequest"
    INITIAL_RESPONSE = "initialResponse"
    CERTIFICATE_REQUEST = "certificateRequest"
    CERTIFICATE_RESPONSE = "certificateResponse"
    GENERAL = "general"


@dataclass(frozen=True, slots=True)
class RequestedCertificates:
    """Which certificates a peer asks for: certifiers, and per type the field names."""

    certifiers: tuple[str, ...] = ()
    types: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        """The reference's rule: certificates are required when a certifier is named."""
        return bool(self.certifiers)

    def allows(self, certifier: str, cert_type: str, revealed: list[str]) -> str | None:
        """Why a certificate does not answer this request, or ``None`` when it does."""
        if certifier not in self.certifiers:
            return f"certifier {certifier} was not requested"
        wanted = self.types.get(cert_type)
        if wanted is None:
            return f"certificate type {cert_type} was not requested"
        extra = [name for name in revealed if name not in wanted]
        if extra:
            return f"field(s) {', '.join(sorted(extra))} were not requested"
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "certifiers": list(self.certifiers),
            "types": {k: list(v) for k, v in self.types.items()},
        }

    @classmethod
    def from_text(cls, text: str) -> RequestedCertificates:
        """From JSON text (a BRC-104 header, a command-line option)."""
        raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate: refused as bad UTF-8
        value = strict_loads(raw, max_size=MAX_TEXT, error=MalformedMessageError)
        return cls.from_json(value)

    @classmethod
    def from_json(cls, value: object) -> RequestedCertificates:
        if not isinstance(value, dict) or set(value) - {"certifiers", "types"}:
            raise MalformedMessageError("requestedCertificates must be {certifiers, types}")
        certifiers = value.get("certifiers", [])
        types = value.get("types", {})
        if not isinstance(certifiers, list) or len(certifiers) > MAX_REQUESTED:
            raise MalformedMessageError("requestedCertificates.certifiers must be a list of keys")
        for key in certifiers:
            if not is_public_key_hex(key):
                raise MalformedMessageError("requestedCertificates.certifiers holds a bad key")
        if not isinstance(types, dict) or len(types) > MAX_REQUESTED:
            raise MalformedMessageError("requestedCertificates.types must map types to fields")
        parsed: dict[str, tuple[str, ...]] = {}
        for cert_type, names in types.items():
            if not isinstance(names, list) or len(names) > MAX_REQUESTED:
                raise MalformedMessageError("requestedCertificates.types values are name lists")
            if not all(isinstance(name, str) and name for name in names):
                raise MalformedMessageError("requested field names are non-empty strings")
            parsed[cert_type] = tuple(names)
        return cls(tuple(certifiers), parsed)


NO_REQUEST = RequestedCertificates()


@dataclass(slots=True)
class AuthMessage:
    """One BRC-103 message. ``identity_key`` is hex; nonces are base64 text."""

    message_type: MessageType
    identity_key: str
    version: str = VERSION
    initial_nonce: str | None = None
    nonce: str | None = None
    your_nonce: str | None = None
    certificates: list[VerifiableCertificate] | None = None
    requested_certificates: RequestedCertificates | None = None
    payload: bytes | None = None
    signature: bytes | None = None
    # The JSON values of the signed members as received (or as we will send them).
    raw_certificates: list[Any] | None = None
    raw_requested: dict[str, Any] | None = None

    def certificates_json(self) -> list[Any]:
        if self.raw_certificates is None:
            self.raw_certificates = [c.to_json() for c in self.certificates or []]
        return self.raw_certificates

    def requested_json(self) -> dict[str, Any]:
        if self.raw_requested is None:
            self.raw_requested = (self.requested_certificates or NO_REQUEST).to_json()
        return self.raw_requested

    def signed_data(self) -> bytes:
        """The bytes this message's signature covers (initialResponse aside: its data is
        the two session nonces, see :mod:`trustmesh.brc103.peer`)."""
        if self.message_type is MessageType.GENERAL:
            return self.payload or b""
        if self.message_type is MessageType.CERTIFICATE_REQUEST:
            return js_stringify(self.requested_json())
        if self.message_type is MessageType.CERTIFICATE_RESPONSE:
            return js_stringify(self.certificates_json())
        raise Brc103Error(f"{self.message_type} has no payload signature")

    def to_json(self) -> dict[str, Any]:
        """The wire object in the reference's field order; absent fields are left out."""
        out: dict[str, Any] = {
            "version": self.version,
            "messageType": self.message_type.value,
            "identityKey": self.identity_key,
        }
        t = self.message_type
        if t in (
            MessageType.CERTIFICATE_REQUEST,
            MessageType.CERTIFICATE_RESPONSE,
            MessageType.GENERAL,
        ):
            out["nonce"] = self.nonce
        if t is not MessageType.GENERAL:
            out["initialNonce"] = self.initial_nonce
        if t is not MessageType.INITIAL_REQUEST:
            out["yourNonce"] = self.your_nonce
        if t is MessageType.CERTIFICATE_RESPONSE or (
            t is MessageType.INITIAL_RESPONSE and self.certificates
        ):
            out["certificates"] = self.certificates_json()
        if t in (
            MessageType.INITIAL_REQUEST,
            MessageType.INITIAL_RESPONSE,
            MessageType.CERTIFICATE_REQUEST,
        ):
            out["requestedCertificates"] = self.requested_json()
        if t is MessageType.GENERAL:
            out["payload"] = list(self.payload or b"")
        if t is not MessageType.INITIAL_REQUEST:
            out["signature"] = list(self.signature or b"")
        return out

    def to_bytes(self) -> bytes:
        return compact_json(self.to_json())


def parse_message_bytes(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> AuthMessage:
    """Strict JSON (no duplicate keys, NaN, deep nesting) into an :class:`AuthMessage`."""
    value = strict_loads(data, max_size=max_size, error=MalformedMessageError)
    return parse_message(value)


def parse_message(obj: object) -> AuthMessage:
    """Check and type a decoded JSON object. Unknown members are ignored, as the
    references ignore them; every known member must have the right shape. ``null`` and
    ``""`` mean absent (the Python reference sends every member, empty ones so)."""
    if not isinstance(obj, dict):
        raise MalformedMessageError("an AuthMessage is a JSON object")
    version = obj.get("version")
    if version != VERSION:
        raise UnsupportedVersionError(f"unsupported BRC-103 version {str(version)[:20]!r}")
    try:
        message_type = MessageType(str(obj.get("messageType")))
    except ValueError:
        raise MalformedMessageError(
            f"unknown messageType {str(obj.get('messageType'))[:40]!r}"
        ) from None
    identity_key = obj.get("identityKey")
    if not is_public_key_hex(identity_key):
        raise MalformedMessageError("identityKey must be a compressed public key in lowercase hex")
    assert isinstance(identity_key, str)
    message = AuthMessage(message_type=message_type, identity_key=identity_key)
    message.initial_nonce = _nonce(obj, "initialNonce")
    message.nonce = _nonce(obj, "nonce")
    message.your_nonce = _nonce(obj, "yourNonce")
    message.signature = _byte_array(obj, "signature", MAX_SIGNATURE)
    message.payload = _byte_array(obj, "payload", MAX_MESSAGE_SIZE)

    raw_requested = obj.get("requestedCertificates")
    if isinstance(raw_requested, str):
        # The Python reference writes its request object's repr() here in handshakes.
        raw_requested = None
    if raw_requested is not None:
        message.requested_certificates = RequestedCertificates.from_json(raw_requested)
        message.raw_requested = raw_requested
    raw_certificates = obj.get("certificates")
    if raw_certificates is not None:
        if not isinstance(raw_certificates, list) or len(raw_certificates) > MAX_CERTIFICATES:
            raise MalformedMessageError(
                f"certificates must be a list of at most {MAX_CERTIFICATES}"
            )
        try:
            message.certificates = [VerifiableCertificate.from_json(c) for c in raw_certificates]
        except DecodeError as exc:
            raise MalformedMessageError(f"certificates: {exc}") from None
        message.raw_certificates = raw_certificates

    _require(message)
    try:
        parse_public_key(bytes.fromhex(identity_key))
    except InvalidKeyError:
        raise MalformedMessageError("identityKey is not a point on secp256k1") from None
    return message


def _require(message: AuthMessage) -> None:
    """The members each type cannot do without."""
    t = message.message_type
    needed: list[str] = []
    if t is MessageType.INITIAL_REQUEST:
        needed = ["initialNonce"]
    elif t is MessageType.INITIAL_RESPONSE:
        needed = ["initialNonce", "yourNonce", "signature"]
    elif t is MessageType.CERTIFICATE_REQUEST:
        needed = ["nonce", "yourNonce", "signature", "requestedCertificates"]
    elif t is MessageType.CERTIFICATE_RESPONSE:
        needed = ["nonce", "yourNonce", "signature", "certificates"]
    else:
        needed = ["nonce", "yourNonce", "signature"]
    values = {
        "initialNonce": message.initial_nonce,
        "yourNonce": message.your_nonce,
        "nonce": message.nonce,
        "signature": message.signature,
        "requestedCertificates": message.requested_certificates,
        "certificates": message.certificates,
    }
    missing = [name for name in needed if not values[name]]
    if missing and not (missing == ["certificates"] and message.certificates == []):
        raise MalformedMessageError(f"{t.value} lacks {', '.join(missing)}")


def _nonce(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None or value == "":  # the Python reference writes "" for absent nonces
        return None
    if not isinstance(value, str) or len(value) > MAX_NONCE_TEXT:
        raise MalformedMessageError(f"{key} must be non-empty base64 text")
    if len(b64decode(value, key, MalformedMessageError)) < 16:
        raise MalformedMessageError(f"{key} is shorter than 16 bytes")
    return value


def _byte_array(obj: dict[str, Any], key: str, limit: int) -> bytes | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > limit:
        raise MalformedMessageError(f"{key} must be an array of at most {limit} bytes")
    if value and set(map(type, value)) != {int}:  # bools and floats are not bytes
        raise MalformedMessageError(f"{key} must hold integers 0-255")
    try:
        return bytes(value)
    except ValueError:
        raise MalformedMessageError(f"{key} must hold integers 0-255") from None
