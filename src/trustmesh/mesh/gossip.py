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
import json
import json.scanner
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trustmesh.errors import DecodeError
from trustmesh.keystore.signer import Signer
from trustmesh.mesh.errors import BadMessageId, MalformedMessage
from trustmesh.wire.jsonwire import _CANONICAL, canonical_json, compact_json, strict_loads

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
# The same rules, matched faster (hex: an even length of 16 to 128 digits, checked apart).
_message_id_match = MESSAGE_ID.fullmatch
_hex_match = re.compile(r"[0-9a-f]{16,128}").fullmatch
_kind_match = KIND.fullmatch
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
    # Set by message_from_json: every field passed the wire rules, so the canonical JSON
    # of an anomaly's content can be written directly. Not copied by dataclasses.replace.
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

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
        payload = self.payload
        if self._checked and payload["type"] == "anomaly":
            content = _anomaly_content(self.origin, payload, self.timestamp, self.expiry)
        else:
            content = _content(self.origin, payload, self.timestamp, self.expiry)
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


def _anomaly_content(origin: str, payload: dict[str, Any], timestamp: int, expiry: int) -> bytes:
    """``_content`` of an anomaly that passed :func:`message_from_json`, written directly
    (the JSON encoder's cost is mostly per value): the origin (a node_id), hash (hex) and
    kind (``[A-Za-z0-9._:/-]``) need no escaping, keys go in sorted order, numbers as the
    encoder writes them (``int.__repr__``, ``float.__repr__``), and the meta object
    through the canonical encoder. Any other type falls back to :func:`_content`."""
    risk = payload["risk"]
    if not (
        (type(risk) is float or type(risk) is int)
        and type(timestamp) is int
        and type(expiry) is int
    ):
        return _content(origin, payload, timestamp, expiry)
    meta = payload.get("meta")
    if meta is None:  # absent (a null meta is refused)
        meta_member = ""
    elif meta:
        meta_member = f'"meta":{_canonical_text(meta)},'
    else:
        meta_member = '"meta":{},'
    return (
        f'["{origin}",{{"hash":"{payload["hash"]}","kind":"{payload["kind"]}",{meta_member}'
        f'"risk":{risk!r},"type":"anomaly"}},{timestamp},{expiry}]'
    ).encode()


# canonical_json's own C encoder, which gives text (canonical_json encodes it to bytes).
_canonical_text: Callable[[Any], str] = _CANONICAL


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
    :class:`~trustmesh.errors.OversizeError`) for anything that breaks the format.

    Two faster paths come first, each accepting exactly what the strict parser accepts
    and giving the same message; what they do not accept goes through the strict parser,
    which then gives its own error. Both take only text without a backslash (no escapes:
    the usual case, as base64, hex and ids need none):

    - :func:`_decode_anomaly`: an anomaly in the layout :meth:`GossipMessage.encode`
      writes (compact, fields in its order), matched by one regular expression;
    - :func:`_decode_plain`: any other layout, parsed by the C JSON scanner alone."""
    if type(data) is bytes and b"\\" not in data and len(data) <= MAX_MESSAGE:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            text = None
        if text is not None:
            match = _ANOMALY_WIRE(text)
            try:
                message = _decode_anomaly(match) if match is not None else _decode_plain(data, text)
            except Exception:
                message = None
            if message is not None:
                return message
    return message_from_json(strict_loads(data, max_size=MAX_MESSAGE, error=MalformedMessage))


# An anomaly as GossipMessage.encode writes it. Each string group holds none of '"' or
# '\\', so the groups are the JSON strings' contents: the id's, hash's and kind's are
# exactly the characters their fields allow, the origin's, signature's and chain's are
# checked after (node_id form, strict base64). The meta object holds no bracket, so it
# ends at the first "}" (its text is parsed apart).
_ANOMALY_WIRE = re.compile(
    r'\{"message_id":"([A-Za-z0-9._:-]{1,128})","origin":"([A-Za-z0-9.-]{1,253})",'
    r'"payload":\{"type":"anomaly","hash":"([0-9a-f]{16,128})",'
    r'"kind":"([A-Za-z0-9._:/-]{1,64})",'
    r'"risk":(-?(?:0|[1-9][0-9]{0,15})(\.[0-9]{1,32})?([eE][-+]?[0-9]{1,4})?)'
    r'(?:,"meta":(\{[^\[\]{}]*\}))?\},'
    r'"timestamp":(0|[1-9][0-9]{0,15}),"expiry":(0|[1-9][0-9]{0,15}),'
    r'"signature":"([A-Za-z0-9+/=]+)"'
    r'(?:,"chain":\[("[^"]+"(?:,"[^"]+"){0,3})\])?\}'
).fullmatch


def _decode_anomaly(match: re.Match[str]) -> GossipMessage | None:
    """The message :data:`_ANOMALY_WIRE` matched, checked by the rules
    :func:`message_from_json` applies; None if one fails (the strict parser then says
    which). The expression fixes the keys (so none is repeated but in meta), their order
    and the strings' characters; what it leaves is checked here: the node_id's form, the
    hash's even length, the numbers' ranges (parsed as the JSON scanner does: ``int``
    without a fraction or exponent, else ``float``), the base64, and the meta object,
    parsed by the scanner, checked field by field and for repeated keys (as
    :func:`_decode_plain` does)."""
    (
        message_id,
        origin,
        digest,
        kind,
        risk_text,
        fraction,
        exponent,
        meta_text,
        timestamp_text,
        expiry_text,
        signature_text,
        chain_text,
    ) = match.groups()
    if not _is_node_id(origin) or len(digest) & 1:
        return None
    try:
        # The expression bounds every number's digits; a conversion error would still
        # only leave the verdict to the strict parser.
        risk: float = float(risk_text) if fraction or exponent else int(risk_text)
        timestamp, expiry = int(timestamp_text), int(expiry_text)
        if not (0 <= risk <= 1 and timestamp <= MAX_SAFE_INT and expiry <= MAX_SAFE_INT):
            return None
        if meta_text is None:
            payload: dict[str, Any] = {
                "type": "anomaly",
                "hash": digest,
                "kind": kind,
                "risk": risk,
            }
        else:
            if meta_text == "{}":
                meta: Any = {}
            else:
                meta, end = _SCAN_PLAIN(meta_text, 0)
                if end != len(meta_text) or len(meta) > MAX_META_FIELDS:
                    return None
                _check_meta(meta)
                colons = meta_text.count(":")
                if colons != len(meta):  # else no string holds a colon and no key repeats
                    for key, item in meta.items():
                        colons -= key.count(":")
                        if type(item) is str:
                            colons -= item.count(":")
                    if colons != len(meta):
                        return None  # a repeated key
            payload = {"type": "anomaly", "hash": digest, "kind": kind, "risk": risk, "meta": meta}
        # decode_base64(signature_text, "signature", 512), inline: its length was bounded
        # by nothing yet, its characters by the expression.
        if len(signature_text) > (512 + 2) // 3 * 4:
            return None
        signature = binascii.a2b_base64(signature_text, strict_mode=True)
        if not 0 < len(signature) <= 512:
            return None
        chain = () if chain_text is None else _chain_of(chain_text)
    except (ValueError, StopIteration, RecursionError, DecodeError):
        return None
    message = GossipMessage(message_id, origin, payload, timestamp, expiry, signature, chain)
    message._checked = True
    return message


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# The C scanner with no Python hooks: objects are built as dicts directly, floats by
# float(), NaN and Infinity refused. Duplicate keys and infinite floats are caught after
# the parse, in _decode_plain.
_PLAIN_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_SCAN_PLAIN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(_PLAIN_DECODER)  # type: ignore[arg-type]


def _decode_plain(data: bytes, text: str) -> GossipMessage | None:
    """:func:`decode_message` for text without a backslash (``data``, and ``text`` its
    UTF-8 decoding): the message, or None to
    leave the verdict (and its error) to the strict parser. It accepts exactly what the
    strict parser accepts, and the same value:

    - the UTF-8 decoding, the whitespace strip and the single value filling the text are
      the strict parser's; without a backslash there is no escape, so no lone surrogate;
    - nesting: the structure :func:`message_from_json` accepts is at most three deep, and
      deeper input ends in the C scanner's RecursionError (then the strict parser);
    - infinite floats: ``risk`` must lie in 0..1 and meta floats must be finite, and no
      other float is accepted anywhere;
    - duplicate keys: in valid JSON each name-separator ``:`` outside strings belongs to
      one member, so the text has ``count(b":") - (colons inside strings)`` members. A
      duplicate drops at least one member (and maybe a whole value with its strings) from
      the parsed value, so the members and string colons found in the value fall short of
      the text's count. Only ``message_id``, the anomaly's ``kind`` and its meta keys and
      texts may hold a colon: every other string accepted is a fixed name, a node_id,
      hex or strict base64."""
    try:
        text = text.strip(" \t\n\r")
        value, end = _SCAN_PLAIN(text, 0)
        if end != len(text):
            return None
        message = message_from_json(value)
    except (ValueError, StopIteration, RecursionError, DecodeError):
        return None
    payload = message.payload
    members = len(value) + len(payload)
    colons = message.message_id.count(":")
    if payload["type"] == "anomaly":
        colons += payload["kind"].count(":")
        meta = payload.get("meta")
        if meta:
            members += len(meta)
            for key, item in meta.items():
                colons += key.count(":")
                if type(item) is str:
                    colons += item.count(":")
    if data.count(b":") != members + colons:
        return None  # a duplicate key: the strict parser names it
    return message


def message_from_json(data: Any) -> GossipMessage:
    if not isinstance(data, dict):
        raise MalformedMessage("a gossip message is a JSON object")
    if not data.keys() <= FIELDS:
        raise MalformedMessage(f"unknown fields {sorted(data.keys() - FIELDS)}")
    get = data.get
    message_id = get("message_id")
    if not isinstance(message_id, str) or not _message_id_match(message_id):
        raise MalformedMessage("message_id must be 1-128 of [A-Za-z0-9._:-]")
    origin = get("origin")
    if not isinstance(origin, str) or not _is_node_id(origin):
        raise MalformedMessage("origin must be a node_id (a DNS name)")
    payload = get("payload")
    if not isinstance(payload, dict):
        raise MalformedMessage("payload must be an object")
    if payload.get("type") == "anomaly":
        _check_anomaly(payload)
    else:
        check_payload(payload)
    # Unix milliseconds; the plain int checked inline, anything else by _millis.
    timestamp = get("timestamp")
    if type(timestamp) is not int or not 0 <= timestamp <= MAX_SAFE_INT:
        timestamp = _millis(data, "timestamp")
    expiry = get("expiry")
    if type(expiry) is not int or not 0 <= expiry <= MAX_SAFE_INT:
        expiry = _millis(data, "expiry")
    signature = decode_base64(get("signature"), "signature", 512)
    chain_field = get("chain")
    chain: tuple[bytes, ...] = ()
    if chain_field is None:
        if "chain" in data:
            raise MalformedMessage(f"chain must be a list of at most {MAX_CHAIN} certificates")
    elif not isinstance(chain_field, list) or len(chain_field) > MAX_CHAIN:
        raise MalformedMessage(f"chain must be a list of at most {MAX_CHAIN} certificates")
    elif chain_field:
        chain = tuple(
            _certificate(c) if type(c) is str else decode_base64(c, "chain entry", MAX_CERT)
            for c in chain_field
        )
    message = GossipMessage(message_id, origin, payload, timestamp, expiry, signature, chain)
    message._checked = True
    return message


@functools.lru_cache(maxsize=128)
def _chain_of(text: str) -> tuple[bytes, ...]:
    """The DER chain of a chain array's contents as :data:`_ANOMALY_WIRE` matched them
    (``"b64","b64"``), decoded once per text, as :func:`_certificate` does each entry:
    one lookup for the whole chain. Bounded (128 entries; a chain of a leaf and its
    issuing CA is about 3 KB of text and DER)."""
    return tuple(map(_certificate, text[1:-1].split('","')))


@functools.lru_cache(maxsize=256)
def _certificate(text: str) -> bytes:
    """A chain entry's DER, decoded once per text: a mesh has few origins and one
    issuing CA, and their chains come again and again. The same ``bytes`` object comes
    back each time, so its hash (the trust view's cache key) is computed once too.
    Bounded (256 entries of at most about 19 KB of text and DER); a text that fails is
    not cached."""
    return decode_base64(text, "chain entry", MAX_CERT)


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
    if not isinstance(digest, str) or not _hex_match(digest) or len(digest) & 1:
        raise MalformedMessage("anomaly hash must be 16-128 lowercase hex digits")
    if not isinstance(kind, str) or not _kind_match(kind):
        raise MalformedMessage("anomaly kind must be 1-64 of [A-Za-z0-9._:/-]")
    if isinstance(risk, bool) or not isinstance(risk, (int, float)) or not 0 <= risk <= 1:
        raise MalformedMessage("anomaly risk must be a number in 0..1")
    meta = payload.get("meta")
    if meta is None:
        if "meta" not in payload:
            return
    elif type(meta) is dict and not meta:
        return
    if not isinstance(meta, dict) or len(meta) > MAX_META_FIELDS:
        raise MalformedMessage(f"anomaly meta must be an object of at most {MAX_META_FIELDS}")
    _check_meta(meta)


def _check_meta(meta: dict[str, Any]) -> None:
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
