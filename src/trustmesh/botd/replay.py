"""A responder's memory of recent Init messages, shared by all its connections.

A replayed Init can never yield a session (the replayer lacks the ephemeral secret, so
it cannot send Finished), but remembering recent ephemeral keys lets the responder name
the replay and close at once instead of waiting out the handshake timeout.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_WINDOW = 600.0  # seconds an Init is remembered
DEFAULT_CAPACITY = 65536  # Inits remembered at most; the oldest are forgotten first


class ReplayCache:
    """Bounded, time-windowed set of Init ephemeral keys. Time comes in as ``now``."""

    def __init__(self, *, window: float = DEFAULT_WINDOW, capacity: int = DEFAULT_CAPACITY):
        if window <= 0 or capacity <= 0:
            raise ValueError("window and capacity must be > 0")
        self._window = window
        self._capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # key -> time first seen

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, ephemeral_pubkey: bytes, now: float) -> bool:
        """Record the key; return ``False`` when it was already seen within the window."""
        self._expire(now)
        if ephemeral_pubkey in self._seen:
            return False
        self._seen[ephemeral_pubkey] = now
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True

    def _expire(self, now: float) -> None:
        horizon = now - self._window
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if seen_at > horizon:
                break
            del self._seen[key]
