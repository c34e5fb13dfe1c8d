"""PSEC frames, byte-exact per the draft, parsed strictly (docs/protocols/psec.md §2).

    Propose (0): uvarint-delimited sender peer ID (multihash), u8 N, N uvarint-delimited
                 UTF-8 scheme names in priority order, then optionally a
                 uvarint-delimited initiation packet for the first-listed scheme
    Accept  (1): one uvarint-delimited scheme name
    Reject (255): empty body

The draft leaves open what this module fixes (psec.md §3): at most ``MAX_SCHEMES``
names, each 1 to ``MAX_NAME`` bytes of ``[A-Za-z0-9/._-]`` starting with ``/``, no name
twice, at least one name, an initiation packet that is not empty, and a whole frame of
at most the path's datagram payload (``max_size``, 1,200 bytes by default). Every
malformed, truncated or oversized frame raises a :class:`PsecFrameError` (a
:class:`DecodeError`), never an IndexError.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from trustmesh.errors import DecodeError, OversizeError, TrailingDataError, TruncatedError
from trustmesh.wire.peerid import PeerId
from trustmesh.wire.varint import decode_uvarint, encode_uvarint

MAX_SCHEMES = 16
MAX_NAME = 64
MAX_PEER_ID = 64  # bytes of a multihash: identity keys of up to 42 bytes, or SHA-256
DEFAULT_MAX_FRAME = 1200  # a UDP payload every IPv6 path carries (1280 - 40 - 8, rounded)
SCHEME_NAME = re.compile(rb"/[A-Za-z0-9/._-]{0,63}")


class FrameType(enum.IntEnum):
    PROPOSE = 0
    ACCEPT = 1
    REJECT = 255


PSEC_TYPES = frozenset({0, 1, 2, 3, 255})  # 2 and 3 are reserved (the driver routes them)


class PsecFrameError(DecodeError):
    """A PSEC frame that is malformed, truncated, oversized or of an unknown type."""


@dataclass(frozen=True, slots=True)
class Propose:
    peer_id: PeerId
    schemes: tuple[str, ...]
    initiation: bytes | None = None  # the first packet of schemes[0], if the sender sent one

    def encode(self) -> bytes:
        check_schemes(self.schemes)
        body = bytearray((FrameType.PROPOSE,))
        body += _lp(self.peer_id.to_bytes())
        body.append(len(self.schemes))
        for name in self.schemes:
            body += _lp(name.encode("ascii"))
        if self.initiation is not None:
            if not self.initiation:
                raise ValueError("an initiation packet is not empty")
            body += _lp(self.initiation)
        return bytes(body)

    def without_initiation(self) -> Propose:
        """What the negotiation itself says (the transcript covers this)."""
        return Propose(self.peer_id, self.schemes)


@dataclass(frozen=True, slots=True)
class Accept:
    scheme: str

    def encode(self) -> bytes:
        check_schemes((self.scheme,))
        return bytes((FrameType.ACCEPT,)) + _lp(self.scheme.encode("ascii"))


@dataclass(frozen=True, slots=True)
class Reject:
    def encode(self) -> bytes:
        return bytes((FrameType.REJECT,))


Frame = Propose | Accept | Reject


def is_psec(datagram: bytes | bytearray | memoryview) -> bool:
    """Whether a datagram is a PSEC frame by its first byte (PSEC 0-3 and 255; DTLS
    records start at 20-63, QUIC packets at 64-127 and 192-255). A Reject is the one
    byte 255 alone: a longer datagram starting with 255 is a QUIC long-header packet
    (a Retry or a Version Negotiation may start so)."""
    if not datagram:
        return False
    first = datagram[0]
    return first in PSEC_TYPES and (first != FrameType.REJECT or len(datagram) == 1)


def decode_frame(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_FRAME
) -> Frame:
    if len(data) > max_size:
        raise OversizeError(f"a PSEC frame of {len(data)} bytes is over {max_size}")
    if not data:
        raise PsecFrameError("an empty datagram is not a PSEC frame")
    raw = bytes(data)
    kind = raw[0]
    try:
        if kind == FrameType.PROPOSE:
            return _propose(raw)
        if kind == FrameType.ACCEPT:
            name, end = _name(raw, 1)
            _end(raw, end)
            return Accept(name)
        if kind == FrameType.REJECT:
            _end(raw, 1)
            return Reject()
    except (TruncatedError, OversizeError, TrailingDataError) as exc:
        raise PsecFrameError(str(exc), offset=exc.offset) from None
    except DecodeError as exc:
        if isinstance(exc, PsecFrameError):
            raise
        raise PsecFrameError(f"bad frame: {exc}", offset=exc.offset) from None
    raise PsecFrameError(f"unknown PSEC frame type {kind}", offset=0)


def check_schemes(schemes: Sequence[str]) -> None:
    """What a list of scheme names must be (raises ValueError): 1 to ``MAX_SCHEMES``
    distinct names, each matching ``SCHEME_NAME``."""
    if not 1 <= len(schemes) <= MAX_SCHEMES:
        raise ValueError(f"propose 1 to {MAX_SCHEMES} schemes, not {len(schemes)}")
    if len(set(schemes)) != len(schemes):
        raise ValueError("a scheme is listed twice")
    for name in schemes:
        if not name.isascii() or not SCHEME_NAME.fullmatch(name.encode("ascii")):
            raise ValueError(f"{name!r} is not a scheme name (/[A-Za-z0-9/._-], 1-64 bytes)")


def _propose(raw: bytes) -> Propose:
    peer_bytes, pos = _field(raw, 1, MAX_PEER_ID, "peer ID")
    peer_id = PeerId(peer_bytes)
    if pos >= len(raw):
        raise TruncatedError("the proposal ends before its scheme count", offset=pos)
    count = raw[pos]
    pos += 1
    if not 1 <= count <= MAX_SCHEMES:
        raise PsecFrameError(
            f"a proposal lists 1 to {MAX_SCHEMES} schemes, not {count}", offset=pos - 1
        )
    names = []
    for _ in range(count):
        name, pos = _name(raw, pos)
        names.append(name)
    if len(set(names)) != len(names):
        raise PsecFrameError("a proposal lists a scheme twice")
    initiation = None
    if pos < len(raw):
        initiation, pos = _field(raw, pos, len(raw), "initiation packet")
        if not initiation:
            raise PsecFrameError("an initiation packet is empty", offset=pos)
        _end(raw, pos)
    return Propose(peer_id, tuple(names), initiation)


def _name(raw: bytes, pos: int) -> tuple[str, int]:
    value, end = _field(raw, pos, MAX_NAME, "scheme name")
    if not SCHEME_NAME.fullmatch(value):
        raise PsecFrameError("a scheme name is /[A-Za-z0-9/._-], 1-64 bytes", offset=pos)
    return value.decode("ascii"), end


def _field(raw: bytes, pos: int, limit: int, what: str) -> tuple[bytes, int]:
    size, start = decode_uvarint(raw, pos)
    if size > limit:
        raise OversizeError(f"a {what} of {size} bytes is over {limit}", offset=pos)
    end = start + size
    if end > len(raw):
        raise TruncatedError(f"the {what} is cut short", offset=len(raw))
    return raw[start:end], end


def _end(raw: bytes, pos: int) -> None:
    if pos != len(raw):
        raise TrailingDataError(f"{len(raw) - pos} bytes after the frame", offset=pos)


def _lp(data: bytes) -> bytes:
    return encode_uvarint(len(data)) + data
