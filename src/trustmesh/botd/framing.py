"""BOTD #2 framing on the hot path: ``uvarint(len) || payload`` split without copies,
and the ``data`` frame built and recognised without the protobuf runtime.

:class:`FrameReader` splits a byte stream exactly as :class:`trustmesh.wire.frames.FrameDecoder`
does (same limits, same errors, checked against it by tests/botd/test_botd_framing.py), but
a frame that lies whole inside one input chunk comes back as a ``memoryview`` of that
chunk instead of a copy: the record layer decrypts straight from it. Only a frame split
across reads is gathered, into a buffer allocated once at its full size. The other way to
feed it, :meth:`FrameReader.get_buffer` and :meth:`FrameReader.buffer_updated` (what an
``asyncio.BufferedProtocol`` transport calls), reads into a buffer the reader keeps, so
that a frame split across reads is not copied either; that buffer is bounded and given
back when the connection is quiet.

``Frame{data}`` is the one message that carries bulk bytes. Its protobuf encoding is
fixed (field 6, wire type 2: the byte 0x32, the length as a minimal varint, the bytes),
so :func:`data_frame_header` builds it and :func:`data_frame_body` recognises it; any
other plaintext goes through the protobuf parser as before. Nothing on the wire changes.
"""

from __future__ import annotations

from trustmesh.errors import DecodeError, OversizeError, TruncatedError
from trustmesh.wire.varint import MAX_VARINT_BYTES, decode_uvarint, encode_uvarint

__all__ = [
    "DATA_TAG",
    "FrameReader",
    "Payload",
    "data_frame_body",
    "data_frame_header",
    "uvarint",
]

DATA_TAG = 0x32  # Frame.data: field 6, wire type 2 (length-delimited)
_ONE_BYTE = [bytes((b,)) for b in range(0x80)]
_DATA_ONE_BYTE = [bytes((DATA_TAG, b)) for b in range(0x80)]

Payload = bytes | bytearray | memoryview

MIN_READ = 16 * 1024  # the read buffer of a quiet connection
MAX_READ = 256 * 1024  # the most one read asks for (a frame in progress may need more)


def uvarint(value: int) -> bytes:
    """:func:`trustmesh.wire.varint.encode_uvarint`, quicker for the lengths of records."""
    if value < 0x80:
        return _ONE_BYTE[value] if value >= 0 else encode_uvarint(value)
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, (value >> 7) & 0x7F | 0x80, value >> 14))
    return encode_uvarint(value)


def data_frame_header(size: int) -> bytes:
    """The bytes protobuf puts before ``size`` bytes of ``Frame.data``."""
    if size < 0x80:
        return _DATA_ONE_BYTE[size]
    if size < 0x4000:
        return bytes((DATA_TAG, size & 0x7F | 0x80, size >> 7))
    return b"\x32" + uvarint(size)


def data_frame_body(plaintext: Payload) -> int:
    """Where ``Frame.data``'s bytes start when ``plaintext`` is exactly one data field
    (what we and every protobuf encoder send); ``-1`` for anything else, which the
    caller hands to the protobuf parser. Non-minimal length varints, which protobuf
    accepts, also take that slower road. Lengths of up to three varint bytes (under
    2 MiB: every message of the default limit) are read without a loop."""
    end = len(plaintext)
    if end < 2 or plaintext[0] != DATA_TAG:
        return -1
    first = plaintext[1]
    if first < 0x80:
        return 2 if end == 2 + first else -1
    if end < 3:
        return -1
    second = plaintext[2]
    if second < 0x80:  # a zero last byte is a padded varint: protobuf's to read
        return 3 if second and end == 3 + ((first & 0x7F) | second << 7) else -1
    if end < 4:
        return -1
    third = plaintext[3]
    if third < 0x80:
        size = (first & 0x7F) | (second & 0x7F) << 7 | third << 14
        return 4 if third and end == 4 + size else -1
    return _long_data_frame_body(plaintext, end)


def _long_data_frame_body(plaintext: Payload, end: int) -> int:
    """:func:`data_frame_body` for a length varint of four bytes or more."""
    value = 0
    shift = 0
    pos = 1
    while pos < end and pos <= MAX_VARINT_BYTES:
        byte = plaintext[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and pos > 2:  # a padded varint: leave it to protobuf
                return -1
            return pos if pos + value == end else -1
        shift += 7
    return -1


def _length_prefix(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The frame length whose varint starts at ``view[pos]``, and where its body starts.
    Minimal prefixes of up to three bytes (every record of a default channel) are read
    inline; the rest by :func:`decode_uvarint`, which raises :class:`TruncatedError`
    when ``view`` ends (at ``end``) inside the prefix."""
    first = view[pos]
    if first < 0x80:  # one byte: control records
        return first, pos + 1
    if pos + 1 < end and 0 < view[pos + 1] < 0x80:  # two bytes: up to 16 KiB
        return (first & 0x7F) | view[pos + 1] << 7, pos + 2
    if pos + 2 < end and view[pos + 1] >= 0x80 and 0 < view[pos + 2] < 0x80:  # up to 2 MiB
        return (first & 0x7F) | (view[pos + 1] & 0x7F) << 7 | view[pos + 2] << 14, pos + 3
    return decode_uvarint(view, pos)


class FrameReader:
    """Split a byte stream into frames of at most ``max_size`` bytes.

    :meth:`feed` returns every frame its input completes. A frame inside one chunk is a
    ``memoryview`` of the chunk (valid while the caller keeps the chunk unchanged: use
    it before returning, or copy it); a frame gathered across chunks is a ``bytearray``
    of its own. Errors are :class:`trustmesh.wire.frames.FrameDecoder`'s: the length
    prefix's varint errors and :class:`OversizeError` as soon as a prefix over the limit
    is read, each carrying the frames completed before it in ``frames``.
    """

    __slots__ = (
        "_body",
        "_buf",
        "_end",
        "_filled",
        "_frame_end",
        "_head",
        "_need",
        "_offered",
        "_read_size",
        "_start",
        "max_size",
    )

    def __init__(self, max_size: int) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self._head = b""  # a length prefix cut short by the end of a chunk
        self._need = -1  # the frame being gathered: its size, or -1 when there is none
        self._body = bytearray()
        self._filled = 0
        # The kept read buffer (get_buffer / buffer_updated): unparsed bytes are
        # _buf[_start:_end]; _frame_end is where the frame begun at _start ends (-1 while
        # its prefix is incomplete); _read_size adapts to the load.
        self._buf = bytearray()
        self._start = self._end = 0
        self._frame_end = -1
        self._read_size = MIN_READ
        self._offered = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._head) + self._filled + self._end - self._start

    @property
    def idle(self) -> bool:
        """No partial frame is pending: not even a length prefix without its body."""
        return not self._head and self._need < 0 and self._end == self._start

    @property
    def capacity(self) -> int:
        """Bytes the kept read buffer takes (0 when released)."""
        return len(self._buf)

    # --- reading into a kept buffer (asyncio.BufferedProtocol) -------------------------

    def get_buffer(self) -> memoryview:
        """Room to read the next bytes into; pass how many came to :meth:`buffer_updated`.

        Frames handed out earlier stop being valid. The room offered is the adaptive read
        size (MIN_READ .. MAX_READ: doubled after a read that filled it, back to MIN_READ
        after a small one, which also releases an emptied buffer) or, inside a frame
        larger than that, at most what is already held of it: a peer that announces a
        large frame and trickles it makes the buffer grow only as fast as its bytes
        come, and never past the frame (at most
        ``max_size`` plus its prefix) or MAX_READ plus a partial frame.
        """
        if self._need >= 0 or self._head:
            raise RuntimeError("a FrameReader is fed either by feed() or by get_buffer()")
        start, end = self._start, self._end
        pending = end - start
        want = self._read_size
        if self._frame_end > end and self._frame_end - end > want:
            want = min(self._frame_end - end, max(want, pending))
        buf = self._buf
        if len(buf) - end < want:
            if pending + want <= len(buf) and start:
                view = memoryview(buf)
                view[:pending] = view[start:end]  # memmove, within the same buffer
                view.release()
            else:  # a fresh buffer (never a resize: earlier frames may still view it)
                grown = bytearray(pending + want)
                grown[:pending] = memoryview(buf)[start:end]
                self._buf = buf = grown
            if self._frame_end >= 0:
                self._frame_end -= start
            end = pending
            self._start, self._end = 0, end
        self._offered = len(buf) - end
        return memoryview(buf)[end:]

    def buffer_updated(self, nbytes: int) -> list[Payload]:
        """``nbytes`` were read into the room :meth:`get_buffer` gave; return the frames
        they complete, as views of the buffer valid until the next :meth:`get_buffer`.
        Errors as :meth:`feed`'s."""
        self._end += nbytes
        frames = self._split_buffer()
        if nbytes >= self._offered:
            self._read_size = min(self._read_size * 2, MAX_READ)
        elif nbytes < MIN_READ:
            self._read_size = MIN_READ
            if self._end == self._start:
                # A light read that left nothing behind: the connection is not busy, and
                # holds no buffer until its next read (idle connections cost nothing here).
                self._buf = bytearray()
                self._start = self._end = 0
        return frames

    def discard(self) -> None:
        """Drop what the kept buffer holds (the input is no longer wanted)."""
        self._start = self._end = 0
        self._frame_end = -1

    def trim(self) -> None:
        """Release the kept buffer if it holds no partial frame, or shrink it to that
        frame's bytes (called when the connection goes quiet)."""
        pending = self._end - self._start
        self._read_size = MIN_READ
        if not pending:
            self._buf = bytearray()
            self._start = self._end = 0
        elif len(self._buf) > pending:
            self._buf = bytearray(memoryview(self._buf)[self._start : self._end])
            if self._frame_end >= 0:
                self._frame_end -= self._start
            self._start, self._end = 0, pending

    def _split_buffer(self) -> list[Payload]:
        frames: list[Payload] = []
        pos, end = self._start, self._end
        view = memoryview(self._buf)[:end]  # decode_uvarint reads up to len(view)
        limit = self.max_size
        try:
            while pos < end:
                try:
                    size, body = _length_prefix(view, pos, end)
                except TruncatedError:
                    self._frame_end = -1
                    break
                if size > limit:
                    raise OversizeError(f"frame of {size} bytes exceeds the {limit}-byte limit")
                stop = body + size
                if stop > end:
                    self._frame_end = stop
                    break
                frames.append(view[body:stop])
                pos = stop
            else:
                self._frame_end = -1
        except DecodeError as exc:
            exc.frames = tuple(bytes(frame) for frame in frames)
            self.discard()
            raise
        self._start = pos
        return frames

    def feed(self, data: Payload) -> list[Payload]:
        if self._end != self._start:
            raise RuntimeError("a FrameReader is fed either by feed() or by get_buffer()")
        frames: list[Payload] = []
        end = len(data)
        if not end:
            return frames
        view = memoryview(data)
        pos = 0
        try:
            if self._need >= 0:  # the rest of a frame begun in an earlier chunk
                pos = self._gather(view, 0, end, frames)
            elif self._head:  # the rest of its length prefix
                pos = self._finish_head(view, end)
                if pos < 0:
                    return frames
                pos = self._gather(view, pos, end, frames)
            limit = self.max_size
            while pos < end:
                try:
                    size, body = _length_prefix(view, pos, end)
                except TruncatedError:
                    self._head = view[pos:].tobytes()
                    break
                if size > limit:
                    raise OversizeError(f"frame of {size} bytes exceeds the {limit}-byte limit")
                stop = body + size
                if stop <= end:
                    frames.append(view[body:stop])
                    pos = stop
                else:
                    self._need = size
                    pos = self._gather(view, body, end, frames)
        except DecodeError as exc:
            # What came before the bad prefix is not lost (copied: the error outlives the
            # chunk the views point into).
            exc.frames = tuple(bytes(frame) for frame in frames)
            raise
        return frames

    def _finish_head(self, view: memoryview, end: int) -> int:
        """Complete a length prefix split across chunks; return where its body starts in
        ``view``, or -1 when ``view`` ended before the prefix did."""
        head = self._head
        joined = head + view[: MAX_VARINT_BYTES + 1 - len(head)].tobytes()
        try:
            size, used = decode_uvarint(joined)
        except TruncatedError:
            self._head = joined
            return -1
        if size > self.max_size:
            raise OversizeError(f"frame of {size} bytes exceeds the {self.max_size}-byte limit")
        self._head = b""
        self._need = size
        return used - len(head)

    def _gather(self, view: memoryview, pos: int, end: int, frames: list[Payload]) -> int:
        """Copy the next bytes of the frame being gathered; return the position after them."""
        need = self._need
        filled = self._filled
        take = min(need - filled, end - pos)
        # Grown by what arrives, never allocated at the announced size: a peer that
        # announces a frame at the cap and trickles it holds only what it sent.
        self._body += view[pos : pos + take]
        filled += take
        if filled < need:
            self._filled = filled
            return end
        frames.append(self._body)
        self._body = bytearray()
        self._filled = 0
        self._need = -1
        return pos + take
