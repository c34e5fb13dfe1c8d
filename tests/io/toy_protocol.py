"""A tiny sans-IO protocol used to test the drivers.

Frames are length-prefixed. ``PING`` is answered with ``PONG``; ``CRASH`` makes the
core raise a non-protocol exception (a bug); a frame starting with ``!`` makes it
raise a ProtocolError (bad input); anything else is delivered as a message
and, in echo mode, sent back. A peer silent for ``idle`` seconds is closed.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.errors import ProtocolError
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.wire.frames import FrameDecoder, encode_frame

MAX_FRAME = 4096
BYE = b"BYE"


@dataclass(frozen=True, slots=True)
class Message(Event):
    data: bytes


class ToyCore:
    def __init__(self, *, echo: bool = False, idle: float | None = None) -> None:
        self.echo = echo
        self.idle = idle
        self.timer_calls: list[float] = []
        self._frames = FrameDecoder(MAX_FRAME)
        self._out = bytearray()
        self._deadline: float | None = None
        self._closed = False

    def start(self, now: float) -> list[Event]:
        if self.idle is not None:
            self._deadline = now + self.idle
        return []

    def send(self, data: bytes) -> list[Event]:
        self._out += encode_frame(data, MAX_FRAME)
        return []

    def set_deadline(self, deadline: float | None) -> list[Event]:
        self._deadline = deadline
        return []

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if not data:
            self._closed = True
            return [ConnectionClosed("peer sent EOF", by_peer=True)]
        events: list[Event] = []
        for frame in self._frames.feed(data):  # a ProtocolError here is the driver's to handle
            if frame == b"PING":
                self._out += encode_frame(b"PONG")
            elif frame.startswith(b"!"):
                raise ProtocolError(f"bad message {frame[:10]!r}")
            elif frame == b"CRASH":
                raise RuntimeError("toy core bug")
            elif frame == BYE:
                self._closed = True
                events.append(ConnectionClosed("peer said bye", by_peer=True))
                break
            else:
                events.append(Message(frame))
                if self.echo:
                    self._out += encode_frame(frame)
        return events

    def handle_timer(self, now: float) -> list[Event]:
        self.timer_calls.append(now)
        if self._deadline is not None and now >= self._deadline and not self._closed:
            self._closed = True
            return [ConnectionClosed("idle timeout", error=True)]
        return []

    def get_timer(self) -> float | None:
        return None if self._closed else self._deadline

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def close(self, reason: str, now: float) -> list[Event]:
        if self._closed:
            return []
        self._closed = True
        self._out += encode_frame(BYE)
        return [ConnectionClosed(reason)]
