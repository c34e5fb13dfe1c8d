"""The Catalyst session FSM, sans-IO, with a fake TLS binding and a fake clock."""

from __future__ import annotations

import contextlib
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.errors import MessageError
from trustmesh.catalyst.session import (
    CatalystConfig,
    CatalystSession,
    Counters,
    KeepaliveReceived,
    NotificationEvent,
    Peer,
    SessionEstablished,
    State,
)
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsEstablished
from trustmesh.wire.frames import FrameDecoder, encode_frame


class FakeTls:
    """Both ends of one TLS session: shared exporter secret, each side's peer names."""

    established: TlsEstablished | None = None  # no certificate expiry

    def __init__(self, names: frozenset[str], session_secret: bytes = b"session-1") -> None:
        self.names = names
        self.secret = session_secret

    def peer_names(self) -> frozenset[str]:
        return self.names

    def exporter(self, label: bytes, context: bytes) -> bytes:
        return hmac.new(self.secret, label + b"|" + context, hashlib.sha256).digest()


A = CatalystConfig(my_asn=65001, bgp_identifier="node-a")
B = CatalystConfig(my_asn=65002, bgp_identifier="node-b")
B_ZERO = CatalystConfig(my_asn=65002, bgp_identifier="node-b", allow_zero_hold=True)


def pair(
    a: CatalystConfig = A,
    b: CatalystConfig = B,
    *,
    a_sees: str = "node-b",
    b_sees: str = "node-a",
    b_secret: bytes = b"session-1",
) -> tuple[CatalystSession, CatalystSession]:
    initiator = CatalystSession(a, initiator=True, binding=FakeTls(frozenset({a_sees})))
    responder = CatalystSession(b, initiator=False, binding=FakeTls(frozenset({b_sees}), b_secret))
    return initiator, responder


def shuttle(
    x: CatalystSession, y: CatalystSession, now: float = 0.0
) -> tuple[list[Event], list[Event]]:
    """Deliver everything both sides have queued until both are quiet."""
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


def establish(
    a: CatalystSession, b: CatalystSession, now: float = 0.0
) -> tuple[list[Event], list[Event]]:
    a.start(now)
    b.start(now)
    return shuttle(a, b, now)


def sent_notification(events: list[Event]) -> NotificationEvent:
    [note] = [e for e in events if isinstance(e, NotificationEvent) and e.direction == "sent"]
    assert isinstance(events[-1], ConnectionClosed)
    return note


def test_full_session_reaches_established_on_both_sides() -> None:
    a, b = pair()
    a_events, b_events = establish(a, b)
    assert SessionEstablished("node-b", 65002, 180) in a_events
    assert SessionEstablished("node-a", 65001, 180) in b_events
    assert a.state is State.ESTABLISHED
    assert b.state is State.ESTABLISHED


def test_hold_time_is_the_lower_offer_and_keepalives_every_third() -> None:
    a, b = pair(CatalystConfig(65001, "node-a", hold_time=90))
    establish(a, b)
    assert a.hold_time == b.hold_time == 90
    assert a.get_timer() == 30.0  # KEEPALIVE due at hold/3, before the hold timer
    assert a.handle_timer(30.0) == []
    assert b.receive_data(a.data_to_send(), 30.0) == [KeepaliveReceived()]
    assert b.get_timer() == 30.0  # b's own keepalive is due too
    assert b.handle_timer(30.0) == []
    assert b.get_timer() == 60.0  # next keepalive; its hold timer moved to 120


def test_hold_timer_expiry_sends_notification_4() -> None:
    counters = Counters()
    a = CatalystSession(
        A, initiator=True, binding=FakeTls(frozenset({"node-b"})), counters=counters
    )
    b = CatalystSession(B, initiator=False, binding=FakeTls(frozenset({"node-a"})))
    establish(a, b)
    # b goes silent; a's keepalives go out at 60 and 120, its hold timer fires at 180.
    assert a.handle_timer(60.0) == []
    assert a.handle_timer(120.0) == []
    events = a.handle_timer(180.0)
    note = sent_notification(events)
    assert (note.code, note.subcode) == (4, 0)
    assert counters.hold_timer_expiries == 1
    assert counters.notifications_sent[(4, 0)] == 1
    [closing] = [
        e for e in b.receive_data(a.data_to_send(), 180.0) if isinstance(e, NotificationEvent)
    ]
    assert (closing.code, closing.direction) == (4, "received")


def test_hold_time_zero_disables_timers() -> None:
    # b offers 180 and accepts a's 0 only because its policy allows it.
    a, b = pair(CatalystConfig(65001, "node-a", hold_time=0), B_ZERO)
    establish(a, b)
    assert a.state is b.state is State.ESTABLISHED
    assert a.hold_time == b.hold_time == 0
    assert a.get_timer() is None
    assert b.get_timer() is None


@pytest.mark.parametrize("hold", [1, 2])
def test_hold_time_of_one_or_two_is_refused(hold: int) -> None:
    with pytest.raises(ValueError):
        CatalystConfig(65001, "node-a", hold_time=hold)
    _, b = pair()
    b.start(0.0)
    bad = m.Open(my_asn=65001, bgp_identifier="node-a", hold_time=hold)
    note = sent_notification(b.receive_data(encode_frame(m.encode(bad)), 0.0))
    assert (note.code, note.subcode) == (2, 6)


def test_certificate_name_must_match_bgp_identifier() -> None:
    a, b = pair(b_sees="someone-else")
    _, b_events = establish(a, b)
    note = sent_notification(b_events)
    assert (note.code, note.subcode) == (2, 3)
    assert not any(isinstance(e, SessionEstablished) for e in b_events)


def test_asn_policy() -> None:
    policy = CatalystConfig(65002, "node-b", permitted=(Peer(65009),))
    a, b = pair(b=policy)
    _, b_events = establish(a, b)
    assert (sent_notification(b_events).subcode) == 2
    allowed = CatalystConfig(65002, "node-b", permitted=(Peer(65001, "node-a"),))
    a, b = pair(b=allowed)
    _, b_events = establish(a, b)
    assert any(isinstance(e, SessionEstablished) for e in b_events)
    pinned = CatalystConfig(65002, "node-b", permitted=(Peer(65001, "node-z"),))
    a, b = pair(b=pinned)
    _, b_events = establish(a, b)
    assert sent_notification(b_events).subcode == 2


SECRETS = {"k1": b"correct horse battery staple"}


def test_psk_proof_accepted() -> None:
    a_cfg = CatalystConfig(65001, "node-a", psk_secrets=SECRETS, psk_key_id="k1")
    b_cfg = CatalystConfig(65002, "node-b", psk_secrets=SECRETS, psk_key_id="k1", require_psk=True)
    a, b = pair(a_cfg, b_cfg)
    a_events, b_events = establish(a, b)
    assert any(isinstance(e, SessionEstablished) for e in a_events)
    assert any(isinstance(e, SessionEstablished) for e in b_events)


@pytest.mark.parametrize(
    ("a_cfg", "b_cfg", "subcode"),
    [
        (  # the receiver does not know the key id
            CatalystConfig(65001, "node-a", psk_secrets={"k9": b"x"}, psk_key_id="k9"),
            CatalystConfig(65002, "node-b", psk_secrets=SECRETS),
            m.PSK_UNKNOWN_KEY,
        ),
        (  # same key id, another secret
            CatalystConfig(65001, "node-a", psk_secrets={"k1": b"wrong"}, psk_key_id="k1"),
            CatalystConfig(65002, "node-b", psk_secrets=SECRETS),
            m.PSK_BAD_PROOF,
        ),
        (  # no PSK where one is required
            CatalystConfig(65001, "node-a"),
            CatalystConfig(65002, "node-b", psk_secrets=SECRETS, require_psk=True),
            m.PSK_REQUIRED,
        ),
    ],
)
def test_psk_failures(a_cfg: CatalystConfig, b_cfg: CatalystConfig, subcode: int) -> None:
    a, b = pair(a_cfg, b_cfg)
    _, b_events = establish(a, b)
    note = sent_notification(b_events)
    assert (note.code, note.subcode) == (2, subcode)


def test_psk_open_replayed_on_another_session_fails() -> None:
    a_cfg = CatalystConfig(65001, "node-a", psk_secrets=SECRETS, psk_key_id="k1")
    b_cfg = CatalystConfig(65002, "node-b", psk_secrets=SECRETS)
    a, _ = pair(a_cfg, b_cfg)
    a.start(0.0)
    recorded_open = a.data_to_send()
    # The same OPEN arrives on another TLS session: the exporter differs.
    _, other_b = pair(a_cfg, b_cfg, b_secret=b"session-2")
    other_b.start(0.0)
    note = sent_notification(other_b.receive_data(recorded_open, 0.0))
    assert note.subcode == m.PSK_BAD_PROOF


def test_psk_proof_cannot_be_reflected() -> None:
    """A responder that echoes the initiator's proof back does not pass as knowing it."""
    a_cfg = CatalystConfig(65001, "node-a", psk_secrets=SECRETS, psk_key_id="k1")
    a, _ = pair(a_cfg)
    a.start(0.0)
    [payload] = FrameDecoder(m.MAX_MESSAGE).feed(a.data_to_send())
    theirs = m.decode(payload)
    assert isinstance(theirs, m.Open)
    reflected = m.Open(65002, "node-b", 180, psk="k1", psk_proof=theirs.psk_proof)
    note = sent_notification(a.receive_data(encode_frame(m.encode(reflected)), 0.0))
    assert note.subcode == m.PSK_BAD_PROOF


def test_unexpected_messages_are_fsm_errors() -> None:
    a, b = pair()
    b.start(0.0)
    note = sent_notification(b.receive_data(encode_frame(m.encode(m.Keepalive())), 0.0))
    assert (note.code, note.subcode) == (5, 1)
    a, b = pair()
    establish(a, b)
    again = m.Open(65001, "node-a", 180)
    note = sent_notification(b.receive_data(encode_frame(m.encode(again)), 0.0))
    assert (note.code, note.subcode) == (5, 3)


def test_close_sends_cease() -> None:
    a, b = pair()
    establish(a, b)
    events = a.close("maintenance", 5.0)
    note = sent_notification(events)
    assert (note.code, note.subcode) == (6, 2)
    b_events = b.receive_data(a.data_to_send(), 5.0)
    closed = b_events[-1]
    assert isinstance(closed, ConnectionClosed)
    assert closed.by_peer
    assert not closed.error


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_gets_a_notification_never_an_exception(data: bytes) -> None:
    _, b = pair()
    b.start(0.0)
    events = b.receive_data(data, 0.0)
    assert not any(isinstance(e, SessionEstablished) for e in events)
    closes = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closes) <= 1
    if closes:
        assert events[-1] is closes[0]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_decode_raises_only_message_errors(data: bytes) -> None:
    with contextlib.suppress(MessageError):  # anything else fails the test
        m.decode(data)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"OPEN","type":"OPEN"}',
        b'{"type":"KEEPALIVE","x":1}',
        b'{"type":"OPEN","version":2,"myAsn":1,"bgpIdentifier":"a","holdTime":9}',
        b'{"type":"OPEN","version":1,"myAsn":true,"bgpIdentifier":"a","holdTime":9}',
        b'{"type":"NOTIFICATION","code":NaN}',
        b"[]",
        b'{"type":"UPDATE"}',
    ],
)
def test_decode_refuses_schema_breaks(payload: bytes) -> None:
    with pytest.raises(MessageError):
        m.decode(payload)


def test_psk_proof_to_a_node_without_secrets_is_ignored() -> None:
    """It cannot be checked, and nothing relies on it: the session goes on."""
    a_cfg = CatalystConfig(65001, "node-a", psk_secrets=SECRETS, psk_key_id="k1")
    a, b = pair(a_cfg, B)
    _, b_events = establish(a, b)
    assert SessionEstablished("node-a", 65001, 180) in b_events


def test_requiring_a_psk_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="require_psk"):
        CatalystConfig(65002, "node-b", require_psk=True)


# --- deadlines and hold-time floors (issue 15: a peer must not hold a session for free) ---


def responder(config: CatalystConfig = B) -> CatalystSession:
    """A responder whose OPEN is out at t=0, facing a peer "node-a" driven by hand."""
    b = CatalystSession(config, initiator=False, binding=FakeTls(frozenset({"node-a"})))
    b.start(0.0)
    b.data_to_send()  # our OPEN
    return b


def peer_open(hold: int) -> bytes:
    return encode_frame(m.encode(m.Open(my_asn=65001, bgp_identifier="node-a", hold_time=hold)))


def test_a_peer_that_never_sends_open_is_dropped_at_the_open_timeout() -> None:
    counters = Counters()
    b = CatalystSession(
        B, initiator=False, binding=FakeTls(frozenset({"node-a"})), counters=counters
    )
    b.start(100.0)
    assert b.get_timer() == 110.0  # open_timeout, 10 s by default (not RFC 4271's 240 s)
    assert b.handle_timer(109.9) == []
    note = sent_notification(b.handle_timer(110.0))
    assert (note.code, note.subcode) == (m.HOLD_TIMER_EXPIRED, 0)
    assert b.closed
    assert counters.hold_timer_expiries == 1


def test_the_open_timeout_is_configurable() -> None:
    b = responder(CatalystConfig(65002, "node-b", open_timeout=2.5))
    assert b.get_timer() == 2.5
    assert sent_notification(b.handle_timer(2.5)).code == m.HOLD_TIMER_EXPIRED


@pytest.mark.parametrize("bad", [0.0, -1.0, 241.0])
def test_open_timeout_must_be_positive_and_at_most_240_s(bad: float) -> None:
    with pytest.raises(ValueError, match="open_timeout"):
        CatalystConfig(65002, "node-b", open_timeout=bad)


def test_open_confirm_waits_open_timeout_for_the_keepalive_not_the_hold_time() -> None:
    b = responder()  # offers 180; the peer offers 180 too
    assert b.receive_data(peer_open(180), 5.0) == []
    assert b.state is State.OPEN_CONFIRM
    assert b.hold_time == 180
    assert b.get_timer() == 15.0  # OPEN at 5 s + open_timeout, not 5 + 180
    note = sent_notification(b.handle_timer(15.0))
    assert (note.code, note.subcode) == (m.HOLD_TIMER_EXPIRED, 0)
    # A hold time shorter than open_timeout is the deadline itself.
    short = responder(CatalystConfig(65002, "node-b", hold_time=6))
    short.receive_data(peer_open(6), 0.0)
    assert short.get_timer() == 2.0  # our keepalive (hold/3) comes first ...
    assert short.handle_timer(2.0) == []
    assert short.handle_timer(4.0) == []
    assert sent_notification(short.handle_timer(6.0)).code == m.HOLD_TIMER_EXPIRED


def test_open_confirm_keeps_a_deadline_when_the_hold_time_is_zero() -> None:
    b = responder(B_ZERO)
    assert b.receive_data(peer_open(0), 1.0) == []
    assert b.state is State.OPEN_CONFIRM
    assert b.hold_time == 0
    assert b.get_timer() == 11.0  # hold 0 turns off the hold timer, not this deadline
    note = sent_notification(b.handle_timer(11.0))
    assert (note.code, note.subcode) == (m.HOLD_TIMER_EXPIRED, 0)
    # The KEEPALIVE in time establishes the session, which then has no timer at all.
    b = responder(B_ZERO)
    b.receive_data(peer_open(0), 1.0)
    events = b.receive_data(encode_frame(m.encode(m.Keepalive())), 10.9)
    assert SessionEstablished("node-a", 65001, 0) in events
    assert b.get_timer() is None


@pytest.mark.parametrize("hold", [3, 4, 8])
def test_a_hold_time_below_the_minimum_is_refused(hold: int) -> None:
    b = responder()
    note = sent_notification(b.receive_data(peer_open(hold), 0.0))
    assert (note.code, note.subcode) == (m.OPEN_MESSAGE_ERROR, m.UNACCEPTABLE_HOLD_TIME)
    assert "minimum of 9 s" in note.message
    assert b.peer is None


def test_the_minimum_hold_time_is_accepted_and_configurable() -> None:
    b = responder()
    b.receive_data(peer_open(9), 0.0)
    assert b.state is State.OPEN_CONFIRM
    assert b.hold_time == 9
    strict = responder(CatalystConfig(65002, "node-b", min_hold_time=60))
    note = sent_notification(strict.receive_data(peer_open(59), 0.0))
    assert note.subcode == m.UNACCEPTABLE_HOLD_TIME
    assert (
        responder(CatalystConfig(65002, "node-b", min_hold_time=60)).receive_data(
            peer_open(60), 0.0
        )
        == []
    )


def test_the_minimum_never_refuses_what_we_offer_ourselves() -> None:
    b = responder(CatalystConfig(65002, "node-b", hold_time=5))  # below the default 9
    b.receive_data(peer_open(5), 0.0)
    assert b.state is State.OPEN_CONFIRM
    low = responder(CatalystConfig(65002, "node-b", hold_time=5))
    assert sent_notification(low.receive_data(peer_open(4), 0.0)).subcode == (
        m.UNACCEPTABLE_HOLD_TIME
    )


def test_a_zero_hold_time_is_refused_unless_allowed() -> None:
    b = responder()
    note = sent_notification(b.receive_data(peer_open(0), 0.0))
    assert (note.code, note.subcode) == (m.OPEN_MESSAGE_ERROR, m.UNACCEPTABLE_HOLD_TIME)
    assert "hold time 0" in note.message
    allowed = responder(B_ZERO)
    allowed.receive_data(peer_open(0), 0.0)
    assert allowed.state is State.OPEN_CONFIRM
    # A node that offers 0 itself has no hold timer whatever the peer says.
    own_zero = responder(CatalystConfig(65002, "node-b", hold_time=0))
    own_zero.receive_data(peer_open(0), 0.0)
    assert own_zero.state is State.OPEN_CONFIRM


def test_a_refused_hold_time_reaches_the_initiator_as_2_6() -> None:
    a, b = pair(CatalystConfig(65001, "node-a", hold_time=3))
    a_events, b_events = establish(a, b)
    assert sent_notification(b_events).subcode == m.UNACCEPTABLE_HOLD_TIME
    [received] = [
        e for e in a_events if isinstance(e, NotificationEvent) and e.direction == "received"
    ]
    assert (received.code, received.subcode) == (m.OPEN_MESSAGE_ERROR, m.UNACCEPTABLE_HOLD_TIME)


@pytest.mark.parametrize("bad", [0, 1, 2, 65536])
def test_min_hold_time_must_be_3_to_65535(bad: int) -> None:
    with pytest.raises(ValueError, match="min_hold_time"):
        CatalystConfig(65002, "node-b", min_hold_time=bad)
