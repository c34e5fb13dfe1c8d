"""Catalyst messages: length-prefixed JSON objects (docs/protocols/catalyst.md).

Frame: ``uvarint(len) || UTF-8 JSON object``, at most MAX_MESSAGE bytes. Parsing is
strict: unknown ``type``, wrong field types, out-of-range numbers and duplicate keys are
refused with the NOTIFICATION code and subcode that RFC 4271 gives for them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from trustmesh.catalyst.errors import MessageError

MAX_MESSAGE = 64 * 1024  # an OPEN with a JWKS of a few keys fits many times over
VERSION = 1
MAX_ASN = (1 << 32) - 1
MAX_HOLD_TIME = 65535
MAX_IDENTIFIER = 253  # a DNS name's length
MAX_KEY_ID = 128

# RFC 4271 section 4.5 error codes, and the subcodes we use (catalyst.md lists them all).
MESSAGE_HEADER_ERROR = 1
OPEN_MESSAGE_ERROR = 2
HOLD_TIMER_EXPIRED = 4
FSM_ERROR = 5
CEASE = 6
BAD_MESSAGE_LENGTH = 2
BAD_MESSAGE_TYPE = 3
UNSUPPORTED_VERSION = 1
BAD_PEER_AS = 2
BAD_BGP_IDENTIFIER = 3
UNSUPPORTED_OPTIONAL_PARAMETER = 4
UNACCEPTABLE_HOLD_TIME = 6
# Private subcodes (RFC 4271 leaves the rest unassigned; documented in catalyst.md).
PSK_UNKNOWN_KEY = 240
PSK_BAD_PROOF = 241
PSK_REQUIRED = 242
JWS_BAD_SIGNATURE = 243
JWS_UNKNOWN_KID = 244
JWKS_MALFORMED = 245
POLICY_REFUSED = 246
CEASE_ADMIN_SHUTDOWN = 2
CEASE_COLLISION = 7

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class Open:
    my_asn: int
    bgp_identifier: str
    hold_time: int
    version: int = VERSION
    psk: str | None = None  # a key id
    jwks: dict[str, Any] | None = None
    capabilities: tuple[str, ...] = ()
    psk_proof: str | None = None  # base64url HMAC-SHA256
    jws: str | None = None  # detached compact JWS: "protected..signature"

    def to_json(self, *, proofs: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "type": "OPEN",
            "version": self.version,
            "myAsn": self.my_asn,
            "bgpIdentifier": self.bgp_identifier,
            "holdTime": self.hold_time,
        }
        if self.psk is not None:
            data["psk"] = self.psk
        if self.jwks is not None:
            data["jwks"] = self.jwks
        if self.capabilities:
            data["capabilities"] = list(self.capabilities)
        if proofs and self.psk_proof is not None:
            data["pskProof"] = self.psk_proof
        if proofs and self.jws is not None:
            data["jws"] = self.jws
        return data

    def canonical(self) -> bytes:
        """The bytes a JWS signs: the OPEN without its proofs, keys sorted, no spaces."""
        return canonical_json(self.to_json(proofs=False))


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Keeps the session's hold timer from expiring; it has no fields."""


@dataclass(frozen=True, slots=True)
class Notification:
    code: int
    subcode: int = 0
    message: str = field(default="")


Message = Open | Keepalive | Notification


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode(message: Message) -> bytes:
    if isinstance(message, Open):
        data = message.to_json()
    elif isinstance(message, Keepalive):
        data = {"type": "KEEPALIVE"}
    else:
        data = {"type": "NOTIFICATION", "code": message.code, "subcode": message.subcode}
        if message.message:
            data["message"] = message.message[:512]
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MessageError(f"duplicate key {key!r}", code=MESSAGE_HEADER_ERROR)
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise MessageError(f"{name} is not JSON", code=MESSAGE_HEADER_ERROR)


def decode(payload: bytes) -> Message:
    """Parse one message; raise :class:`MessageError` with its NOTIFICATION code."""
    if len(payload) > MAX_MESSAGE:
        raise MessageError(
            f"message of {len(payload)} bytes exceeds {MAX_MESSAGE}",
            code=MESSAGE_HEADER_ERROR,
            subcode=BAD_MESSAGE_LENGTH,
        )
    try:
        data = json.loads(
            payload.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"not a JSON message: {exc}", code=MESSAGE_HEADER_ERROR) from None
    if not isinstance(data, dict):
        raise MessageError("a message is a JSON object", code=MESSAGE_HEADER_ERROR)
    kind = data.get("type")
    if kind == "OPEN":
        return _open(data)
    if kind == "KEEPALIVE":
        _only(data, {"type"}, "KEEPALIVE")
        return Keepalive()
    if kind == "NOTIFICATION":
        _only(data, {"type", "code", "subcode", "message"}, "NOTIFICATION")
        code = _int(data, "code", 0, 255, MESSAGE_HEADER_ERROR)
        subcode = _int(data, "subcode", 0, 255, MESSAGE_HEADER_ERROR, default=0)
        text = data.get("message", "")
        if not isinstance(text, str):
            raise MessageError("NOTIFICATION message must be a string", code=MESSAGE_HEADER_ERROR)
        return Notification(code, subcode, text[:512])
    raise MessageError(
        f"unknown message type {kind!r}", code=MESSAGE_HEADER_ERROR, subcode=BAD_MESSAGE_TYPE
    )


def _only(data: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = set(data) - allowed
    if extra:
        raise MessageError(f"{what} has unknown fields {sorted(extra)}", code=MESSAGE_HEADER_ERROR)


def _int(
    data: dict[str, Any],
    key: str,
    low: int,
    high: int,
    code: int,
    *,
    subcode: int = 0,
    default: int | None = None,
) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MessageError(f"{key} must be an integer in {low}..{high}", code=code, subcode=subcode)
    return value


def _open(data: dict[str, Any]) -> Open:
    _only(
        data,
        {
            "type",
            "version",
            "myAsn",
            "bgpIdentifier",
            "holdTime",
            "psk",
            "jwks",
            "capabilities",
            "pskProof",
            "jws",
        },
        "OPEN",
    )
    version = _int(data, "version", 0, 255, OPEN_MESSAGE_ERROR, subcode=UNSUPPORTED_VERSION)
    if version != VERSION:
        raise MessageError(
            f"version {version} is not supported (we speak {VERSION})",
            code=OPEN_MESSAGE_ERROR,
            subcode=UNSUPPORTED_VERSION,
        )
    asn = _int(data, "myAsn", 1, MAX_ASN, OPEN_MESSAGE_ERROR, subcode=BAD_PEER_AS)
    hold = _int(
        data, "holdTime", 0, MAX_HOLD_TIME, OPEN_MESSAGE_ERROR, subcode=UNACCEPTABLE_HOLD_TIME
    )
    ident = data.get("bgpIdentifier")
    if not isinstance(ident, str) or not 0 < len(ident) <= MAX_IDENTIFIER:
        raise MessageError(
            "bgpIdentifier must be a non-empty string",
            code=OPEN_MESSAGE_ERROR,
            subcode=BAD_BGP_IDENTIFIER,
        )
    psk = _optional_str(data, "psk", MAX_KEY_ID, PSK_UNKNOWN_KEY)
    proof = _optional_str(data, "pskProof", 128, PSK_BAD_PROOF)
    if proof is not None and not _BASE64URL.fullmatch(proof):
        raise MessageError(
            "pskProof must be base64url", code=OPEN_MESSAGE_ERROR, subcode=PSK_BAD_PROOF
        )
    jws = _optional_str(data, "jws", 4096, JWS_BAD_SIGNATURE)
    if jws is not None and not _COMPACT_JWS.fullmatch(jws):
        raise MessageError(
            "jws must be base64url segments joined by dots",
            code=OPEN_MESSAGE_ERROR,
            subcode=JWS_BAD_SIGNATURE,
        )
    jwks = data.get("jwks")
    if jwks is not None and (not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list)):
        raise MessageError(
            'jwks must be {"keys": [...]}', code=OPEN_MESSAGE_ERROR, subcode=JWKS_MALFORMED
        )
    caps = data.get("capabilities", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) and len(c) <= 64 for c in caps):
        raise MessageError(
            "capabilities must be a list of short strings",
            code=OPEN_MESSAGE_ERROR,
            subcode=UNSUPPORTED_OPTIONAL_PARAMETER,
        )
    return Open(asn, ident, hold, version, psk, jwks, tuple(caps), proof, jws)


def _optional_str(data: dict[str, Any], key: str, limit: int, subcode: int) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise MessageError(
            f"{key} must be a string of 1..{limit} characters",
            code=OPEN_MESSAGE_ERROR,
            subcode=subcode,
        )
    return value
