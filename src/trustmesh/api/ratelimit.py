"""A per-client token bucket: ``rate`` requests per second on average, bursts of
``burst``. The clock is injected, so tests drive it without sleeping."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from trustmesh.ratelimit import TokenBucket

DEFAULT_RATE = 5.0  # requests per second per client, on average
DEFAULT_BURST = 20
MAX_CLIENTS = 10_000  # the table forgets the least recently seen clients beyond this


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
