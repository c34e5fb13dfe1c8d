"""The peer's answer to a peer that holds none of the certificates it requires (issue 22):
said at once with an empty certificateResponse, or by silence past the grace
(``PeerConfig.certificate_grace_ms``), the held messages are dropped with
CertificatesMissingError and later ones are refused at once, until a certificate
validates. A property test checks that every general message ends exactly once."""

from __future__ import annotations

import pytest
from brc103_support import (
    CERT_TYPE,
    alice,
    bob,
    certifier,
    handshake,
    other_certifier,
    relay,
    seeded_random,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.errors import (
    Brc103Error,
    CertificatesMissingError,
    CertificatesTimeoutError,
    UnrequestedCertificateError,
)
from trustmesh.brc103.messages import RequestedCertificates
from trustmesh.brc103.peer import (
    MAX_SCALED_GRACE_MS,
    CertificatesReceived,
    Event,
    GeneralMessageReceived,
    HeldMessagesDropped,
    Peer,
    PeerConfig,
)
from trustmesh.brc103.revocation import LocalRevocationRegistry

A = alice().identity_key
B = bob().identity_key
REQUEST = RequestedCertificates((certifier().identity_key,), {CERT_TYPE: ("name",)})
GOOD = MasterCertificate.issue(certifier(), A, CERT_TYPE, {"name": "Alice"})
BAD = MasterCertificate.issue(other_certifier(), A, CERT_TYPE, {"name": "Mallory"})
TIMEOUT = 30_000
GRACE = 300


def world(grace: int | None = GRACE, started: int = 0) -> tuple[Peer, Peer]:
    """Bob asks alice for a certificate; alice answers only by hand."""
    a = Peer(alice(), PeerConfig(answer_certificate_requests=False), random=seeded_random("a"))
    b = Peer(
        bob(),
        PeerConfig(
            requested_certificates=REQUEST,
            certificate_timeout_ms=TIMEOUT,
            certificate_grace_ms=grace,
        ),
        revocation=LocalRevocationRegistry(),
        random=seeded_random("b"),
    )
    handshake(a, b, started)
    return a, b


def general(a: Peer, b: Peer, payload: bytes, now: int) -> list[Event]:
    return b.receive(relay(a.create_general(payload, identity_key=B)), now)


def answer(a: Peer, b: Peer, master: MasterCertificate | None, now: int) -> list[Event]:
    shown = [] if master is None else [master.reveal(alice(), B, ["name"])]
    return b.receive(relay(a.create_certificate_response(shown, identity_key=B)), now)


def dropped(events: list[Event]) -> list[HeldMessagesDropped]:
    return [e for e in events if isinstance(e, HeldMessagesDropped)]


def delivered(events: list[Event]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, GeneralMessageReceived)]


def test_a_silent_peer_is_given_up_after_the_grace() -> None:
    a, b = world()
    assert general(a, b, b"one", 10) == []
    assert b.get_timer() == 10 + GRACE
    assert general(a, b, b"two", 20) == []  # joins the hold, same deadline
    assert b.handle_timer(10 + GRACE - 1) == []
    [report] = dropped(b.handle_timer(10 + GRACE))
    assert [m.payload for m in report.messages] == [b"one", b"two"]
    assert isinstance(report.error, CertificatesMissingError)
    with pytest.raises(CertificatesMissingError):  # refused at once from now on
        general(a, b, b"three", 400)
    assert b.sessions.held_total == 0
    # A certificate shown later still opens the session.
    events = answer(a, b, GOOD, 500)
    assert [type(e) for e in events] == [CertificatesReceived]
    assert delivered(general(a, b, b"four", 600)) == [b"four"]


def test_the_grace_grows_with_a_slow_handshake() -> None:
    a, b = world(started=1_000)
    assert general(a, b, b"late", 2_000) == []  # a second after the handshake
    assert b.get_timer() == 2_000 + 2 * 1_000


def test_the_grace_grows_only_so_far_however_late_the_first_message() -> None:
    """The peer chooses when it sends its first message: one that waits 30 s after the
    handshake must not have it held for the whole certificate timeout (the bug: twice
    30 s, so the timeout)."""
    a, b = world(started=0)
    assert general(a, b, b"late", 30_000) == []
    assert b.get_timer() == 30_000 + MAX_SCALED_GRACE_MS
    [report] = dropped(b.handle_timer(30_000 + MAX_SCALED_GRACE_MS))
    assert isinstance(report.error, CertificatesMissingError)
    # A configured grace longer than the cap is kept as it is.
    a, b = world(grace=5_000, started=0)
    assert general(a, b, b"late", 30_000) == []
    assert b.get_timer() == 30_000 + 5_000


def test_a_held_message_can_be_let_go_without_an_event() -> None:
    a, b = world()
    one = relay(a.create_general(b"one", identity_key=B))
    two = relay(a.create_general(b"two", identity_key=B))
    assert b.receive(one, 10) == [] and b.receive(two, 11) == []
    assert b.unhold(one) and not b.unhold(one)
    assert b.sessions.held_total == len(b"two")
    assert b.unhold(two)
    assert b.sessions.held_total == 0
    assert b.handle_timer(10 + GRACE) == []  # nothing left to give up
    assert delivered(answer(a, b, GOOD, 20)) == []


def test_without_a_grace_a_silent_peer_waits_the_timeout() -> None:
    a, b = world(grace=None)
    assert general(a, b, b"one", 10) == []
    assert b.get_timer() == 10 + TIMEOUT
    [report] = dropped(b.handle_timer(10 + TIMEOUT))
    assert isinstance(report.error, CertificatesTimeoutError)
    assert general(a, b, b"two", 10 + TIMEOUT + 1) == []  # held again: it may still answer


def test_an_empty_answer_before_any_message_refuses_them_at_once() -> None:
    a, b = world(grace=None)
    [report] = dropped(answer(a, b, None, 5))
    assert report.messages == [] and isinstance(report.error, CertificatesMissingError)
    with pytest.raises(CertificatesMissingError):
        general(a, b, b"one", 6)
    assert b.get_timer() is None  # nothing held, nothing to time


def test_a_refused_certificate_leaves_the_grace_running() -> None:
    a, b = world()
    assert general(a, b, b"one", 10) == []
    with pytest.raises(UnrequestedCertificateError):
        answer(a, b, BAD, 20)
    [report] = dropped(b.handle_timer(10 + GRACE))
    assert isinstance(report.error, CertificatesMissingError)


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["general", "empty", "good", "bad", "wait"]),
        st.integers(min_value=1, max_value=2 * GRACE),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(actions=ACTIONS, grace=st.sampled_from([GRACE, None]))
def test_every_general_message_ends_exactly_once(
    actions: list[tuple[str, int]], grace: int | None
) -> None:
    """Whatever alice does, each of her messages is delivered, dropped or refused exactly
    once; none is held once she is known to have none or her certificate validated; the
    byte accounting always matches what is held."""
    a, b = world(grace)
    now, sent = 0, 0
    ended: dict[bytes, str] = {}
    validated = False

    def record(events: list[Event]) -> None:
        for payload in delivered(events):
            assert payload not in ended
            ended[payload] = "delivered"
        for report in dropped(events):
            for message in report.messages:
                assert message.payload not in ended
                ended[message.payload or b""] = "dropped"

    for action, step in actions:
        now += step
        record(b.handle_timer(now))
        session = b.session(identity_key=A)
        if action == "general":
            payload = b"m%d" % sent
            sent += 1
            try:
                record(general(a, b, payload, now))
            except CertificatesMissingError:
                assert session.certificates_missing
                ended[payload] = "refused"
        elif action == "wait":
            continue
        else:
            master = {"empty": None, "good": GOOD, "bad": BAD}[action]
            try:
                record(answer(a, b, master, now))
            except Brc103Error:
                assert action == "bad"
            validated = validated or action == "good"
        assert session.certificates_validated == validated
        if session.certificates_missing or validated:
            assert session.held == []
        assert b.sessions.held_total == sum(len(m.payload or b"") for m in session.held)
    record(b.handle_timer(now + TIMEOUT))
    assert sorted(ended) == sorted(b"m%d" % i for i in range(sent))
    assert b.sessions.held_total == 0
