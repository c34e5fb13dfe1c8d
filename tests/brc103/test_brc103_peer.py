"""The sans-IO BRC-103 peer, driven by hand: every message goes through its wire form
(``parse_message_bytes(m.to_bytes())``) from one peer to the other.

Covers the handshake both ways, general messages, several sessions per peer, the
certificate exchange on every path, the timers, and each refusal: a refused message
raises its typed error and leaves the session as it was, so the next good message works.
"""

from __future__ import annotations

import base64
import json

import pytest
from brc103_support import (
    CERT_TYPE,
    OTHER_TYPE,
    OUTPOINT,
    alice,
    bob,
    carol,
    certifier,
    edited,
    handshake,
    one,
    other_certifier,
    relay,
    seeded_random,
    wire_json,
)

from trustmesh.brc103.certificates import MasterCertificate, VerifiableCertificate
from trustmesh.brc103.encoding import b64encode
from trustmesh.brc103.errors import (
    Brc103Error,
    CertificateError,
    CertificateRevokedError,
    CertificatesTimeoutError,
    HandshakeTimeoutError,
    IdentityMismatchError,
    InvalidProtocolIdError,
    MalformedMessageError,
    MessageSignatureError,
    NonceError,
    ReplayError,
    SessionNotFoundError,
    UnexpectedMessageError,
    UnrequestedCertificateError,
    UnsupportedVersionError,
)
from trustmesh.brc103.messages import (
    AuthMessage,
    MessageType,
    RequestedCertificates,
    parse_message,
    parse_message_bytes,
)
from trustmesh.brc103.nonces import create_nonce
from trustmesh.brc103.peer import (
    SIGNATURE_PROTOCOL,
    CertificatesReceived,
    CertificatesRequested,
    Event,
    GeneralMessageReceived,
    HandshakeCompleted,
    HandshakeFailed,
    HeldMessagesDropped,
    Peer,
    PeerConfig,
)
from trustmesh.brc103.revocation import LocalRevocationRegistry
from trustmesh.brc103.wallet import Wallet

A = alice().identity_key
B = bob().identity_key
C = carol().identity_key
REQUEST = RequestedCertificates((certifier().identity_key,), {CERT_TYPE: ("name",)})


def make_peer(wallet: Wallet, config: PeerConfig | None = None) -> Peer:
    return Peer(
        wallet,
        config,
        revocation=LocalRevocationRegistry(),
        random=seeded_random(wallet.identity_key),
    )


def established(
    a_config: PeerConfig | None = None, b_config: PeerConfig | None = None
) -> tuple[Peer, Peer]:
    a, b = make_peer(alice(), a_config), make_peer(bob(), b_config)
    handshake(a, b)
    return a, b


def issue(
    subject: Wallet,
    fields: dict[str, str],
    *,
    by: Wallet | None = None,
    cert_type: str = CERT_TYPE,
    outpoint: str = OUTPOINT,
) -> MasterCertificate:
    return MasterCertificate.issue(
        by or certifier(),
        subject.identity_key,
        cert_type,
        fields,
        revocation_outpoint=outpoint,
    )


ALICE_CERT = issue(alice(), {"name": "Alice", "email": "alice@example.com"})
BOB_CERT = issue(bob(), {"name": "Bob", "email": "bob@example.com"})


def payloads(events: list[Event]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, GeneralMessageReceived)]


def assert_delivered(sender: Peer, receiver: Peer, payload: bytes, now_ms: int = 50) -> None:
    """A fresh general message from ``sender`` reaches ``receiver`` as one event."""
    message = sender.create_general(payload, identity_key=receiver.identity_key)
    (event,) = receiver.receive(relay(message), now_ms)
    assert isinstance(event, GeneralMessageReceived)
    assert event.payload == payload
    assert event.identity_key == sender.identity_key


def assert_session_usable(a: Peer, b: Peer) -> None:
    assert_delivered(a, b, b"still works a->b")
    assert_delivered(b, a, b"still works b->a")


# --- handshake and general messages ---------------------------------------------------


def test_handshake() -> None:
    a, b = make_peer(alice()), make_peer(bob())
    request = a.initiate(0)
    assert request.message_type is MessageType.INITIAL_REQUEST
    assert request.signature is None and request.identity_key == A
    assert b.receive(relay(request), 5) == []
    response = one(b.messages_to_send())
    assert response.message_type is MessageType.INITIAL_RESPONSE
    assert response.your_nonce == request.initial_nonce
    assert response.identity_key == B
    assert a.receive(relay(response), 7) == [HandshakeCompleted(request.initial_nonce or "", B)]
    assert a.messages_to_send() == [] and b.messages_to_send() == []

    mine, theirs = a.session(identity_key=B), b.session(identity_key=A)
    assert mine.session_nonce == request.initial_nonce == theirs.peer_nonce
    assert theirs.session_nonce == response.initial_nonce == mine.peer_nonce
    assert mine.is_authenticated and theirs.is_authenticated
    assert mine.initiator and not theirs.initiator
    assert mine.peer_identity_key == B and theirs.peer_identity_key == A


def test_handshake_both_ways_gives_two_sessions() -> None:
    a, b = make_peer(alice()), make_peer(bob())
    a_events, _, _ = handshake(a, b, 0)
    b_events, _, _ = handshake(b, a, 1)
    assert [type(e) for e in a_events] == [HandshakeCompleted]
    assert [type(e) for e in b_events] == [HandshakeCompleted]
    assert len(a.sessions.sessions_of(B)) == 2
    assert len(b.sessions.sessions_of(A)) == 2
    assert_session_usable(a, b)


def test_general_messages_both_ways_carry_the_session_identity() -> None:
    a, b = established()
    a_session, b_session = a.session(identity_key=B), b.session(identity_key=A)
    to_bob = a.create_general(b"ping", identity_key=B)
    assert to_bob.your_nonce == b_session.session_nonce
    (event,) = b.receive(relay(to_bob), 10)
    assert isinstance(event, GeneralMessageReceived)
    assert (event.session_nonce, event.identity_key, event.payload) == (
        b_session.session_nonce,
        A,
        b"ping",
    )
    to_alice = b.create_general(b"pong", session_nonce=b_session.session_nonce)
    (event,) = a.receive(relay(to_alice), 11)
    assert isinstance(event, GeneralMessageReceived)
    assert (event.session_nonce, event.identity_key, event.payload) == (
        a_session.session_nonce,
        B,
        b"pong",
    )
    empty = a.create_general(b"", identity_key=B)
    assert payloads(b.receive(relay(empty), 12)) == [b""]
    big = bytes(range(256)) * 64
    assert payloads(b.receive(relay(a.create_general(big, identity_key=B)), 13)) == [big]


def test_sending_without_a_session() -> None:
    a = make_peer(alice())
    with pytest.raises(SessionNotFoundError):
        a.create_general(b"x", identity_key=B)
    with pytest.raises(SessionNotFoundError):
        a.create_general(b"x", session_nonce=create_nonce(alice()))
    a.initiate(0, peer_identity_key=B)  # pending, not authenticated: not usable
    with pytest.raises(SessionNotFoundError):
        a.create_general(b"x", identity_key=B)


def test_several_sessions_and_a_rehandshake() -> None:
    a, b = make_peer(alice()), make_peer(bob())
    handshake(a, b, 0)
    old_a = a.session(identity_key=B).session_nonce
    old_b = b.session(identity_key=A).session_nonce
    handshake(a, b, 100)
    new_a = a.session(identity_key=B).session_nonce
    new_b = b.session(identity_key=A).session_nonce
    assert {old_a, new_a} == {s.session_nonce for s in a.sessions.sessions_of(B)}
    assert old_a != new_a and old_b != new_b

    # By identity: the newest session.
    fresh = a.create_general(b"new", identity_key=B)
    assert fresh.your_nonce == new_b
    (event,) = b.receive(relay(fresh), 101)
    assert isinstance(event, GeneralMessageReceived) and event.session_nonce == new_b
    # The old session still works when named.
    old = a.create_general(b"old", session_nonce=old_a)
    assert old.your_nonce == old_b
    (event,) = b.receive(relay(old), 102)
    assert isinstance(event, GeneralMessageReceived) and event.session_nonce == old_b
    reply = b.create_general(b"reply", session_nonce=new_b)
    (event,) = a.receive(relay(reply), 103)
    assert isinstance(event, GeneralMessageReceived)
    assert event.session_nonce == new_a and event.identity_key == B


def test_unsigned_initial_request_does_not_take_over_a_proven_session() -> None:
    """An initialRequest is unsigned: anyone can send one naming alice's key. Bob's
    session with the real alice (proven by her signed messages) must stay the one his
    messages to alice go on; otherwise one forged request cuts bob off from alice."""
    a, b = established()
    assert_delivered(a, b, b"alice proves herself", now_ms=10)
    forged = edited(make_peer(carol()).initiate(20), identityKey=A)
    b.receive(forged, 20)
    b.messages_to_send()  # the initialResponse goes to the forger
    assert len(b.sessions.sessions_of(A)) == 2
    reply = b.create_general(b"to the real alice", identity_key=A)
    assert reply.your_nonce == a.session(identity_key=B).session_nonce
    assert payloads(a.receive(relay(reply), 30)) == [b"to the real alice"]


def test_general_message_overtaking_the_initial_response() -> None:
    """The responder may send at once; the initiator refuses the message until its
    handshake completes, then takes the same message."""
    a, b = make_peer(alice()), make_peer(bob())
    b.receive(relay(a.initiate(0)), 0)
    response = one(b.messages_to_send())
    early = relay(b.create_general(b"early", identity_key=A))
    with pytest.raises(UnexpectedMessageError):
        a.receive(early, 1)
    a.receive(relay(response), 2)
    assert payloads(a.receive(early, 3)) == [b"early"]


def test_max_sessions_evicts_the_oldest() -> None:
    b = make_peer(bob(), PeerConfig(max_sessions=2))
    a, c = make_peer(alice()), make_peer(carol())
    handshake(a, b, 0)
    handshake(c, b, 1)
    handshake(c, b, 2)  # evicts alice's session at bob
    with pytest.raises(SessionNotFoundError):
        b.receive(relay(a.create_general(b"x", identity_key=B)), 3)
    assert payloads(b.receive(relay(c.create_general(b"y", identity_key=B)), 4)) == [b"y"]


def test_forget_a_session() -> None:
    a, b = established()
    b.forget(b.session(identity_key=A).session_nonce)
    with pytest.raises(SessionNotFoundError):
        b.receive(relay(a.create_general(b"x", identity_key=B)), 1)
    b.forget("unknown")  # no error


# --- certificate exchange -------------------------------------------------------------


def test_certificates_requested_by_the_responder() -> None:
    a = make_peer(alice(), PeerConfig(certificates=[ALICE_CERT]))
    b = make_peer(bob(), PeerConfig(requested_certificates=REQUEST))
    a_events, b_events, queued = handshake(a, b)
    assert [type(e) for e in a_events] == [HandshakeCompleted]
    assert b_events == []
    answer = one(queued)
    assert answer.message_type is MessageType.CERTIFICATE_RESPONSE
    (shown,) = answer.certificates or []
    assert list(shown.keyring) == ["name"]  # only the requested field is revealed

    # Bob may not send before the certificates validate; alice's messages wait at bob.
    with pytest.raises(UnexpectedMessageError):
        b.create_general(b"too early", identity_key=A)
    first = a.create_general(b"one", identity_key=B)
    second = a.create_general(b"two", identity_key=B)
    assert b.receive(relay(first), 1) == []
    assert b.receive(relay(second), 2) == []
    events = b.receive(relay(answer), 3)
    assert [type(e) for e in events] == [
        CertificatesReceived,
        GeneralMessageReceived,
        GeneralMessageReceived,
    ]
    received = events[0]
    assert isinstance(received, CertificatesReceived) and received.identity_key == A
    assert received.certificates[0].decrypted_fields == {"name": "Alice"}
    assert payloads(events) == [b"one", b"two"]  # in order
    assert b.session(identity_key=A).certificates_validated
    assert_session_usable(a, b)


def test_certificates_requested_by_the_initiator() -> None:
    a = make_peer(alice(), PeerConfig(requested_certificates=REQUEST))
    b = make_peer(bob(), PeerConfig(certificates=[BOB_CERT]))
    a_events, _, queued = handshake(a, b)
    assert queued == []
    assert [type(e) for e in a_events] == [HandshakeCompleted, CertificatesReceived]
    received = a_events[1]
    assert isinstance(received, CertificatesReceived)
    assert received.identity_key == B
    assert [c.decrypted_fields for c in received.certificates] == [{"name": "Bob"}]
    assert a.session(identity_key=B).certificates == received.certificates
    assert_session_usable(a, b)


def test_initiator_requirement_unmet_holds_and_times_out() -> None:
    """The responder has no certificate: the initiator holds its messages, then drops
    them at the certificate timeout."""
    a = make_peer(alice(), PeerConfig(requested_certificates=REQUEST, certificate_timeout_ms=500))
    b = make_peer(bob())
    a_events, _, _ = handshake(a, b, 0)
    assert [type(e) for e in a_events] == [HandshakeCompleted]
    held = b.create_general(b"held", identity_key=A)
    assert a.receive(relay(held), 10) == []
    assert a.get_timer() == 500
    assert a.handle_timer(499) == []
    (dropped,) = a.handle_timer(500)
    assert isinstance(dropped, HeldMessagesDropped)
    assert dropped.identity_key == B
    assert [m.payload for m in dropped.messages] == [b"held"]
    assert isinstance(dropped.error, CertificatesTimeoutError)


def test_adhoc_certificate_request_is_answered_automatically() -> None:
    a, b = established(b_config=PeerConfig(certificates=[BOB_CERT]))
    request = a.create_certificate_request(REQUEST, identity_key=B)
    assert request.message_type is MessageType.CERTIFICATE_REQUEST
    assert b.receive(relay(request), 1) == []
    answer = one(b.messages_to_send())
    assert answer.message_type is MessageType.CERTIFICATE_RESPONSE
    (event,) = a.receive(relay(answer), 2)
    assert isinstance(event, CertificatesReceived)
    assert event.certificates[0].decrypted_fields == {"name": "Bob"}
    assert_session_usable(a, b)


def test_empty_answer_to_a_certificate_request_is_reported() -> None:
    """Bob has no matching certificate and answers with an empty certificateResponse (as
    the reference does). Alice asked for certificates, so she holds bob's messages and
    may not send until they validate: the definitive "none" must reach her application
    as an event, not vanish (today she learns of it only if bob sends something and the
    hold times out, and her own sending stays blocked)."""
    a, b = established()
    b.receive(relay(a.create_certificate_request(REQUEST, identity_key=B)), 1)
    answer = one(b.messages_to_send())
    assert answer.certificates == []
    assert a.receive(relay(answer), 2) != []


def test_no_auto_answer_in_handshake_emits_certificates_requested() -> None:
    a = make_peer(alice(), PeerConfig(certificates=[ALICE_CERT], answer_certificate_requests=False))
    b = make_peer(bob(), PeerConfig(requested_certificates=REQUEST))
    a_events, _, queued = handshake(a, b)
    assert queued == []
    assert [type(e) for e in a_events] == [HandshakeCompleted, CertificatesRequested]
    asked = a_events[1]
    assert isinstance(asked, CertificatesRequested)
    assert asked.identity_key == B and asked.requested == REQUEST
    assert asked.session_nonce == a.session(identity_key=B).session_nonce
    # The application answers.
    shown = ALICE_CERT.reveal(alice(), B, ["name"])
    answer = a.create_certificate_response([shown], session_nonce=asked.session_nonce)
    (event,) = b.receive(relay(answer), 1)
    assert isinstance(event, CertificatesReceived)
    assert_session_usable(a, b)


def test_no_auto_answer_to_a_certificate_request() -> None:
    a, b = established(
        b_config=PeerConfig(certificates=[BOB_CERT], answer_certificate_requests=False)
    )
    (event,) = b.receive(relay(a.create_certificate_request(REQUEST, identity_key=B)), 1)
    assert isinstance(event, CertificatesRequested)
    assert event.identity_key == A and event.requested == REQUEST
    assert b.messages_to_send() == []


def test_no_auto_answer_as_responder() -> None:
    """answer_certificate_requests=False: the responder must not reveal fields in its
    initialResponse by itself; the application is asked (CertificatesRequested)."""
    a = make_peer(alice(), PeerConfig(requested_certificates=REQUEST))
    b = make_peer(bob(), PeerConfig(certificates=[BOB_CERT], answer_certificate_requests=False))
    b_events = b.receive(relay(a.initiate(0)), 0)
    response = one(b.messages_to_send())
    assert not response.certificates
    assert [type(e) for e in b_events] == [CertificatesRequested]


def test_certificate_with_integer_like_field_names() -> None:
    """JSON.stringify puts integer-like keys first: the signed text and the wire text
    differ in order, and the signature still verifies."""
    master = issue(alice(), {"name": "Alice", "10": "ten", "2": "two"})
    request = RequestedCertificates((certifier().identity_key,), {CERT_TYPE: ("name", "10", "2")})
    a = make_peer(alice(), PeerConfig(certificates=[master]))
    b = make_peer(bob(), PeerConfig(requested_certificates=request))
    _, _, queued = handshake(a, b)
    (event,) = b.receive(relay(one(queued)), 1)
    assert isinstance(event, CertificatesReceived)
    assert event.certificates[0].decrypted_fields == {"name": "Alice", "10": "ten", "2": "two"}


# --- timers ---------------------------------------------------------------------------


def test_handshake_timeout() -> None:
    a, b = make_peer(alice(), PeerConfig(handshake_timeout_ms=500)), make_peer(bob())
    request = a.initiate(0)
    b.receive(relay(request), 0)
    late = one(b.messages_to_send())
    assert a.get_timer() == 500
    assert a.handle_timer(499) == []
    (failed,) = a.handle_timer(500)
    assert isinstance(failed, HandshakeFailed)
    assert failed.session_nonce == request.initial_nonce
    assert isinstance(failed.error, HandshakeTimeoutError)
    assert a.get_timer() is None
    with pytest.raises(SessionNotFoundError):
        a.receive(relay(late), 600)


def test_completed_handshake_survives_its_old_deadline() -> None:
    a, b = make_peer(alice(), PeerConfig(handshake_timeout_ms=500)), make_peer(bob())
    handshake(a, b, 0)
    deadline = a.get_timer()
    assert a.handle_timer(deadline if deadline is not None else 500) == []
    assert_session_usable(a, b)


def test_certificate_timeout_drops_held_messages() -> None:
    a = make_peer(alice(), PeerConfig(answer_certificate_requests=False))
    b = make_peer(bob(), PeerConfig(requested_certificates=REQUEST, certificate_timeout_ms=1000))
    handshake(a, b, 0)
    held = a.create_general(b"waiting", identity_key=B)
    assert b.receive(relay(held), 10) == []
    assert b.get_timer() == 1010
    assert b.handle_timer(1009) == []
    (dropped,) = b.handle_timer(1010)
    assert isinstance(dropped, HeldMessagesDropped)
    assert dropped.identity_key == A
    assert dropped.session_nonce == b.session(identity_key=A).session_nonce
    assert [m.payload for m in dropped.messages] == [b"waiting"]
    assert isinstance(dropped.error, CertificatesTimeoutError)
    # Late certificates still validate; what follows is delivered.
    shown = ALICE_CERT.reveal(alice(), B, ["name"])
    events = b.receive(relay(a.create_certificate_response([shown], identity_key=B)), 2000)
    assert [type(e) for e in events] == [CertificatesReceived]
    assert_session_usable(a, b)


def test_session_idle_expiry() -> None:
    config = PeerConfig(session_idle_ms=1000)
    a, b = make_peer(alice()), make_peer(bob(), config)
    handshake(a, b, 0)
    assert b.get_timer() == 1000
    assert payloads(b.receive(relay(a.create_general(b"x", identity_key=B)), 500)) == [b"x"]
    assert b.handle_timer(1000) == []  # used at 500: not idle yet
    assert b.sessions.by_identity(A) is not None
    assert b.get_timer() == 1500
    assert b.handle_timer(1500) == []
    assert b.sessions.by_identity(A) is None
    assert b.get_timer() is None
    with pytest.raises(SessionNotFoundError):
        b.create_general(b"x", identity_key=A)
    with pytest.raises(SessionNotFoundError):
        b.receive(relay(a.create_general(b"y", identity_key=B)), 1600)


def test_idle_expiry_of_a_pending_handshake_reports_failure() -> None:
    """An initiator session dropped by the idle timer before its handshake completed
    must still end in HandshakeFailed: whoever waits on the handshake would hang."""
    a = make_peer(alice(), PeerConfig(session_idle_ms=100, handshake_timeout_ms=5000))
    request = a.initiate(0)
    events: list[Event] = []
    for _ in range(10):
        deadline = a.get_timer()
        if deadline is None:
            break
        events += a.handle_timer(deadline)
    assert [e.session_nonce for e in events if isinstance(e, HandshakeFailed)] == [
        request.initial_nonce
    ]


# --- refusals of general messages -----------------------------------------------------


def test_tampered_payload() -> None:
    a, b = established()
    good = a.create_general(b"pay 1", identity_key=B)
    with pytest.raises(MessageSignatureError):
        b.receive(edited(good, payload=list(b"pay 9")), 1)
    with pytest.raises(MessageSignatureError):
        b.receive(edited(good, signature=list((good.signature or b"")[:-1] + b"\0")), 1)
    assert payloads(b.receive(relay(good), 2)) == [b"pay 1"]  # its nonce was not burnt
    assert_session_usable(a, b)


def test_your_nonce_made_by_another_wallet() -> None:
    a, b = established()
    good = a.create_general(b"x", identity_key=B)
    with pytest.raises(NonceError):
        b.receive(edited(good, yourNonce=create_nonce(carol())), 1)
    assert payloads(b.receive(relay(good), 2)) == [b"x"]
    assert_session_usable(a, b)


def test_unknown_but_valid_own_nonce() -> None:
    a, b = established()
    good = a.create_general(b"x", identity_key=B)
    with pytest.raises(SessionNotFoundError):
        b.receive(edited(good, yourNonce=create_nonce(bob())), 1)
    assert payloads(b.receive(relay(good), 2)) == [b"x"]
    assert_session_usable(a, b)


def test_replayed_general_message() -> None:
    a, b = established()
    good = a.create_general(b"once", identity_key=B)
    assert payloads(b.receive(relay(good), 1)) == [b"once"]
    with pytest.raises(ReplayError):
        b.receive(relay(good), 2)
    assert_session_usable(a, b)


def test_replayed_certificate_messages() -> None:
    a, b = established(b_config=PeerConfig(certificates=[BOB_CERT]))
    request = relay(a.create_certificate_request(REQUEST, identity_key=B))
    b.receive(request, 1)
    answer = relay(one(b.messages_to_send()))
    with pytest.raises(ReplayError):
        b.receive(request, 2)
    assert b.messages_to_send() == []
    (event,) = a.receive(answer, 3)
    assert isinstance(event, CertificatesReceived)
    with pytest.raises(ReplayError):
        a.receive(answer, 4)
    assert_session_usable(a, b)


def test_held_messages_are_bounded() -> None:
    a = make_peer(alice(), PeerConfig(answer_certificate_requests=False))
    b = make_peer(bob(), PeerConfig(requested_certificates=REQUEST))
    handshake(a, b)
    for index in range(PeerConfig().max_held_messages):
        assert b.receive(relay(a.create_general(b"%d" % index, identity_key=B)), 1) == []
    with pytest.raises(UnexpectedMessageError):
        b.receive(relay(a.create_general(b"one too many", identity_key=B)), 2)
    shown = ALICE_CERT.reveal(alice(), B, ["name"])
    events = b.receive(relay(a.create_certificate_response([shown], identity_key=B)), 3)
    assert payloads(events) == [b"%d" % i for i in range(PeerConfig().max_held_messages)]


def test_swapped_identity_key() -> None:
    a, b = established()
    good = a.create_general(b"x", identity_key=B)
    with pytest.raises(IdentityMismatchError):
        b.receive(edited(good, identityKey=C), 1)
    assert payloads(b.receive(relay(good), 2)) == [b"x"]
    assert_session_usable(a, b)


def test_validly_signed_message_for_another_peers_session() -> None:
    """Carol signs correctly for herself but names bob's session with alice."""
    a, b = established()
    bob_session = b.session(identity_key=A).session_nonce
    nonce = b64encode(bytes(32))
    forged = AuthMessage(
        message_type=MessageType.GENERAL,
        identity_key=C,
        nonce=nonce,
        your_nonce=bob_session,
        payload=b"from carol",
        signature=carol().create_signature(
            b"from carol", SIGNATURE_PROTOCOL, f"{nonce} {bob_session}", B
        ),
    )
    with pytest.raises(IdentityMismatchError):
        b.receive(relay(forged), 1)
    assert_session_usable(a, b)


def test_wrong_version() -> None:
    a, b = established()
    good = a.create_general(b"x", identity_key=B)
    obj = wire_json(good)
    obj["version"] = "0.2"
    with pytest.raises(UnsupportedVersionError):
        parse_message_bytes(json.dumps(obj).encode())
    assert payloads(b.receive(relay(good), 1)) == [b"x"]


# --- refusals of certificates ---------------------------------------------------------


def cert_world(
    revocation: LocalRevocationRegistry | None = None,
) -> tuple[Peer, Peer]:
    """Bob asks for a "name" from the certifier; alice answers by hand."""
    a = make_peer(alice(), PeerConfig(answer_certificate_requests=False))
    b = Peer(
        bob(),
        PeerConfig(requested_certificates=REQUEST),
        revocation=revocation if revocation is not None else LocalRevocationRegistry(),
        random=seeded_random("bob-cert-world"),
    )
    a_events, _, _ = handshake(a, b)
    assert [type(e) for e in a_events] == [HandshakeCompleted, CertificatesRequested]
    return a, b


def send_certificates(a: Peer, certificates: list[VerifiableCertificate]) -> AuthMessage:
    return relay(a.create_certificate_response(certificates, identity_key=B))


def assert_good_certificate_still_accepted(a: Peer, b: Peer) -> None:
    held = a.create_general(b"held", identity_key=B)
    assert b.receive(relay(held), 5) == []
    shown = ALICE_CERT.reveal(alice(), B, ["name"])
    events = b.receive(send_certificates(a, [shown]), 6)
    assert [type(e) for e in events] == [CertificatesReceived, GeneralMessageReceived]
    assert payloads(events) == [b"held"]
    assert_session_usable(a, b)


@pytest.mark.parametrize(
    "make_certificate",
    [
        lambda: issue(alice(), {"name": "A"}, by=other_certifier()).reveal(alice(), B, ["name"]),
        lambda: issue(alice(), {"name": "A"}, cert_type=OTHER_TYPE).reveal(alice(), B, ["name"]),
        lambda: ALICE_CERT.reveal(alice(), B, ["name", "email"]),
    ],
    ids=["certifier", "type", "field"],
)
def test_unrequested_certificate(make_certificate: object) -> None:
    a, b = cert_world()
    bad = make_certificate()  # type: ignore[operator]
    with pytest.raises(UnrequestedCertificateError):
        b.receive(send_certificates(a, [bad]), 1)
    # Nor does a good certificate carry a bad one through.
    good = ALICE_CERT.reveal(alice(), B, ["name"])
    with pytest.raises(UnrequestedCertificateError):
        b.receive(send_certificates(a, [good, bad]), 2)
    assert_good_certificate_still_accepted(a, b)


def test_certificate_of_someone_else() -> None:
    a, b = cert_world()
    carols = issue(carol(), {"name": "Carol"}).reveal(carol(), B, ["name"])
    with pytest.raises(CertificateError) as caught:
        b.receive(send_certificates(a, [carols]), 1)
    assert type(caught.value) is CertificateError
    assert_good_certificate_still_accepted(a, b)


def test_certificate_with_bad_signature() -> None:
    a, b = cert_world()
    shown = ALICE_CERT.reveal(alice(), B, ["name"])
    cert = shown.certificate
    forged_json = {**shown.to_json(), "signature": cert.signature[:-1].hex() + "00"}
    forged = VerifiableCertificate.from_json(forged_json)
    with pytest.raises(CertificateError):
        b.receive(send_certificates(a, [forged]), 1)
    assert_good_certificate_still_accepted(a, b)


def test_certificate_keyring_not_for_us() -> None:
    a, b = cert_world()
    for_carol = ALICE_CERT.reveal(alice(), C, ["name"])
    with pytest.raises(CertificateError):
        b.receive(send_certificates(a, [for_carol]), 1)
    assert_good_certificate_still_accepted(a, b)


def test_revoked_certificate() -> None:
    registry = LocalRevocationRegistry()
    revoked_outpoint = "cd" * 32 + ".3"
    registry.revoke(revoked_outpoint)
    a, b = cert_world(revocation=registry)
    revoked = issue(alice(), {"name": "Alice"}, outpoint=revoked_outpoint)
    with pytest.raises(CertificateRevokedError):
        b.receive(send_certificates(a, [revoked.reveal(alice(), B, ["name"])]), 1)
    assert_good_certificate_still_accepted(a, b)  # ALICE_CERT's outpoint is not revoked


# --- refusals of initial responses ----------------------------------------------------


def test_replayed_initial_response() -> None:
    a, b = make_peer(alice()), make_peer(bob())
    b.receive(relay(a.initiate(0)), 0)
    response = one(b.messages_to_send())
    a.receive(relay(response), 1)
    with pytest.raises(UnexpectedMessageError):
        a.receive(relay(response), 2)
    assert_session_usable(a, b)


def test_initial_response_from_another_key_than_expected() -> None:
    a = make_peer(alice())
    b, c = make_peer(bob()), make_peer(carol())
    request = a.initiate(0, peer_identity_key=B)
    c.receive(relay(request), 0)
    b.receive(relay(request), 0)
    with pytest.raises(IdentityMismatchError):
        a.receive(relay(one(c.messages_to_send())), 1)
    events = a.receive(relay(one(b.messages_to_send())), 2)
    assert events == [HandshakeCompleted(request.initial_nonce or "", B)]
    assert_session_usable(a, b)


def test_initial_response_with_bad_signature() -> None:
    a, b = make_peer(alice()), make_peer(bob())
    b.receive(relay(a.initiate(0)), 0)
    response = one(b.messages_to_send())
    signature = list(response.signature or b"")
    signature[-1] ^= 1
    with pytest.raises(MessageSignatureError):
        a.receive(edited(response, signature=signature), 1)
    # Claiming another identity breaks the signature as well.
    with pytest.raises(MessageSignatureError):
        a.receive(edited(response, identityKey=C), 1)
    a.receive(relay(response), 2)
    assert_session_usable(a, b)


def test_unrequested_certificates_in_initial_response() -> None:
    """Bob pushes a certificate alice never asked for: the initialResponse is refused."""
    a, b = make_peer(alice()), make_peer(bob(), PeerConfig(certificates=[BOB_CERT]))
    request = a.initiate(0)
    pushy = edited(request, requestedCertificates=REQUEST.to_json())
    b.receive(pushy, 0)
    response = one(b.messages_to_send())
    assert response.certificates
    with pytest.raises(UnrequestedCertificateError):
        a.receive(relay(response), 1)


# --- hostile identity keys and nonces -------------------------------------------------


def test_initial_request_from_a_key_off_the_curve() -> None:
    """A well-formed hex key that is no point must be refused as a BRC-103 error
    (MalformedMessageError at parse, or a Brc103Error from receive), never a crypto
    library error."""
    b = make_peer(bob())
    obj = wire_json(make_peer(alice()).initiate(0))
    obj["identityKey"] = "02" + "ff" * 32
    try:
        message = parse_message(obj)
    except MalformedMessageError:
        return
    with pytest.raises(Brc103Error):
        b.receive(message, 0)


@pytest.mark.parametrize("member", ["nonce", "yourNonce"])
def test_nonce_too_long_for_a_key_id(member: str) -> None:
    """Key IDs are ``nonce + " " + yourNonce``, at most 800 characters. A nonce that
    cannot fit is malformed (or refused as unverifiable), not an invalid protocol ID."""
    a, b = established()
    obj = wire_json(a.create_general(b"x", identity_key=B))
    obj[member] = base64.b64encode(bytes(700)).decode()  # 936 characters
    try:
        message = parse_message(obj)
    except MalformedMessageError:
        return
    with pytest.raises(Brc103Error) as caught:
        b.receive(message, 1)
    assert not isinstance(caught.value, InvalidProtocolIdError)


def test_initial_nonce_too_long_for_a_key_id() -> None:
    b = make_peer(bob())
    obj = wire_json(make_peer(alice()).initiate(0))
    obj["initialNonce"] = base64.b64encode(bytes(700)).decode()
    try:
        message = parse_message(obj)
    except MalformedMessageError:
        return
    with pytest.raises(Brc103Error) as caught:
        b.receive(message, 0)
    assert not isinstance(caught.value, InvalidProtocolIdError)
