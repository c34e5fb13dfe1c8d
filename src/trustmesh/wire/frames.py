"""Length-prefixed frames: ``uvarint(len(payload)) || payload``.

The decoder is incremental (bytes arrive in any split) and checks the size limit as
soon as the length prefix is complete, so an attacker cannot make it buffer a frame
larger than ``max_size`` before it says no.
"""

from __future__ import annotations

from trustmesh.errors import DecodeError, OversizeError, TrailingDataError, TruncatedError
from trustmesh.wire.varint import decode_uvarint, encode_uvarint

DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB


def encode_frame(
    payload: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_FRAME
) -> bytes:
    """Return ``payload`` with its length prefix; refuse payloads over ``max_size``."""
    size = len(payload)
    if size > max_size:
        raise OversizeError(f"frame of {size} bytes exceeds the {max_size}-byte limit")
    return encode_uvarint(size) + bytes(payload)


def decode_frame(data: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Decode exactly one frame that fills ``data``."""
    size, start = decode_uvarint(data)
    if size > max_size:
        raise OversizeError(f"frame of {size} bytes exceeds the {max_size}-byte limit")
    end = start + size
    if end > len(data):
        raise TruncatedError(f"frame needs {size} bytes, {len(data) - start} present", offset=start)
    if end < len(data):
        raise TrailingDataError(f"{len(data) - end} bytes after the frame", offset=end)
    return bytes(data[start:end])


class FrameDecoder:
    """Split a byte stream into frames; keeps at most one partial frame buffered."""

    __slots__ = ("_buf", "_max_size", "_need")

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self._max_size = max_size
        self._buf = bytearray()
        self._need: int | None = None  # payload length once the prefix is known

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)

    @property
    def max_size(self) -> int:
        return self._max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        """Change the limit for frames whose length prefix is still to come (a protocol
        that allows larger frames once its handshake is done)."""
        if value < 0:
            raise ValueError("max_size must be >= 0")
        self._max_size = value

    @property
    def idle(self) -> bool:
        """No partial frame is pending: not even a length prefix without its body."""
        return not self._buf and self._need is None

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add bytes; return every frame they complete, in order.

        Raises :class:`OversizeError` for a frame over the limit and the varint errors for
        a bad prefix; the error's ``frames`` holds the frames completed before it. After
        an error the stream is unusable: close the connection.
        """
        # Usually no partial frame is pending: parse the input in place, so each frame's
        # bytes are copied once, and only an incomplete tail is kept.
        pending = bool(self._buf)
        if pending:
            self._buf += data
        view = memoryview(self._buf if pending else data)
        frames: list[bytes] = []
        pos = 0
        end = len(view)
        try:
            while True:
                if self._need is None:
                    if pos == end:
                        break  # the usual case: the input ended on a frame boundary
                    try:
                        size, body = decode_uvarint(view, pos)
                    except TruncatedError:
                        break  # the prefix is incomplete; wait for more bytes
                    if size > self._max_size:
                        raise OversizeError(
                            f"frame of {size} bytes exceeds the {self._max_size}-byte limit"
                        )
                    self._need = size
                    pos = body
                if end - pos < self._need:
                    break
                frames.append(view[pos : pos + self._need].tobytes())
                pos += self._need
                self._need = None
            rest = None if pending else bytearray(view[pos:])
        except DecodeError as exc:
            exc.frames = tuple(frames)  # what came before the bad prefix is not lost
            raise
        finally:
            view.release()
        if rest is not None:
            self._buf = rest
        elif pos:
            del self._buf[:pos]
        return frames
