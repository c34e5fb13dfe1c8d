"""The contract between sans-IO protocol cores and the drivers that run them.

A core is a plain object. It takes bytes and time in, returns events, and exposes the
bytes it wants sent and the next moment it wants to be woken. It never opens a socket,
reads a clock, sleeps or spawns a task; randomness and keys come in through its
constructor. See ``docs/architecture.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event a core returns."""

    def payload_size(self) -> int:
        """Bytes of peer data this event holds (drivers bound what they queue by it)."""
        return 0


@dataclass(frozen=True, slots=True)
class Authenticated(Event):
    """Base class of the event that says the peer is proven (BOTD's handshake, a
    Catalyst session Established, a mesh link's HELLO): the driver's handshake deadline
    ends, and the listener protects the connection from eviction."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The core is finished with the connection; the driver closes the transport.

    ``reason`` is a short human-readable cause, ``error`` tells a failure from an
    orderly close, and ``by_peer`` tells who ended it. Protocol-specific close events
    subclass this one, so every driver understands them.
    """

    reason: str
    error: bool = False
    by_peer: bool = False


class StreamCore(Protocol):
    """A connection-oriented protocol state machine (TCP, TLS, pipes)."""

    def start(self, now: float) -> list[Event]:
        """The transport is up; an initiator queues its first message here."""

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Bytes from the peer, received at ``now``; ``b""`` means the peer sent EOF."""

    def handle_timer(self, now: float) -> list[Event]:
        """Called at (or after) the deadline :meth:`get_timer` returned."""

    def get_timer(self) -> float | None:
        """The next deadline, on the clock ``now`` comes from, or ``None``."""

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer; calling it empties the core's buffer."""

    def close(self, reason: str, now: float) -> list[Event]:
        """The application ends the connection at ``now``; the core says goodbye as its
        spec says (it may keep reading until the peer's goodbye, under its own timer)."""
