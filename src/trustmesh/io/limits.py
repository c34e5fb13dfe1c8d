"""The resource policy every trustmesh listener and connection runs under.

One :class:`ResourcePolicy` says how much a listener gives away: connections in total
and per source address (an IPv6 source counts per /64), how long a connection may take
to authenticate, how many bytes and events it may have queued each way, how many tasks
it may run, and how fast one address may start handshakes. A :class:`ConnectionTable`
enforces the admission part at accept time; the drivers (``trustmesh.io.stream``,
``trustmesh.io.http``) enforce the per-connection part. ``docs/limits.md`` lists every
limit with its default and its flag.

When a table is full, authenticated connections are never evicted: the oldest
unauthenticated connection of the source that holds the most of them goes first, and
each source may hold only ``max_unauthenticated_per_source`` of them, so a flood from
one address cannot push out another address's handshakes.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trustmesh.ratelimit import RateLimiter

log = logging.getLogger("trustmesh.io.limits")

MIN_HTTP_DEADLINE = 5.0
LOG_EVERY = 60.0  # seconds between two log lines about one source and one limit
MAX_LOGGED_SOURCES = 4096  # the log limiter's memory


@dataclass(frozen=True)
class ResourcePolicy:
    """Limits for one listener and each of its connections (defaults suit a small edge
    box: 1,024 connections, a few MiB at most per connection)."""

    max_connections: int = 1024
    max_per_source: int = 64
    max_unauthenticated: int = 256
    max_unauthenticated_per_source: int = 32
    handshake_timeout: float = 10.0  # TCP accept to authenticated
    idle_timeout: float = 5.0  # no byte at all from the peer before authentication
    max_write_buffer: int = 2 * 1024 * 1024  # unsent bytes; a peer past it is closed
    write_stall_timeout: float = 30.0  # writing paused this long: the peer is closed
    max_queued_events: int = 256  # events not yet taken by the application
    max_queued_bytes: int = 1024 * 1024  # payload bytes of those events
    max_tasks: int = 32  # background tasks per connection (BRC-103 sends, listeners)
    handshake_rate: float = 20.0  # new connections per second per source, on average
    handshake_burst: int = 64
    backlog: int = 1024
    accept_retry: float = 0.5  # seconds accepting pauses at the descriptor limit
    # HTTP servers
    header_timeout: float = 10.0  # a request head must be complete this soon
    body_timeout: float = 10.0  # a request body may make no progress this long
    keepalive_timeout: float = 15.0  # an idle HTTP connection is closed after this
    request_rate: float = 20.0  # rate-limited routes: requests per second per client
    request_burst: int = 100

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value <= 0:
                raise ValueError(f"limit {item.name} must be positive, not {value}")
        if self.max_per_source > self.max_connections:
            raise ValueError("max_per_source cannot exceed max_connections")
        if self.max_unauthenticated_per_source > self.max_unauthenticated:
            raise ValueError("max_unauthenticated_per_source cannot exceed max_unauthenticated")

    def check_operator_values(self) -> None:
        """The floors an operator's settings must respect (tests may go lower)."""
        for name in ("header_timeout", "body_timeout"):
            if getattr(self, name) < MIN_HTTP_DEADLINE:  # slow honest links get their request in
                raise ValueError(f"{name} must be at least {MIN_HTTP_DEADLINE:g} seconds")

    def replace(self, **changes: Any) -> ResourcePolicy:
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_load(cls, connections: int) -> ResourcePolicy:
        """A policy for a server that is meant to hold ``connections`` peers from few
        addresses (benchmarks, a relay behind a load balancer)."""
        return cls(
            max_connections=connections,
            max_per_source=connections,
            max_unauthenticated=connections,
            max_unauthenticated_per_source=connections,
            handshake_rate=1e9,
            handshake_burst=connections,
            backlog=max(1024, connections),
        )


LIMIT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ResourcePolicy))
LIMIT_HELP: dict[str, str] = {
    "max_connections": "connections held in total; over it, unauthenticated ones are evicted "
    "or the newcomer is refused",
    "max_per_source": "connections held per source address (per /64 for IPv6)",
    "max_unauthenticated": "connections not yet authenticated, in total",
    "max_unauthenticated_per_source": "connections not yet authenticated, per source address",
    "handshake_timeout": "seconds from TCP accept to authenticated (HTTP: to the first request "
    "head)",
    "idle_timeout": "seconds a new connection may send nothing at all",
    "max_write_buffer": "bytes of unsent output per connection before the peer is dropped "
    "(HTTP: reading pauses)",
    "write_stall_timeout": "seconds a peer may leave our output unread before it is dropped",
    "max_queued_events": "inbound events queued per connection before reading pauses",
    "max_queued_bytes": "payload bytes of those events (and of a BOTD channel's inbox) before "
    "reading pauses",
    "max_tasks": "background tasks per connection (BRC-103 sends and listeners) before reading "
    "pauses",
    "handshake_rate": "new connections per second per source address, on average",
    "handshake_burst": "new connections per source address in a burst",
    "backlog": "the listen backlog (the kernel caps it at net.core.somaxconn)",
    "accept_retry": "seconds accepting pauses when the process is out of descriptors",
    "header_timeout": "seconds for an HTTP request head, from its first byte (at least 5)",
    "body_timeout": "seconds an HTTP request body may make no progress (at least 5; then 408)",
    "keepalive_timeout": "seconds an idle HTTP connection is kept",
    "request_rate": "requests per second per client on rate-limited routes (gossip, BRC-104)",
    "request_burst": "requests per client in a burst on those routes",
}
_TYPES = {f.name: f.type for f in dataclasses.fields(ResourcePolicy)}


def policy_from(overrides: dict[str, Any], base: ResourcePolicy | None = None) -> ResourcePolicy:
    """``base`` (the defaults) with ``overrides`` by limit name, each checked for its name
    and type (raises ValueError or TypeError naming the limit)."""
    values: dict[str, Any] = {}
    for name, value in overrides.items():
        kind = _TYPES.get(name)
        if kind is None:
            raise ValueError(f"unknown limit {name!r} (known: {', '.join(LIMIT_FIELDS)})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"limit {name} must be a number, not {value!r}")
        if kind in ("int", int):
            if value != int(value):
                raise TypeError(f"limit {name} must be a whole number, not {value!r}")
            value = int(value)
        values[name] = float(value) if kind in ("float", float) else value
    return (base or ResourcePolicy()).replace(**values)


def source_of(address: object) -> str:
    """The key a peer address counts under: the IPv4 address, or an IPv6 /64."""
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, str) and ":" not in host and host.count(".") == 3:
        return host  # IPv4 as the kernel wrote it: the common case, at flood rates
    try:
        ip = ipaddress.ip_address(str(host))
    except ValueError:
        return str(host)  # a Unix socket path or an in-memory pipe: one source each
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LimitStats:
    """How often each limit was hit (``refused.per_source``, ``evicted`` ...), and the
    log lines about it: at most one per source and limit every ``LOG_EVERY`` seconds."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.counts: collections.Counter[str] = collections.Counter()
        self._clock = clock
        self._logged: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def hit(self, limit: str, source: str, detail: str = "") -> None:
        self.counts[limit] += 1
        now = self._clock()
        key = (source, limit)
        last = self._logged.get(key)
        if last is not None and now - last < LOG_EVERY:
            return
        self._logged[key] = now
        self._logged.move_to_end(key)
        while len(self._logged) > MAX_LOGGED_SOURCES:
            self._logged.popitem(last=False)
        log.warning(
            "%s: limit %s hit by %s%s (%d so far)",
            self.name,
            limit,
            source,
            f": {detail}" if detail else "",
            self.counts[limit],
        )

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class Admission:
    """One admitted connection's place in its table. The connection calls
    :meth:`authenticated` once its peer is proven, and :meth:`release` when it ends; the
    table calls ``evict`` (set by the connection) to make room."""

    __slots__ = ("_table", "accepted_at", "authenticated_at", "evict", "released", "source")

    def __init__(self, table: ConnectionTable, source: str, now: float) -> None:
        self._table = table
        self.source = source
        self.accepted_at = now
        self.authenticated_at: float | None = None
        self.evict: Callable[[str], None] | None = None
        self.released = False

    @property
    def policy(self) -> ResourcePolicy:
        return self._table.policy

    @property
    def stats(self) -> LimitStats:
        return self._table.stats

    @property
    def is_authenticated(self) -> bool:
        return self.authenticated_at is not None

    def authenticated(self, now: float) -> None:
        if self.authenticated_at is None:
            self.authenticated_at = now
            self._table.promote(self)

    def release(self) -> None:
        self._table.release(self)


class ConnectionTable:
    """Who holds a listener's connections, and who gets in next."""

    def __init__(
        self,
        policy: ResourcePolicy,
        stats: LimitStats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.stats = stats
        self._clock = clock
        self._all: dict[str, int] = collections.Counter()
        self._total = 0
        # Unauthenticated connections, oldest first, per source.
        self._pending: dict[str, collections.OrderedDict[int, Admission]] = {}
        self._pending_total = 0
        self._rates = RateLimiter(
            policy.handshake_rate, policy.handshake_burst, clock=clock, max_clients=16384
        )

    @property
    def total(self) -> int:
        return self._total

    @property
    def unauthenticated(self) -> int:
        return self._pending_total

    def per_source(self, source: str) -> int:
        return self._all.get(source, 0)

    def admit(self, source: str) -> Admission | None:
        """A place for a new connection from ``source``, or None (refused, counted)."""
        policy = self.policy
        if self._rates.check(source) is not None:
            self.stats.hit("refused.handshake_rate", source)
            return None
        if self._all.get(source, 0) >= policy.max_per_source:
            self.stats.hit("refused.per_source", source, f"{policy.max_per_source} held")
            return None
        own = self._pending.get(source)
        if own is not None and len(own) >= policy.max_unauthenticated_per_source:
            self.stats.hit("refused.unauthenticated_per_source", source)
            return None
        if self._pending_total >= policy.max_unauthenticated and not self._evict_one(source):
            self.stats.hit("refused.unauthenticated", source)
            return None
        if self._total >= policy.max_connections and not self._evict_one(source):
            self.stats.hit("refused.connections", source, f"{policy.max_connections} held")
            return None
        admission = Admission(self, source, self._clock())
        self._all[source] = self._all.get(source, 0) + 1
        self._total += 1
        self._pending.setdefault(source, collections.OrderedDict())[id(admission)] = admission
        self._pending_total += 1
        return admission

    def evict_for_descriptors(self) -> bool:
        """At the descriptor limit: close one unauthenticated connection, if any."""
        return self._evict_one("")

    def promote(self, admission: Admission) -> None:
        self._drop_pending(admission)

    def release(self, admission: Admission) -> None:
        if admission.released:
            return
        admission.released = True
        admission.evict = None
        self._drop_pending(admission)
        self._total -= 1
        left = self._all.get(admission.source, 0) - 1
        if left > 0:
            self._all[admission.source] = left
        else:
            self._all.pop(admission.source, None)

    def _drop_pending(self, admission: Admission) -> None:
        own = self._pending.get(admission.source)
        if own is not None and own.pop(id(admission), None) is not None:
            self._pending_total -= 1
            if not own:
                del self._pending[admission.source]

    def _evict_one(self, newcomer: str) -> bool:
        """Close the oldest unauthenticated connection of the source holding the most of
        them (never ``newcomer``'s own); False when there is none to close."""
        candidates = [(len(v), s) for s, v in self._pending.items() if s != newcomer]
        if not candidates:
            return False
        _, source = max(candidates)
        victim = next(iter(self._pending[source].values()))
        self.stats.hit("evicted.unauthenticated", source, f"room for {newcomer or 'a socket'}")
        evict = victim.evict
        self.release(victim)
        if evict is not None:
            evict("evicted: the listener needed room for a newer connection")
        return True
