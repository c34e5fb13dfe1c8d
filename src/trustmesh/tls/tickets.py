"""Resumption tickets a client keeps, each until its expiry (zero-trust-mesh.md 2.3).

Sans-IO: the caller gives the Unix time. A ticket is kept at most until
:meth:`TlsStream.ticket_expiry` (less than both certificates' validity), and a resumed
session's peer is checked again anyway (``TlsContext.refuse_resumed``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from OpenSSL import SSL

DEFAULT_CAPACITY = 4096


class TicketCache:
    """Tickets by destination (an address), the least recently stored dropped first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._tickets: OrderedDict[Hashable, tuple[SSL.Session, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tickets)

    def get(self, key: Hashable, unix_now: float) -> SSL.Session | None:
        """The ticket for ``key`` if it has not expired (an expired one is dropped)."""
        entry = self._tickets.get(key)
        if entry is None:
            return None
        if unix_now >= entry[1]:
            del self._tickets[key]
            return None
        return entry[0]

    def put(self, key: Hashable, session: SSL.Session, expiry: float) -> None:
        self._tickets[key] = (session, expiry)
        self._tickets.move_to_end(key)
        while len(self._tickets) > self.capacity:
            self._tickets.popitem(last=False)

    def forget(self, key: Hashable) -> None:
        """Drop the ticket for ``key`` (its last use failed: dial afresh next time)."""
        self._tickets.pop(key, None)

    def clear(self) -> None:
        self._tickets.clear()
