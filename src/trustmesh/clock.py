"""The one clock that drivers and services read (docs/architecture.md, "One clock").

Sans-IO cores never read a clock: time comes in as ``now``. The objects around them (the
CA, its registrar and HTTP server, clients, drivers) take one :class:`Clock` at
construction and read time only through it, so a test swaps in a :class:`FakeClock` and
moves time by hand instead of sleeping or patching ``datetime``.

- :meth:`Clock.now`: wall-clock time, an aware ``datetime`` in UTC (certificate
  validity, token expiry, CRL thisUpdate/nextUpdate).
- :meth:`Clock.time_ms`: the same wall clock as Unix milliseconds (wire timestamps).
- :meth:`Clock.monotonic`: seconds that never go backwards (rate limits, deadlines).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock", "SystemClock"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class Clock(Protocol):
    """Where a service reads the time."""

    def now(self) -> datetime:
        """The wall-clock time, aware, in UTC."""

    def time_ms(self) -> int:
        """The wall-clock time in milliseconds since the Unix epoch."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never go backwards."""


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SYSTEM_CLOCK"


SYSTEM_CLOCK: Final[Clock] = SystemClock()


class FakeClock:
    """A clock that moves only when told: :meth:`advance` moves the wall clock and the
    monotonic clock together; :meth:`set` moves the wall clock alone (as an NTP step
    does), forwards or backwards, and leaves the monotonic clock where it is."""

    DEFAULT_START: Final = datetime(2030, 1, 1, tzinfo=UTC)

    def __init__(self, start: datetime | None = None, *, monotonic: float = 0.0) -> None:
        self._now = _aware(start if start is not None else self.DEFAULT_START)
        self._monotonic = float(monotonic)

    def now(self) -> datetime:
        return self._now

    def time_ms(self) -> int:
        return (self._now - _EPOCH) // timedelta(milliseconds=1)

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float | timedelta) -> None:
        """Let ``seconds`` (not negative) pass on both clocks."""
        step = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        if step < timedelta(0):
            raise ValueError(f"a clock does not advance by a negative amount ({step})")
        self._now += step
        self._monotonic += step.total_seconds()

    def set(self, when: datetime) -> None:
        """Step the wall clock to ``when`` (aware); the monotonic clock does not move."""
        self._now = _aware(when)

    def __repr__(self) -> str:
        return f"FakeClock({self._now.isoformat()}, monotonic={self._monotonic})"


def _aware(when: datetime) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"a clock's time must be timezone-aware, not {when!r}")
    return when.astimezone(UTC)
