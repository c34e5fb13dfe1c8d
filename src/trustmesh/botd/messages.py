"""BOTD #2 frame payloads: the generated protobuf ``Frame`` plus strict field checks.

Protobuf decodes leniently (missing fields read as empty), so every field a protocol
step relies on is checked here, and every failure is a typed :class:`DecodeError`.
"""

from __future__ import annotations

import functools

from google.protobuf.message import DecodeError as ProtobufDecodeError

from trustmesh.crypto.keys import KeyKind, PublicKey, Secp256k1PublicKey
from trustmesh.errors import DecodeError, InvalidKeyError, UnsupportedError
from trustmesh.wire.pb.botd_pb2 import Ack, Close, Finished, Frame, Init, Ping, Pong

__all__ = [
    "FINISHED_PREFIX",
    "FINISHED_SIZE",
    "MAX_HANDSHAKE_FRAME",
    "MAX_ID_LENGTH",
    "PUBKEY_SIZE",
    "SIGNATURE_SIZE",
    "Ack",
    "Close",
    "Finished",
    "Frame",
    "Init",
    "Ping",
    "Pong",
    "check_id",
    "close_reason",
    "parse_frame",
    "parse_pubkey",
]

PUBKEY_SIZE = 33  # compressed SEC1
SIGNATURE_SIZE = 64  # compact r || s
MAX_ID_LENGTH = 64
MAX_CLOSE_REASON = 256  # bytes of UTF-8
# Control records (Finished, Ping, Pong, Close) fit in this whatever max_message is.
MAX_CONTROL_RECORD = 512
# Init: 5 fields, about 200 bytes. A peer cannot make us buffer more than this before
# it has proved who it is.
MAX_HANDSHAKE_FRAME = 512
# Frame{finished: Finished{signature}} for a compact signature is these bytes, then the
# 64 signature bytes (taken from protobuf's own encoding): a Finished is written and
# recognised without building or parsing the message; anything else goes to protobuf.
FINISHED_PREFIX = Frame(finished=Finished(signature=bytes(SIGNATURE_SIZE))).SerializeToString()[
    :-SIGNATURE_SIZE
]
FINISHED_SIZE = len(FINISHED_PREFIX) + SIGNATURE_SIZE


def parse_frame(payload: bytes) -> tuple[str, Frame]:
    """Decode one frame payload; return the name of its body and the frame."""
    try:
        frame = Frame.FromString(payload)
    except ProtobufDecodeError as exc:
        raise DecodeError(f"malformed frame: {exc}") from None
    body = frame.WhichOneof("body")
    if body is None:
        raise UnsupportedError("frame carries no body this version knows")
    return body, frame


def close_reason(text: str) -> str:
    """``text`` cut to at most MAX_CLOSE_REASON bytes of UTF-8, on a character boundary."""
    return text.encode()[:MAX_CLOSE_REASON].decode("utf-8", errors="ignore")


def check_id(value: str, what: str) -> str:
    """A message id: 1 to 64 characters (we send 32 hex digits)."""
    if not 0 < len(value) <= MAX_ID_LENGTH:
        raise DecodeError(f"{what} must be 1..{MAX_ID_LENGTH} characters, got {len(value)}")
    return value


@functools.lru_cache(maxsize=1024)
def parse_pubkey(data: bytes, what: str) -> Secp256k1PublicKey:
    """A secp256k1 public key in its 33-byte compressed form, on the curve.

    The peers that come back are parsed once (a key object is immutable); a refused
    key raises, which is never cached, and a flood of new keys only turns the bounded
    cache over."""
    if len(data) != PUBKEY_SIZE:
        raise InvalidKeyError(f"{what} must be {PUBKEY_SIZE} bytes (compressed), got {len(data)}")
    try:
        key = PublicKey.from_bytes(KeyKind.SECP256K1, data)
    except InvalidKeyError as exc:
        raise InvalidKeyError(f"{what}: {exc}") from None
    assert isinstance(key, Secp256k1PublicKey)
    return key
