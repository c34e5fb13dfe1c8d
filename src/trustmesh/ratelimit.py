"""A token bucket (``rate`` tokens a second on average, bursts of ``burst``; time comes
in as ``now``, so sans-IO cores and tests drive it without a clock), and a bounded table
of them per client."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> float | None:
        """Take one token: None when allowed, else the seconds until one is due."""
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate


MAX_CLIENTS = 10_000  # a RateLimiter forgets the least recently seen clients beyond this


class RateLimiter:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, client: str) -> float | None:
        """Take one token for ``client``: None when allowed, else the seconds to wait."""
        now = self._clock()
        bucket = self._buckets.pop(client, None) or TokenBucket(self.rate, self.burst, now)
        wait = bucket.take(now)
        self._buckets[client] = bucket
        if len(self._buckets) > self._max_clients:
            # A forgotten client comes back with a full bucket: no worse than a new one.
            self._buckets.popitem(last=False)
        return wait
