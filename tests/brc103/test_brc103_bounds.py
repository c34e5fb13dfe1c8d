"""The bounds of the sans-IO BRC-103 peer (``PeerConfig`` and the session table).

Sessions are bounded three ways (all of them, the unproven ones, the remembered message
nonces) and a session carries a limited number of messages; messages held while a peer's
certificates are awaited are bounded per session and in all. Each bound is driven here
with small limits, by hand, through the wire form of every message:

- unproven sessions (made by unsigned initialRequests) go before proven ones, and a flood
  of initialRequests naming a key never displaces the session that key has proven;
- the nonce budget evicts other sessions, least recently used first, never the current
  one, and ``sessions.seen_total`` always equals the nonces the live sessions hold;
- a session that has carried ``max_session_messages`` ends, and a new handshake works;
- what an evicted session leaves unfinished (a pending handshake, held messages) is
  reported by the next ``receive()`` or ``handle_timer()``;
- ``sessions.held_total`` returns to 0 on every way out of a hold;
- ``max_held_total`` refuses (and a refusal changes nothing); an empty
  certificateResponse ends a hold at once; a certificate to show must be the wallet's.
"""

from __future__ import annotations

import pytest
from brc103_support import (
    CERT_TYPE,
    OUTPOINT,
    alice,
    bob,
    carol,
    certifier,
    edited,
    handshake,
    one,
    relay,
    seeded_random,
    wallet,
)

from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.errors import (
    CertificateError,
    CertificatesTimeoutError,
    SessionNotFoundError,
    UnexpectedMessageError,
)
from trustmesh.brc103.messages import AuthMessage, RequestedCertificates
from trustmesh.brc103.peer import (
    CertificatesReceived,
    Event,
    GeneralMessageReceived,
    HandshakeCompleted,
    HandshakeFailed,
    HeldMessagesDropped,
    Peer,
    PeerConfig,
)
from trustmesh.brc103.revocation import LocalRevocationRegistry
from trustmesh.brc103.sessions import Session
from trustmesh.brc103.wallet import Wallet

A = alice().identity_key
B = bob().identity_key
C = carol().identity_key
DAVE_KEY = "d5" * 32
REQUEST = RequestedCertificates((certifier().identity_key,), {CERT_TYPE: ("name",)})


def dave() -> Wallet:
    return wallet(DAVE_KEY)


def make_peer(owner: Wallet, config: PeerConfig | None = None, seed: str = "") -> Peer:
    return Peer(
        owner,
        config,
        revocation=LocalRevocationRegistry(),
        random=seeded_random(owner.identity_key + seed),
    )


def silent(owner: Wallet) -> Peer:
    """A peer that never answers certificate requests by itself (so the other side holds
    its messages)."""
    return make_peer(owner, PeerConfig(answer_certificate_requests=False))


def master_for(owner: Wallet) -> MasterCertificate:
    return MasterCertificate.issue(
        certifier(), owner.identity_key, CERT_TYPE, {"name": "N"}, revocation_outpoint=OUTPOINT
    )


def payloads(events: list[Event]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, GeneralMessageReceived)]


def send(sender: Peer, receiver: Peer, payload: bytes, now_ms: int) -> list[Event]:
    """A fresh general message from ``sender`` (its latest session with ``receiver``),
    received; the receiver's events."""
    message = sender.create_general(payload, identity_key=receiver.identity_key)
    return receiver.receive(relay(message), now_ms)


def prove(sender: Peer, receiver: Peer, now_ms: int) -> None:
    """Handshake ``sender`` → ``receiver`` and sign one message, so that the receiver's
    session is proven."""
    handshake(sender, receiver, now_ms)
    assert payloads(send(sender, receiver, b"proof", now_ms)) == [b"proof"]


def forge_initial_request(forger: Peer, identity_key: str, now_ms: int) -> AuthMessage:
    """An initialRequest naming ``identity_key``: unsigned, so anyone can make it."""
    return edited(forger.initiate(now_ms), identityKey=identity_key)


def session_of(peer: Peer, identity_key: str) -> Session:
    (session,) = peer.sessions.sessions_of(identity_key)
    return session


def assert_accounting(peer: Peer) -> None:
    """The table's totals are the sums over its live sessions."""
    sessions = list(peer.sessions)
    assert peer.sessions.seen_total == sum(len(s.seen_nonces) for s in sessions)
    assert peer.sessions.held_total == sum(s.held_bytes for s in sessions)
    assert all(s.held_bytes == sum(len(m.payload or b"") for m in s.held) for s in sessions)


def dropped(events: list[Event]) -> list[HeldMessagesDropped]:
    return [e for e in events if isinstance(e, HeldMessagesDropped)]


# --- unproven sessions --------------------------------------------------------------------


def test_unproven_sessions_are_bounded_on_their_own() -> None:
    b = make_peer(bob(), PeerConfig(max_sessions=10, max_unproven_sessions=2))
    a = make_peer(alice())
    prove(a, b, 0)
    forger = make_peer(carol())
    for now in range(1, 7):
        b.receive(relay(forger.initiate(now)), now)
        one(b.messages_to_send())
    unproven = [s for s in b.sessions if not s.peer_proven]
    assert len(unproven) == 2
    assert len(b.sessions) == 3
    assert [s.last_update_ms for s in unproven] == [5, 6]  # the oldest went first
    assert payloads(send(a, b, b"alice is still here", 10)) == [b"alice is still here"]
    assert_accounting(b)


def test_a_full_table_evicts_an_unproven_session_before_a_proven_one() -> None:
    """docs 5: unproven sessions "are evicted before proven ones". Here the table is full
    but the unproven ones are under their own cap: the next unsigned initialRequest must
    push out the older unproven session, not alice's proven one (least recently used
    overall)."""
    b = make_peer(bob(), PeerConfig(max_sessions=3, max_unproven_sessions=2))
    a, c = make_peer(alice()), make_peer(carol())
    prove(a, b, 0)
    prove(c, b, 1)
    forger = make_peer(dave())
    b.receive(relay(forger.initiate(2)), 2)  # the table is now full (one unproven)
    b.receive(relay(forger.initiate(3)), 3)
    b.messages_to_send()
    assert len(b.sessions) == 3
    assert sorted(s.peer_identity_key or "" for s in b.sessions if s.peer_proven) == sorted(
        [A, C]
    ), "a proven session was evicted while an unproven one was left"
    assert payloads(send(a, b, b"alice", 4)) == [b"alice"]
    assert payloads(send(c, b, b"carol", 5)) == [b"carol"]


@pytest.mark.parametrize(
    "config",
    [PeerConfig(), PeerConfig(max_sessions=8, max_unproven_sessions=4)],
    ids=["default bounds", "small bounds"],
)
def test_a_flood_of_initial_requests_naming_alice_does_not_displace_her(
    config: PeerConfig,
) -> None:
    b = make_peer(bob(), config)
    a = make_peer(alice())
    prove(a, b, 0)
    real = session_of(b, A)
    forger = make_peer(carol())
    for now in range(1, 41):
        events = b.receive(forge_initial_request(forger, A, now), now)
        assert all(e.session_nonce != real.session_nonce for e in events)
        one(b.messages_to_send())  # each initialResponse goes to the forger
    others = [s for s in b.sessions.sessions_of(A) if s is not real]
    assert len(others) == min(40, config.max_unproven_sessions)
    assert not any(s.peer_proven for s in others)
    assert b.sessions.get(real.session_nonce) is real
    # Bob's messages to "alice" still go on the session alice proved, and she takes them.
    reply = b.create_general(b"to the real alice", identity_key=A)
    assert reply.your_nonce == a.session(identity_key=B).session_nonce
    assert payloads(a.receive(relay(reply), 50)) == [b"to the real alice"]
    assert payloads(send(a, b, b"and back", 51)) == [b"and back"]
    assert_accounting(b)


# --- the nonce budget ---------------------------------------------------------------------


def test_the_nonce_budget_evicts_the_least_recently_used_other_session() -> None:
    b = make_peer(bob(), PeerConfig(max_seen_nonces=4))
    a, c = make_peer(alice()), make_peer(carol())
    prove(c, b, 0)  # carol: 1 nonce, used first
    prove(a, b, 1)  # alice: 1 nonce
    assert payloads(send(a, b, b"2", 2)) == [b"2"]
    assert payloads(send(a, b, b"3", 3)) == [b"3"]
    assert b.sessions.seen_total == 4
    carol_nonce = session_of(b, C).session_nonce
    events = send(a, b, b"over budget", 4)
    assert payloads(events) == [b"over budget"]
    (report,) = dropped(events)
    assert (report.session_nonce, report.identity_key, report.messages) == (carol_nonce, C, [])
    assert isinstance(report.error, SessionNotFoundError)
    assert b.sessions.get(carol_nonce) is None
    assert b.sessions.seen_total == 4
    assert_accounting(b)
    with pytest.raises(SessionNotFoundError):
        send(c, b, b"carol is gone", 5)
    assert payloads(send(a, b, b"alice goes on", 6)) == [b"alice goes on"]
    assert_accounting(b)


def test_the_nonce_budget_never_evicts_the_current_session() -> None:
    """Alice's session is the least recently used one when her message breaks the budget:
    carol's goes instead."""
    b = make_peer(bob(), PeerConfig(max_seen_nonces=4))
    a, c = make_peer(alice()), make_peer(carol())
    prove(a, b, 0)
    assert payloads(send(a, b, b"a2", 1)) == [b"a2"]
    prove(c, b, 2)
    assert payloads(send(c, b, b"c2", 3)) == [b"c2"]
    assert [s.peer_identity_key for s in b.sessions] == [A, C]  # alice is the oldest
    events = send(a, b, b"a3", 4)
    assert payloads(events) == [b"a3"]
    assert [r.identity_key for r in dropped(events)] == [C]
    assert [s.peer_identity_key for s in b.sessions] == [A]
    assert b.sessions.seen_total == 3
    assert_accounting(b)


def test_one_session_alone_may_pass_the_nonce_budget() -> None:
    """With no other session to evict the current one keeps working (its own length is
    bounded by max_session_messages) and the totals stay right."""
    b = make_peer(bob(), PeerConfig(max_seen_nonces=2))
    a = make_peer(alice())
    handshake(a, b, 0)
    for index in range(5):
        assert payloads(send(a, b, b"%d" % index, index)) == [b"%d" % index]
    assert b.sessions.seen_total == 5
    assert_accounting(b)
    b.forget(session_of(b, A).session_nonce)
    assert b.sessions.seen_total == 0


def test_session_limits_must_be_positive() -> None:
    for config in (
        PeerConfig(max_sessions=0),
        PeerConfig(max_unproven_sessions=0),
        PeerConfig(max_seen_nonces=0),
    ):
        with pytest.raises(ValueError, match="at least 1"):
            Peer(bob(), config)


# --- messages per session -----------------------------------------------------------------


def test_a_session_ends_after_max_session_messages_and_a_new_handshake_works() -> None:
    b = make_peer(bob(), PeerConfig(max_session_messages=3))
    a = make_peer(alice())
    handshake(a, b, 0)
    first = session_of(b, A).session_nonce
    assert payloads(send(a, b, b"1", 1)) == [b"1"]
    assert payloads(send(a, b, b"2", 2)) == [b"2"]
    assert b.sessions.seen_total == 2
    assert payloads(send(a, b, b"3", 3)) == [b"3"]  # the last one is still delivered
    assert b.sessions.get(first) is None
    assert b.sessions.seen_total == 0
    assert len(b.sessions) == 0
    with pytest.raises(SessionNotFoundError):
        send(a, b, b"4", 4)
    with pytest.raises(SessionNotFoundError):
        b.create_general(b"to alice", identity_key=A)
    # Alice handshakes again, as reference clients do on "session not found".
    handshake(a, b, 5)
    assert session_of(b, A).session_nonce != first
    assert payloads(send(a, b, b"again", 6)) == [b"again"]
    reply = b.create_general(b"reply", identity_key=A)
    assert payloads(a.receive(relay(reply), 7)) == [b"reply"]
    assert_accounting(b)


def test_certificate_messages_count_towards_max_session_messages() -> None:
    b = make_peer(bob(), PeerConfig(max_session_messages=2, certificates=[master_for(bob())]))
    a = make_peer(alice())
    handshake(a, b, 0)
    b.receive(relay(a.create_certificate_request(REQUEST, identity_key=B)), 1)
    (received,) = a.receive(relay(one(b.messages_to_send())), 1)  # bob's certificate
    assert isinstance(received, CertificatesReceived)
    assert len(b.sessions) == 1
    assert payloads(send(a, b, b"second", 2)) == [b"second"]
    assert len(b.sessions) == 0


# --- evictions are reported ---------------------------------------------------------------


def test_an_evicted_pending_handshake_is_reported_by_the_next_timer_call() -> None:
    a = make_peer(alice(), PeerConfig(max_sessions=2))
    first, _, _ = a.initiate(0), a.initiate(1), a.initiate(2)
    (failed,) = a.handle_timer(3)  # long before any handshake deadline
    assert isinstance(failed, HandshakeFailed)
    assert failed.session_nonce == first.initial_nonce
    assert isinstance(failed.error, SessionNotFoundError)
    assert a.handle_timer(4) == []  # reported once
    # An answer to the evicted handshake finds no session.
    b = make_peer(bob())
    b.receive(relay(first), 5)
    with pytest.raises(SessionNotFoundError):
        a.receive(relay(one(b.messages_to_send())), 6)


def test_an_evicted_pending_handshake_is_reported_by_the_next_receive() -> None:
    a, b = make_peer(alice(), PeerConfig(max_sessions=2)), make_peer(bob())
    first = a.initiate(0)
    second = a.initiate(1)
    b.receive(relay(second), 1)
    response = one(b.messages_to_send())
    a.initiate(2)  # evicts the first
    events = a.receive(relay(response), 3)
    assert [type(e) for e in events] == [HandshakeFailed, HandshakeCompleted]
    assert events[0].session_nonce == first.initial_nonce
    assert events[1].session_nonce == second.initial_nonce
    assert a.handle_timer(4) == []


def holding_bob(config: PeerConfig) -> tuple[Peer, Peer]:
    """Bob asks for certificates (``config`` + REQUEST); alice never shows any, so bob
    holds her general messages."""
    b = make_peer(bob(), config)
    b.config.requested_certificates = REQUEST
    a = silent(alice())
    handshake(a, b, 0)
    return a, b


def test_an_evicted_session_reports_its_held_messages_from_receive() -> None:
    a, b = holding_bob(PeerConfig(max_sessions=2))
    assert send(a, b, b"held one", 1) == []
    assert send(a, b, b"held two", 2) == []
    c = silent(carol())
    handshake(c, b, 3)
    assert send(c, b, b"carol held", 4) == []  # carol's session is proven and newer
    assert b.sessions.held_total == len(b"held one" + b"held two" + b"carol held")
    alice_nonce = session_of(b, A).session_nonce
    events = b.receive(relay(make_peer(dave()).initiate(5)), 5)
    (report,) = dropped(events)
    assert report.session_nonce == alice_nonce and report.identity_key == A
    assert [m.payload for m in report.messages] == [b"held one", b"held two"]
    assert isinstance(report.error, SessionNotFoundError)
    assert b.sessions.held_total == len(b"carol held")
    assert_accounting(b)
    # Carol's hold is untouched: her certificate releases it.
    shown = master_for(carol()).reveal(carol(), B, ["name"])
    events = b.receive(relay(c.create_certificate_response([shown], identity_key=B)), 6)
    assert payloads(events) == [b"carol held"]
    assert b.sessions.held_total == 0


def test_an_evicted_session_reports_its_held_messages_from_the_timer() -> None:
    a, b = holding_bob(PeerConfig(max_sessions=1))
    assert send(a, b, b"held", 1) == []
    b.initiate(2)  # bob's own handshake takes the only place
    events = b.handle_timer(3)
    (report,) = dropped(events)
    assert report.identity_key == A
    assert [m.payload for m in report.messages] == [b"held"]
    assert b.sessions.held_total == 0
    assert b.handle_timer(4) == []
    assert_accounting(b)


# --- held messages: accounting and bounds -------------------------------------------------


def test_held_total_returns_to_zero_when_certificates_release_the_hold() -> None:
    a, b = holding_bob(PeerConfig())
    assert send(a, b, b"12345", 1) == []
    assert send(a, b, b"678", 2) == []
    assert b.sessions.held_total == 8
    shown = master_for(alice()).reveal(alice(), B, ["name"])
    events = b.receive(relay(a.create_certificate_response([shown], identity_key=B)), 3)
    assert [type(e) for e in events] == [
        CertificatesReceived,
        GeneralMessageReceived,
        GeneralMessageReceived,
    ]
    assert b.sessions.held_total == 0
    assert_accounting(b)


def test_held_total_returns_to_zero_at_the_certificate_timeout() -> None:
    a, b = holding_bob(PeerConfig(certificate_timeout_ms=100))
    assert send(a, b, b"12345", 1) == []
    (report,) = b.handle_timer(101)
    assert isinstance(report, HeldMessagesDropped)
    assert isinstance(report.error, CertificatesTimeoutError)
    assert b.sessions.held_total == 0
    assert_accounting(b)


def test_held_total_returns_to_zero_at_idle_expiry() -> None:
    a, b = holding_bob(PeerConfig(session_idle_ms=100, certificate_timeout_ms=10_000))
    assert send(a, b, b"12345", 10) == []
    events: list[Event] = []
    while (deadline := b.get_timer()) is not None and deadline <= 200:
        events += b.handle_timer(deadline)
    (report,) = dropped(events)
    assert [m.payload for m in report.messages] == [b"12345"]
    assert len(b.sessions) == 0
    assert b.sessions.held_total == 0


def test_held_total_returns_to_zero_when_the_session_is_forgotten() -> None:
    a, b = holding_bob(PeerConfig())
    assert send(a, b, b"12345", 1) == []
    b.forget(session_of(b, A).session_nonce)
    assert b.sessions.held_total == 0
    assert b.sessions.seen_total == 0


def test_a_session_ending_at_its_message_limit_reports_its_held_messages() -> None:
    """The message limit drops a session like an eviction does: what it held must be
    reported (docs 5: held messages are always reported or delivered), and the totals
    go back to 0."""
    a, b = holding_bob(PeerConfig(max_session_messages=2))
    assert send(a, b, b"held one", 1) == []
    events = send(a, b, b"held two", 2)  # the session's last message
    assert len(b.sessions) == 0
    assert b.sessions.held_total == 0
    assert b.sessions.seen_total == 0
    reported = [m.payload for r in dropped(events + b.handle_timer(3)) for m in r.messages]
    assert reported == [b"held one", b"held two"]


def test_the_global_held_bound_refuses_and_changes_nothing() -> None:
    b = make_peer(
        bob(),
        PeerConfig(requested_certificates=REQUEST, max_held_total=100, max_held_bytes=95),
    )
    a, c = silent(alice()), silent(carol())
    handshake(a, b, 0)
    handshake(c, b, 0)
    assert send(a, b, b"a" * 60, 1) == []
    refused = relay(c.create_general(b"c" * 50, identity_key=B))
    with pytest.raises(UnexpectedMessageError):
        b.receive(refused, 2)
    assert b.sessions.held_total == 60
    carol_session = session_of(b, C)
    assert carol_session.held == [] and carol_session.seen_nonces == set()
    assert send(c, b, b"c" * 40, 3) == []  # exactly at the bound
    assert b.sessions.held_total == 100
    with pytest.raises(UnexpectedMessageError):
        send(c, b, b"c", 4)
    # Alice's certificate frees room: the refused message is taken now (it was not
    # recorded as seen), and held in order after carol's first.
    shown = master_for(alice()).reveal(alice(), B, ["name"])
    b.receive(relay(a.create_certificate_response([shown], identity_key=B)), 5)
    assert b.sessions.held_total == 40
    assert b.receive(refused, 6) == []
    assert [m.payload for m in carol_session.held] == [b"c" * 40, b"c" * 50]
    assert_accounting(b)


def test_the_per_session_held_bounds() -> None:
    a, b = holding_bob(PeerConfig(max_held_messages=2, max_held_bytes=10))
    assert send(a, b, b"12345", 1) == []
    with pytest.raises(UnexpectedMessageError):
        send(a, b, b"123456", 2)  # 11 bytes held would pass max_held_bytes
    assert send(a, b, b"12345", 3) == []
    with pytest.raises(UnexpectedMessageError):
        send(a, b, b"", 4)  # a third message passes max_held_messages
    assert b.sessions.held_total == 10
    assert_accounting(b)


def test_an_empty_certificate_response_ends_the_hold_at_once() -> None:
    a, b = holding_bob(PeerConfig(certificate_timeout_ms=1000))
    assert send(a, b, b"waiting", 1) == []
    assert b.get_timer() == 1001
    events = b.receive(relay(a.create_certificate_response([], identity_key=B)), 2)
    (report,) = events
    assert isinstance(report, HeldMessagesDropped)
    assert report.identity_key == A
    assert [m.payload for m in report.messages] == [b"waiting"]
    assert isinstance(report.error, CertificateError)
    assert b.sessions.held_total == 0
    assert b.handle_timer(1001) == []  # nothing reported twice at the old deadline
    assert_accounting(b)


# --- certificates we show -----------------------------------------------------------------


def test_a_certificate_to_show_must_be_issued_to_the_wallet() -> None:
    with pytest.raises(ValueError, match="this wallet"):
        Peer(bob(), PeerConfig(certificates=[master_for(alice())]))
    with pytest.raises(ValueError, match="this wallet"):
        Peer(bob(), PeerConfig(certificates=[master_for(bob()), master_for(carol())]))
    assert Peer(bob(), PeerConfig(certificates=[master_for(bob())])).identity_key == B
