"""CRLs over links whatever their size: pieces with flow control (mesh-link.md section 3.1).

A CRL whose DER fits in one link frame travels as one CRL frame, to any peer. A bigger
one (about 21,000 revoked serials make 1 MiB) is cut into CRL_PART frames, sent only to
a peer whose HELLO says ``"crl_parts": 1``:

    CRL_PART body = n (1 byte, 1..20) || number (n bytes, big-endian)
                    || total (4 bytes, big-endian) || offset (4 bytes, big-endian) || data
    CRL_ACK body  = n (1 byte, 1..20) || number (n bytes, big-endian)
                    || received (4 bytes, big-endian)

The receiver answers each piece with CRL_ACK, the bytes of that CRL it now holds. The
sender keeps at most :data:`CRL_WINDOW` bytes unacknowledged, so a CRL of megabytes never
fills a link's write buffer. A receiver that does not want the CRL (it holds that number
or a newer one, or its reassembly timed out) acknowledges ``total`` at once, and the
sender stops. A receiver holds one reassembly per link, at most :data:`MAX_CRL` bytes,
for at most ``timeout`` seconds; a new CRL (a piece at offset 0 with another number)
replaces an unfinished one. The whole DER is then checked like any CRL (the CA's
signature, the number), by the node, not here.

This is a sans-IO helper of :class:`trustmesh.mesh.link.MeshLink`: it takes bodies and
``now`` and returns bodies; the link frames them.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.mesh.errors import MalformedMessage
from trustmesh.mesh.trust import MAX_CRL

CRL_PIECE = 256 * 1024  # data bytes per CRL_PART we send (a receiver takes up to a frame)
CRL_WINDOW = 4 * CRL_PIECE  # unacknowledged bytes a sender allows itself
DEFAULT_CRL_TIMEOUT = 120.0  # seconds from a CRL's first piece to its last
MAX_NUMBER_BYTES = 20  # RFC 5280 section 5.2.3: a CRL number has at most 20 octets
CRL_PARTS_VERSION = 1  # HELLO ``crl_parts``: the peer takes CRL_PART and CRL_ACK


def encode_number(number: int) -> bytes:
    if not 0 <= number < 1 << (8 * MAX_NUMBER_BYTES):
        raise ValueError("a CRL number is 0 .. 2^160 - 1")
    size = max(1, (number.bit_length() + 7) // 8)
    return bytes((size,)) + number.to_bytes(size, "big")


def _decode_number(body: bytes | memoryview, what: str) -> tuple[int, int]:
    """The CRL number at the start of ``body`` and where the rest starts."""
    if not body:
        raise MalformedMessage(f"{what}: empty body")
    size = body[0]
    if not 1 <= size <= MAX_NUMBER_BYTES or len(body) < 1 + size:
        raise MalformedMessage(f"{what}: a CRL number of 1 to {MAX_NUMBER_BYTES} bytes")
    return int.from_bytes(body[1 : 1 + size], "big"), 1 + size


def encode_part(number: int, total: int, offset: int, data: bytes | memoryview) -> bytes:
    return (
        encode_number(number) + total.to_bytes(4, "big") + offset.to_bytes(4, "big") + bytes(data)
    )


def decode_part(body: bytes) -> tuple[int, int, int, memoryview]:
    """``(number, total, offset, data)`` of a CRL_PART body, or MalformedMessage."""
    view = memoryview(body)
    number, at = _decode_number(view, "CRL_PART")
    if len(view) < at + 8:
        raise MalformedMessage("CRL_PART: truncated header")
    total = int.from_bytes(view[at : at + 4], "big")
    offset = int.from_bytes(view[at + 4 : at + 8], "big")
    data = view[at + 8 :]
    if not 0 < total <= MAX_CRL:
        raise MalformedMessage(f"CRL_PART: a CRL of {total} bytes (1 to {MAX_CRL})")
    if not data or offset + len(data) > total:
        raise MalformedMessage("CRL_PART: the piece is empty or runs past the CRL's end")
    return number, total, offset, data


def encode_ack(number: int, received: int) -> bytes:
    return encode_number(number) + received.to_bytes(4, "big")


def decode_ack(body: bytes) -> tuple[int, int]:
    """``(number, received)`` of a CRL_ACK body, or MalformedMessage."""
    number, at = _decode_number(body, "CRL_ACK")
    if len(body) != at + 4:
        raise MalformedMessage("CRL_ACK: a CRL number and 4 bytes")
    return number, int.from_bytes(body[at:], "big")


@dataclass(slots=True)
class _Outgoing:
    der: bytes
    number: int
    sent: int = 0
    acked: int = 0


@dataclass(slots=True)
class _Incoming:
    number: int
    total: int
    deadline: float
    buffer: bytearray


class CrlParts:
    """The CRL transfers of one link: at most one going out and one coming in.

    ``peer_number`` is the newest CRL number the peer is known to hold: from its HELLO,
    then raised by every CRL we finish sending it and every CRL it sends or declines.
    """

    def __init__(self, *, timeout: float = DEFAULT_CRL_TIMEOUT) -> None:
        self.timeout = timeout
        self.peer_number = -1
        self._out: _Outgoing | None = None
        self._in: _Incoming | None = None
        self._declined: int | None = None  # pieces of this CRL are dropped unread

    # --- sending ----------------------------------------------------------------------

    @property
    def sending(self) -> int | None:
        """The number of the CRL being sent, if one is."""
        return self._out.number if self._out is not None else None

    def send(self, der: bytes, number: int) -> list[bytes]:
        """Start sending ``der`` (replacing an unfinished CRL); the first pieces' bodies."""
        if not 0 < len(der) <= MAX_CRL:
            raise ValueError(f"a CRL of {len(der)} bytes cannot be sent (at most {MAX_CRL})")
        self._out = _Outgoing(der, number)
        return self._pump()

    def on_ack(self, body: bytes) -> list[bytes]:
        """A CRL_ACK: the next pieces' bodies (none once the peer holds the CRL)."""
        number, received = decode_ack(body)
        out = self._out
        if out is None or number != out.number:
            return []  # about a CRL we replaced (or finished): nothing to do
        total = len(out.der)
        if received >= total:
            if received > total:
                raise MalformedMessage("CRL_ACK: more bytes than the CRL has")
            self._out = None  # whole, or declined: either way the peer needs no more
            self.peer_number = max(self.peer_number, number)
            return []
        if received > out.sent:
            raise MalformedMessage("CRL_ACK: bytes that were never sent")
        out.acked = max(out.acked, received)
        return self._pump()

    def _pump(self) -> list[bytes]:
        out = self._out
        assert out is not None
        total = len(out.der)
        bodies = []
        view = memoryview(out.der)
        while out.sent < total and out.sent - out.acked < CRL_WINDOW:
            piece = view[out.sent : out.sent + CRL_PIECE]
            bodies.append(encode_part(out.number, total, out.sent, piece))
            out.sent += len(piece)
        return bodies

    # --- receiving --------------------------------------------------------------------

    @property
    def receiving(self) -> int:
        """Bytes held of a CRL still coming in."""
        return len(self._in.buffer) if self._in is not None else 0

    @property
    def deadline(self) -> float | None:
        return self._in.deadline if self._in is not None else None

    def on_part(self, body: bytes, now: float, held: int) -> tuple[list[bytes], bytes | None]:
        """A CRL_PART, with ``held`` the number of the CRL we hold: the CRL_ACK bodies to
        send, and the whole DER once its last piece is in."""
        number, total, offset, data = decode_part(body)
        current = self._in
        if current is None or current.number != number:
            if offset != 0:
                if number == self._declined:
                    return [], None  # on its way before our CRL_ACK said no
                raise MalformedMessage(f"CRL_PART at offset {offset} of a CRL not begun")
            self.peer_number = max(self.peer_number, number)
            if number <= held:
                return self._decline(number, total), None
            # One CRL at a time: a newer one replaces what was left of the last.
            current = self._in = _Incoming(number, total, now + self.timeout, bytearray())
            self._declined = None
        if total != current.total or offset != len(current.buffer):
            raise MalformedMessage(
                f"CRL_PART at offset {offset} of {total} bytes, expected offset "
                f"{len(current.buffer)} of {current.total}"
            )
        current.buffer += data
        received = len(current.buffer)
        acks = [encode_ack(number, received)]
        if received < total:
            return acks, None
        self._in = None
        return acks, bytes(current.buffer)

    def on_timer(self, now: float) -> list[bytes]:
        """Drop a reassembly past its deadline and tell the sender to stop."""
        current = self._in
        if current is None or now < current.deadline:
            return []
        self._in = None
        return self._decline(current.number, current.total)

    def _decline(self, number: int, total: int) -> list[bytes]:
        self._declined = number
        return [encode_ack(number, total)]
