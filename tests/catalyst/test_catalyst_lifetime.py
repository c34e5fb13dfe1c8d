"""A Catalyst session lives no longer than its certificates (issue 16 item 7), sans-IO on
a fake clock: it reads when the earlier of the two certificates expires from its TLS
binding at start and ceases then with NOTIFICATION 6/240; ``revoke(now)`` (the node's
answer to a CRL that revokes the peer) ceases with 6/241."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.session import (
    CEASE_CERTIFICATE_EXPIRED,
    CEASE_CERTIFICATE_REVOKED,
    CatalystConfig,
    CatalystSession,
    NotificationEvent,
    State,
)
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsEstablished

A = CatalystConfig(my_asn=65001, bgp_identifier="node-a")
B = CatalystConfig(my_asn=65002, bgp_identifier="node-b")
A_ZERO = CatalystConfig(my_asn=65001, bgp_identifier="node-a", hold_time=0)
B_ZERO = CatalystConfig(my_asn=65002, bgp_identifier="node-b", hold_time=0)


class FakeTls:
    """One side of a TLS session whose certificates expire at ``expires_at`` (the
    session's clock), or never when None."""

    def __init__(self, names: frozenset[str], expires_at: float | None) -> None:
        self.names = names
        self.established: TlsEstablished | None = TlsEstablished(
            peer_chain=(), alpn=None, group=None, resumed=False, expires_at=expires_at
        )

    def peer_names(self) -> frozenset[str]:
        return self.names

    def exporter(self, label: bytes, context: bytes) -> bytes:
        return hmac.new(b"session-1", label + b"|" + context, hashlib.sha256).digest()


def pair(
    expires_at: float | None, a: CatalystConfig = A, b: CatalystConfig = B
) -> tuple[CatalystSession, CatalystSession]:
    return (
        CatalystSession(a, initiator=True, binding=FakeTls(frozenset({"node-b"}), expires_at)),
        CatalystSession(b, initiator=False, binding=FakeTls(frozenset({"node-a"}), expires_at)),
    )


def shuttle(x: CatalystSession, y: CatalystSession, now: float) -> tuple[list[Event], list[Event]]:
    x_events: list[Event] = []
    y_events: list[Event] = []
    for _ in range(10):
        out_x, out_y = x.data_to_send(), y.data_to_send()
        if not out_x and not out_y:
            break
        if out_x:
            y_events += y.receive_data(out_x, now)
        if out_y:
            x_events += x.receive_data(out_y, now)
    return x_events, y_events


def establish(a: CatalystSession, b: CatalystSession, now: float = 0.0) -> None:
    a.start(now)
    b.start(now)
    shuttle(a, b, now)
    assert a.state is State.ESTABLISHED and b.state is State.ESTABLISHED


def notifications(events: list[Event], direction: str) -> list[tuple[int, int]]:
    return [
        (e.code, e.subcode)
        for e in events
        if isinstance(e, NotificationEvent) and e.direction == direction
    ]


def closed_event(events: list[Event]) -> ConnectionClosed:
    assert isinstance(events[-1], ConnectionClosed)
    return events[-1]


def test_the_session_ceases_when_a_certificate_expires() -> None:
    a, b = pair(500.0, A_ZERO, B_ZERO)
    establish(a, b)
    # No hold timer (hold time 0): the only deadline left is the certificates' expiry.
    assert a.expires_at == 500.0
    assert a.get_timer() == 500.0 and b.get_timer() == 500.0
    assert a.handle_timer(499.9) == []
    events = a.handle_timer(500.0)
    assert notifications(events, "sent") == [(m.CEASE, CEASE_CERTIFICATE_EXPIRED)]
    assert closed_event(events).error
    assert a.state is State.CLOSED and a.get_timer() is None
    peer_events = b.receive_data(a.data_to_send(), 500.0)
    assert notifications(peer_events, "received") == [(m.CEASE, CEASE_CERTIFICATE_EXPIRED)]
    peer_closed = closed_event(peer_events)
    assert peer_closed.by_peer and peer_closed.error  # not an orderly Cease
    assert a.counters.notifications_sent[(m.CEASE, CEASE_CERTIFICATE_EXPIRED)] == 1


def test_keepalives_run_until_the_expiry_then_it_ends_the_session() -> None:
    a, b = pair(100.0)
    establish(a, b)
    now = 0.0
    while (deadline := a.get_timer()) is not None and deadline < 100.0:
        now = deadline
        assert a.handle_timer(now) == []
        b.handle_timer(now)
        shuttle(a, b, now)  # keepalives each way: no hold timer expires
    assert a.get_timer() == 100.0
    events = a.handle_timer(100.0)
    assert notifications(events, "sent") == [(m.CEASE, CEASE_CERTIFICATE_EXPIRED)]


def test_expiry_before_established_is_6_240_not_a_hold_timer_expiry() -> None:
    a, _ = pair(4.0)
    a.start(0.0)
    assert a.get_timer() == 4.0  # before the open timeout's 10 s
    events = a.handle_timer(4.0)
    assert notifications(events, "sent") == [(m.CEASE, CEASE_CERTIFICATE_EXPIRED)]
    assert a.counters.hold_timer_expiries == 0


def test_no_expiry_known_leaves_the_timers_alone() -> None:
    a, b = pair(None, A_ZERO, B_ZERO)
    establish(a, b)
    assert a.expires_at is None and a.get_timer() is None


@pytest.mark.parametrize("established", [True, False])
def test_revoke_ceases_with_6_241(established: bool) -> None:
    a, b = pair(None)
    if established:
        establish(a, b)
    else:
        a.start(0.0)
    events = a.revoke(7.0)
    assert notifications(events, "sent") == [(m.CEASE, CEASE_CERTIFICATE_REVOKED)]
    assert closed_event(events).error
    assert a.revoke(8.0) == []  # once closed, nothing more
    if established:
        peer_events = b.receive_data(a.data_to_send(), 7.0)
        assert notifications(peer_events, "received") == [(m.CEASE, CEASE_CERTIFICATE_REVOKED)]
        assert closed_event(peer_events).error
