"""Signed gossip messages (zero-trust-mesh.md section 6.2; docs/protocols/mesh-link.md).

A message is a JSON object::

    {"message_id": "...", "origin": "node-1", "payload": {"type": "anomaly", ...},
     "timestamp": 1767225600000, "expiry": 1767229200000,
     "signature": "<base64 DER ECDSA or Ed25519>", "chain": ["<base64 DER>", ...]}

Times are Unix milliseconds. The signature covers ``SIGNING_LABEL`` followed by the
canonical JSON of ``[message_id, origin, payload, timestamp, expiry]``; ``chain`` (the
origin's certificate, then its issuing CA) rides outside the signature, as a
certificate does in TLS, and may be left out when the receiver already knows the origin.

The message id belongs to its origin: it is the SHA-256, in lowercase hex, of
``ID_LABEL`` followed by the canonical JSON of ``[origin, payload, timestamp, expiry]``
(:func:`derive_message_id`). Only the origin can sign a message with that content, so
no other node can take an id first and have the origin's message dropped as a
duplicate (receivers refuse an id that is not derived this way, :func:`check_message_id`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from trustmesh.keystore.signer import Signer
from trustmesh.mesh.errors import BadMessageId, MalformedMessage
from trustmesh.wire.jsonwire import canonical_json, compact_json, strict_loads

SIGNING_LABEL = b"trustmesh-gossip/1\n"
ID_LABEL = b"trustmesh-gossip-id/1\n"
MAX_MESSAGE = 512 * 1024  # a CRL of thousands of serials fits
MAX_META_FIELDS = 16  # an anomaly is a hash and a few words, never a log
MAX_META_KEY = 64
MAX_META_TEXT = 256
MAX_SAFE_INT = (1 << 53) - 1
MAX_MESSAGE_OVERHEAD = 48 * 1024  # room for the chain and signature beside the payload
MAX_CHAIN = 4
MAX_CERT = 8 * 1024
MAX_TTL_MS = 7 * 24 * 3600 * 1000
DEFAULT_TTL_MS = 3600 * 1000
MESSAGE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
NODE_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
HEX = re.compile(r"(?:[0-9a-f]{2}){8,64}")
KIND = re.compile(r"[A-Za-z0-9._:/-]{1,64}")
PAYLOAD_TYPES = ("anomaly", "crl")
FIELDS = {"message_id", "origin", "payload", "timestamp", "expiry", "signature", "chain"}


@dataclass(slots=True)
class GossipMessage:
    """A message; treat it as immutable (it is not frozen only because building frozen
    dataclasses costs several microseconds on the gossip hot path)."""

    message_id: str
    origin: str
    payload: dict[str, Any]
    timestamp: int
    expiry: int
    signature: bytes
    chain: tuple[bytes, ...] = ()  # DER certificates, the origin's first

    @property
    def kind(self) -> str:
        return str(self.payload["type"])

    def signed_bytes(self) -> bytes:
        return signing_input(
            self.message_id, self.origin, self.payload, self.timestamp, self.expiry
        )

    def checked_signed_bytes(self) -> bytes:
        """:meth:`signed_bytes`, once the id is shown to be derived from the content
        (raises :class:`BadMessageId`); one canonical encoding serves both."""
        content = _content(self.origin, self.payload, self.timestamp, self.expiry)
        if _id_of(content) != self.message_id:
            raise BadMessageId(
                f"message_id {self.message_id!r} is not derived from the origin and content"
            )
        return _signed(self.message_id, content)

    def to_json(self, *, with_chain: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "message_id": self.message_id,
            "origin": self.origin,
            "payload": self.payload,
            "timestamp": self.timestamp,
            "expiry": self.expiry,
            "signature": base64.b64encode(self.signature).decode(),
        }
        if with_chain and self.chain:
            data["chain"] = [base64.b64encode(der).decode() for der in self.chain]
        return data

    def encode(self, *, with_chain: bool = True) -> bytes:
        return compact_json(self.to_json(with_chain=with_chain))


def signing_input(
    message_id: str, origin: str, payload: dict[str, Any], timestamp: int, expiry: int
) -> bytes:
    return SIGNING_LABEL + canonical_json([message_id, origin, payload, timestamp, expiry])


def derive_message_id(origin: str, payload: dict[str, Any], timestamp: int, expiry: int) -> str:
    """The id of the message with this content: SHA-256 (hex) of ``ID_LABEL`` and the
    canonical JSON of ``[origin, payload, timestamp, expiry]``."""
    return _id_of(_content(origin, payload, timestamp, expiry))


def _content(origin: str, payload: dict[str, Any], timestamp: int, expiry: int) -> bytes:
    return canonical_json([origin, payload, timestamp, expiry])


def _id_of(content: bytes) -> str:
    return hashlib.sha256(ID_LABEL + content).hexdigest()


def _signed(message_id: str, content: bytes) -> bytes:
    """``signing_input`` from the content's encoding: an id is ``[A-Za-z0-9._:-]``, which
    JSON never escapes, so ``["id",`` and the content after its ``[`` are the canonical
    JSON of ``[message_id, origin, payload, timestamp, expiry]`` byte for byte."""
    return b"".join((SIGNING_LABEL, b'["', message_id.encode(), b'",', content[1:]))


def sign_message(
    signer: Signer,
    origin: str,
    payload: dict[str, Any],
    *,
    now_ms: int,
    ttl_ms: int = DEFAULT_TTL_MS,
    chain: tuple[bytes, ...] = (),
    message_id: str | None = None,
) -> GossipMessage:
    """Sign a new message from ``origin``; ``payload`` is checked first, so a node never
    signs what its peers would refuse. Its id is derived from its content; ``message_id``
    overrides that only to build a message receivers refuse (tests)."""
    if not 0 < ttl_ms <= MAX_TTL_MS:
        raise ValueError(f"ttl must be in 1..{MAX_TTL_MS} ms")
    check_payload(payload)
    if message_id is not None and not MESSAGE_ID.fullmatch(message_id):
        raise ValueError(f"message_id {message_id!r} is not 1-128 of [A-Za-z0-9._:-]")
    expiry = now_ms + ttl_ms
    try:
        content = _content(origin, payload, now_ms, expiry)
    except (ValueError, UnicodeEncodeError) as exc:  # NaN, Infinity, a lone surrogate
        raise MalformedMessage(f"the payload is not valid JSON text: {exc}") from None
    if message_id is None:
        message_id = _id_of(content)
    signed = _signed(message_id, content)
    if len(signed) > MAX_MESSAGE - MAX_MESSAGE_OVERHEAD:
        raise MalformedMessage(f"the payload is too large for a {MAX_MESSAGE}-byte message")
    signature = signer.sign(signed)
    return GossipMessage(message_id, origin, payload, now_ms, expiry, signature, chain)


def decode_message(data: bytes | bytearray | memoryview) -> GossipMessage:
    """Parse a message from JSON text; raise :class:`MalformedMessage` (or an
    :class:`~trustmesh.errors.OversizeError`) for anything that breaks the format."""
    return message_from_json(strict_loads(data, max_size=MAX_MESSAGE, error=MalformedMessage))


def message_from_json(data: Any) -> GossipMessage:
    if not isinstance(data, dict):
        raise MalformedMessage("a gossip message is a JSON object")
    if not data.keys() <= FIELDS:
        raise MalformedMessage(f"unknown fields {sorted(data.keys() - FIELDS)}")
    message_id = data.get("message_id")
    if not isinstance(message_id, str) or not MESSAGE_ID.fullmatch(message_id):
        raise MalformedMessage("message_id must be 1-128 of [A-Za-z0-9._:-]")
    origin = data.get("origin")
    if not isinstance(origin, str) or not _is_node_id(origin):
        raise MalformedMessage("origin must be a node_id (a DNS name)")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise MalformedMessage("payload must be an object")
    check_payload(payload)
    timestamp = _millis(data, "timestamp")
    expiry = _millis(data, "expiry")
    signature = decode_base64(data.get("signature"), "signature", 512)
    chain_field = data.get("chain", [])
    if not isinstance(chain_field, list) or len(chain_field) > MAX_CHAIN:
        raise MalformedMessage(f"chain must be a list of at most {MAX_CHAIN} certificates")
    chain = tuple(decode_base64(c, "chain entry", MAX_CERT) for c in chain_field)
    return GossipMessage(message_id, origin, payload, timestamp, expiry, signature, chain)


def check_payload(payload: dict[str, Any]) -> None:
    """Refuse payloads of unknown type or that break their type's rules."""
    kind = payload.get("type")
    if kind == "anomaly":
        _check_anomaly(payload)
    elif kind == "crl":
        if payload.keys() != {"type", "crl"} or not isinstance(payload["crl"], str):
            raise MalformedMessage('a crl payload is {"type": "crl", "crl": base64 DER}')
        decode_base64(payload["crl"], "crl", MAX_MESSAGE)
    else:
        raise MalformedMessage(f"payload type must be one of {list(PAYLOAD_TYPES)}")


def anomaly_payload(
    hash_hex: str, kind: str, risk: float, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    payload = {"type": "anomaly", "hash": hash_hex, "kind": kind, "risk": risk, "meta": meta or {}}
    check_payload(payload)
    return payload


def crl_payload(der: bytes) -> dict[str, Any]:
    return {"type": "crl", "crl": base64.b64encode(der).decode()}


def crl_from_payload(payload: dict[str, Any]) -> bytes:
    return decode_base64(payload["crl"], "crl", MAX_MESSAGE)


_ANOMALY_FIELDS = frozenset({"type", "hash", "kind", "risk", "meta"})
_ANOMALY_REQUIRED = frozenset({"hash", "kind", "risk"})


def _check_anomaly(payload: dict[str, Any]) -> None:
    keys = payload.keys()
    if not keys <= _ANOMALY_FIELDS or not keys >= _ANOMALY_REQUIRED:
        raise MalformedMessage("an anomaly has hash, kind, risk and optional meta, no more")
    digest, kind, risk = payload["hash"], payload["kind"], payload["risk"]
    if not isinstance(digest, str) or not HEX.fullmatch(digest):
        raise MalformedMessage("anomaly hash must be 16-128 lowercase hex digits")
    if not isinstance(kind, str) or not KIND.fullmatch(kind):
        raise MalformedMessage("anomaly kind must be 1-64 of [A-Za-z0-9._:/-]")
    if isinstance(risk, bool) or not isinstance(risk, (int, float)) or not 0 <= risk <= 1:
        raise MalformedMessage("anomaly risk must be a number in 0..1")
    meta = payload.get("meta", {})
    if not isinstance(meta, dict) or len(meta) > MAX_META_FIELDS:
        raise MalformedMessage(f"anomaly meta must be an object of at most {MAX_META_FIELDS}")
    # Bounded field by field (no encoding on the hot path): a few words, never a log.
    for key, value in meta.items():
        if len(key) > MAX_META_KEY:
            raise MalformedMessage(f"anomaly meta keys are at most {MAX_META_KEY} characters")
        if isinstance(value, str):
            if len(value) > MAX_META_TEXT:
                raise MalformedMessage(f"anomaly meta text is at most {MAX_META_TEXT} characters")
            if not value.isascii() and not _encodable(value):
                raise MalformedMessage(f"anomaly meta {key!r} holds a lone surrogate")
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
                raise MalformedMessage("anomaly meta integers must fit in 53 bits")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise MalformedMessage(f"anomaly meta {key!r} must be finite: JSON has no NaN")
        elif not isinstance(value, bool) and value is not None:
            raise MalformedMessage(f"anomaly meta {key!r} must be a scalar: no nested data")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _is_node_id(text: str) -> bool:
    """Cached: a mesh has few origins, and each sends many messages."""
    return NODE_ID.fullmatch(text) is not None


def _millis(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 53:
        raise MalformedMessage(f"{key} must be Unix milliseconds (an integer)")
    return value


def decode_base64(text: Any, what: str, limit: int) -> bytes:
    """A base64 member of 1 to ``limit`` bytes, strictly decoded (``what`` names it in
    the error)."""
    if not isinstance(text, str) or len(text) > (limit + 2) // 3 * 4:
        raise MalformedMessage(f"{what} must be base64 of at most {limit} bytes")
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise MalformedMessage(f"{what} is not base64") from None
    if not 0 < len(raw) <= limit:
        raise MalformedMessage(f"{what} must be 1 to {limit} bytes")
    return raw
