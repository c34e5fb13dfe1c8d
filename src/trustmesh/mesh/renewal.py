"""When a node renews its certificate (zero-trust-mesh.md sections 3.2 and 4.3), sans-IO.

A node renews once ``RENEW_AT`` of its certificate's lifetime has passed, and after a
failure retries a tenth of the time it has left, between 5 s and 5 minutes: soon
enough to renew before expiry, seldom enough not to hammer a CA that is down.
"""

from __future__ import annotations

from dataclasses import dataclass

RENEW_AT = 2 / 3  # of a certificate's lifetime
RETRY_MIN_MS = 5_000
RETRY_MAX_MS = 300_000


@dataclass
class RenewalSchedule:
    """The renewal deadline of one certificate (Unix ms throughout)."""

    not_before_ms: int
    not_after_ms: int
    retry_at_ms: int | None = None  # set by a failure, cleared by a new certificate
    in_flight: bool = False

    @property
    def due_ms(self) -> int:
        return self.not_before_ms + int((self.not_after_ms - self.not_before_ms) * RENEW_AT)

    def next_ms(self) -> int | None:
        """When to renew next (None while a renewal runs)."""
        if self.in_flight:
            return None
        return self.retry_at_ms if self.retry_at_ms is not None else self.due_ms

    def start_if_due(self, now_ms: int) -> bool:
        """True (and the renewal counts as running) when it is time to renew."""
        due = self.next_ms()
        if due is None or now_ms < due:
            return False
        self.in_flight = True
        return True

    def failed(self, now_ms: int) -> int:
        """A renewal failed: return the wait before the next try, in ms."""
        left = self.not_after_ms - now_ms
        retry = min(max(left // 10, RETRY_MIN_MS), RETRY_MAX_MS)
        self.in_flight = False
        self.retry_at_ms = now_ms + retry
        return retry

    def renewed(self, not_before_ms: int, not_after_ms: int) -> None:
        self.not_before_ms, self.not_after_ms = not_before_ms, not_after_ms
        self.retry_at_ms = None
        self.in_flight = False
