"""The asyncio BRC-103 driver (AsyncPeer) over the in-memory transport: handshakes,
general messages both ways through listeners and ``receive()``, handshake and certificate
timeouts, bad messages reported (not fatal), certificate events, and a clean close."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import pytest

from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.errors import (
    CertificatesTimeoutError,
    HandshakeTimeoutError,
    IdentityMismatchError,
    MessageSignatureError,
    NonceError,
    ReplayError,
    SessionNotFoundError,
    UnexpectedMessageError,
)
from trustmesh.brc103.messages import AuthMessage, RequestedCertificates, parse_message_bytes
from trustmesh.brc103.nonces import create_nonce
from trustmesh.brc103.peer import (
    CertificatesReceived,
    CertificatesRequested,
    GeneralMessageReceived,
    Peer,
    PeerConfig,
)
from trustmesh.brc103.wallet import Wallet
from trustmesh.io.brc103 import AsyncPeer, MemoryTransport, MessageHandler
from trustmesh.wire.jsonwire import compact_json

T = TypeVar("T")
WAIT = 5.0  # upper bound on any single wait; each takes far less
ALICE = Wallet.from_hex("a1" * 32)
BOB = Wallet.from_hex("b2" * 32)
CAROL = Wallet.from_hex("c3" * 32)
CERTIFIER = Wallet.from_hex("d4" * 32)
CERT_TYPE = base64.b64encode(b"trustmesh async driver test typ!").decode()
REQUEST = RequestedCertificates((CERTIFIER.identity_key,), {CERT_TYPE: ("name",)})


def bob_certificate() -> MasterCertificate:
    return MasterCertificate.issue(
        CERTIFIER, BOB.identity_key, CERT_TYPE, {"name": "Bob", "clearance": "secret"}
    )


class Collected(Generic[T]):
    """A listener that keeps what it is given and wakes waiters."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._arrived = asyncio.Event()

    def __call__(self, item: T) -> None:
        self.items.append(item)
        self._arrived.set()

    async def first(self) -> T:
        async with asyncio.timeout(WAIT):
            await self._arrived.wait()
        return self.items[0]


@dataclass
class Pair:
    alice: AsyncPeer
    bob: AsyncPeer
    alice_transport: MemoryTransport
    bob_transport: MemoryTransport
    failures: Collected[tuple[str, Exception]] = field(default_factory=Collected)


@pytest.fixture
async def make_pair() -> AsyncIterator[Callable[..., Pair]]:
    made: list[AsyncPeer] = []

    def make(
        alice_config: PeerConfig | None = None,
        bob_config: PeerConfig | None = None,
        *,
        handshake_timeout: float = WAIT,
    ) -> Pair:
        a_end, b_end = MemoryTransport.pair()
        failures: Collected[tuple[str, Exception]] = Collected()

        def reporter(name: str) -> Callable[[AuthMessage, Exception], None]:
            return lambda _message, exc: failures((name, exc))

        alice = AsyncPeer(
            Peer(ALICE, alice_config),
            a_end,
            on_error=reporter("alice"),
            handshake_timeout=handshake_timeout,
        )
        bob = AsyncPeer(
            Peer(BOB, bob_config),
            b_end,
            on_error=reporter("bob"),
            handshake_timeout=handshake_timeout,
        )
        made.extend([alice, bob])
        return Pair(alice, bob, a_end, b_end, failures)

    yield make
    for peer in made:
        await peer.close()


@pytest.fixture
def pair(make_pair: Callable[..., Pair]) -> Pair:
    return make_pair()


async def receive(peer: AsyncPeer) -> GeneralMessageReceived:
    async with asyncio.timeout(WAIT):
        return await peer.receive()


async def settle() -> None:
    """Let in-memory deliveries (call_soon) and the work they spawn run."""
    for _ in range(10):
        await asyncio.sleep(0)


class BlackHole:
    """A transport that takes every message and delivers nothing."""

    def __init__(self) -> None:
        self.sent: list[AuthMessage] = []

    async def send(self, message: AuthMessage) -> None:
        self.sent.append(message)

    def set_handler(self, handler: MessageHandler) -> None:
        pass


def rewritten(message: AuthMessage, **members: object) -> bytes:
    """The message's wire form with some members replaced."""
    obj = message.to_json()
    obj.update(members)
    return compact_json(obj)


# --- handshake and general messages ---------------------------------------------------------


async def test_handshake_returns_the_verified_peer_identity(pair: Pair) -> None:
    async with asyncio.timeout(WAIT):
        identity = await pair.alice.handshake()
    assert identity == BOB.identity_key
    assert pair.alice.identity_key == ALICE.identity_key
    assert pair.alice.peer.session(identity_key=BOB.identity_key).is_authenticated
    assert pair.bob.peer.session(identity_key=ALICE.identity_key).is_authenticated
    assert list(pair.alice.errors) == list(pair.bob.errors) == []


async def test_a_pinned_handshake_succeeds_with_the_right_key(pair: Pair) -> None:
    async with asyncio.timeout(WAIT):
        assert await pair.alice.handshake(identity_key=BOB.identity_key) == BOB.identity_key


async def test_general_messages_both_ways_through_receive(pair: Pair) -> None:
    to = await pair.alice.send_general(b"ping")  # handshakes first
    assert to == BOB.identity_key
    got = await receive(pair.bob)
    assert (got.payload, got.identity_key) == (b"ping", ALICE.identity_key)
    assert await pair.bob.send_general(b"pong", identity_key=ALICE.identity_key) == (
        ALICE.identity_key
    )
    back = await receive(pair.alice)
    assert (back.payload, back.identity_key) == (b"pong", BOB.identity_key)
    assert list(pair.alice.errors) == list(pair.bob.errors) == []


async def test_messages_arrive_in_order_on_one_session(pair: Pair) -> None:
    await pair.alice.handshake()
    payloads = [f"message {i}".encode() for i in range(30)] + [b"", bytes(range(256))]
    for payload in payloads:
        await pair.alice.send_general(payload, identity_key=BOB.identity_key)
    got = [(await receive(pair.bob)).payload for _ in payloads]
    assert got == payloads
    assert len(pair.alice.peer.sessions) == 1


async def test_concurrent_sends_are_all_delivered(pair: Pair) -> None:
    await pair.alice.handshake()
    await asyncio.gather(
        *(pair.alice.send_general(b"%d" % i, identity_key=BOB.identity_key) for i in range(20))
    )
    got = sorted([int((await receive(pair.bob)).payload) for _ in range(20)])
    assert got == list(range(20))


async def test_sync_and_async_listeners_both_see_each_message(pair: Pair) -> None:
    seen_sync: list[bytes] = []
    seen_async: list[bytes] = []

    async def echo(event: GeneralMessageReceived) -> None:
        seen_async.append(event.payload)
        await pair.bob.send_general(b"echo: " + event.payload, identity_key=event.identity_key)

    pair.bob.on_general_message(lambda event: seen_sync.append(event.payload))
    pair.bob.on_general_message(echo)
    await pair.alice.send_general(b"one")
    await pair.alice.send_general(b"two", identity_key=BOB.identity_key)
    replies = [(await receive(pair.alice)).payload for _ in range(2)]
    assert replies == [b"echo: one", b"echo: two"]
    assert seen_sync == seen_async == [b"one", b"two"]
    # With a listener registered, nothing piles up for receive().
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pair.bob.receive()


async def test_a_failing_async_listener_is_recorded_and_the_driver_goes_on(pair: Pair) -> None:
    async def broken(event: GeneralMessageReceived) -> None:
        if event.payload == b"boom":
            raise RuntimeError("listener bug")
        await pair.bob.send_general(b"ok", identity_key=event.identity_key)

    pair.bob.on_general_message(broken)
    await pair.alice.send_general(b"boom")
    await pair.alice.send_general(b"fine", identity_key=BOB.identity_key)
    assert (await receive(pair.alice)).payload == b"ok"
    assert [type(e) for e in pair.bob.errors] == [RuntimeError]


async def test_a_failing_sync_listener_is_recorded_and_the_others_still_run(pair: Pair) -> None:
    seen: list[bytes] = []

    def broken(event: GeneralMessageReceived) -> None:
        raise RuntimeError("listener bug")

    pair.bob.on_general_message(broken)
    pair.bob.on_general_message(lambda event: seen.append(event.payload))
    await pair.alice.send_general(b"one")
    await settle()
    assert seen == [b"one"]
    assert [type(e) for e in pair.bob.errors] == [RuntimeError]


async def test_both_sides_may_start_a_handshake(pair: Pair) -> None:
    """Two sessions between the same identities, one started by each side."""
    await asyncio.gather(pair.alice.handshake(), pair.bob.handshake())
    assert len(pair.alice.peer.sessions) == len(pair.bob.peer.sessions) == 2
    await pair.alice.send_general(b"a", identity_key=BOB.identity_key)
    await pair.bob.send_general(b"b", identity_key=ALICE.identity_key)
    assert (await receive(pair.bob)).payload == b"a"
    assert (await receive(pair.alice)).payload == b"b"


# --- timeouts -------------------------------------------------------------------------------


async def test_a_silent_peer_times_out_the_handshake() -> None:
    hole = BlackHole()
    peer = AsyncPeer(Peer(ALICE), hole, handshake_timeout=0.05)
    try:
        async with asyncio.timeout(WAIT):
            with pytest.raises(HandshakeTimeoutError):
                await peer.handshake()
            with pytest.raises(HandshakeTimeoutError):
                await peer.send_general(b"never sent")
        assert [m.message_type.value for m in hole.sent] == ["initialRequest"] * 2
        assert len(peer.peer.sessions) == 0  # the half-open sessions are gone
    finally:
        await peer.close()


async def test_the_peer_timer_also_ends_a_handshake() -> None:
    """The sans-IO handshake deadline (PeerConfig) fires through the driver's timer."""
    config = PeerConfig(handshake_timeout_ms=30)
    peer = AsyncPeer(Peer(ALICE, config), BlackHole(), handshake_timeout=WAIT)
    try:
        async with asyncio.timeout(WAIT):
            with pytest.raises(HandshakeTimeoutError):
                await peer.handshake()
        assert len(peer.peer.sessions) == 0
    finally:
        await peer.close()


async def test_a_peer_with_another_identity_fails_a_pinned_handshake(
    make_pair: Callable[..., Pair],
) -> None:
    """Bob answers where Carol was expected: his initialResponse is refused and reported,
    and the handshake fails at once with that error (not at the timeout)."""
    pair = make_pair(handshake_timeout=30)
    async with asyncio.timeout(WAIT):
        with pytest.raises(IdentityMismatchError):
            await pair.alice.handshake(identity_key=CAROL.identity_key)
    assert [type(e) for e in pair.alice.errors] == [IdentityMismatchError]
    assert pair.failures.items == [("alice", pair.alice.errors[0])]


async def test_held_messages_are_dropped_when_certificates_never_come(
    make_pair: Callable[..., Pair],
) -> None:
    """Alice requires certificates Bob does not have: his messages are held, then dropped
    and reported at the certificate timeout."""
    pair = make_pair(PeerConfig(requested_certificates=REQUEST, certificate_timeout_ms=50))
    await pair.alice.handshake()
    await pair.bob.send_general(b"held", identity_key=ALICE.identity_key)
    assert await pair.failures.first() == ("alice", pair.alice.errors[0])
    assert [type(e) for e in pair.alice.errors] == [CertificatesTimeoutError]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pair.alice.receive()


# --- bad messages ---------------------------------------------------------------------------


async def test_a_bad_signature_is_recorded_and_the_session_survives(pair: Pair) -> None:
    await pair.alice.handshake()
    message = pair.alice.peer.create_general(b"pay 1", identity_key=BOB.identity_key)
    pair.bob_transport.deliver_bytes(rewritten(message, payload=list(b"pay 9")))
    assert [type(e) for e in pair.bob.errors] == [MessageSignatureError]
    assert pair.failures.items == [("bob", pair.bob.errors[0])]
    await pair.alice.send_general(b"after", identity_key=BOB.identity_key)
    assert (await receive(pair.bob)).payload == b"after"


async def test_a_replayed_message_is_delivered_once(pair: Pair) -> None:
    await pair.alice.handshake()
    message = pair.alice.peer.create_general(b"once", identity_key=BOB.identity_key)
    pair.bob_transport.deliver_bytes(message.to_bytes())
    pair.bob_transport.deliver_bytes(message.to_bytes())
    assert (await receive(pair.bob)).payload == b"once"
    assert [type(e) for e in pair.bob.errors] == [ReplayError]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pair.bob.receive()


@pytest.mark.parametrize("what", ["foreign nonce", "unknown session", "other identity"])
async def test_messages_outside_a_session_are_recorded(pair: Pair, what: str) -> None:
    await pair.alice.handshake()
    message = pair.alice.peer.create_general(b"x", identity_key=BOB.identity_key)
    expected: type[Exception]
    if what == "foreign nonce":
        wire, expected = rewritten(message, yourNonce=create_nonce(CAROL)), NonceError
    elif what == "unknown session":
        wire, expected = rewritten(message, yourNonce=create_nonce(BOB)), SessionNotFoundError
    else:
        wire, expected = rewritten(message, identityKey=CAROL.identity_key), IdentityMismatchError
    pair.bob_transport.deliver_bytes(wire)
    assert [type(e) for e in pair.bob.errors] == [expected]


async def test_malformed_wire_bytes_are_dropped_quietly(pair: Pair) -> None:
    """Not an AuthMessage at all: the transport drops it before the peer sees it."""
    for wire in [b"not json", b"{}", json.dumps({"version": "9"}).encode()]:
        pair.bob_transport.deliver_bytes(wire)
    assert not pair.bob.errors
    await pair.alice.send_general(b"still fine")
    assert (await receive(pair.bob)).payload == b"still fine"


async def test_a_general_message_before_the_handshake_is_refused(pair: Pair) -> None:
    """A general message naming a session that is still half open."""
    request = pair.alice.peer.initiate(0)
    assert request.initial_nonce is not None
    stranger = Peer(CAROL)
    # Carol names Alice's half-open session; the state check refuses it before any
    # signature is looked at.
    carol_to_alice = parse_message_bytes(
        compact_json(
            {
                "version": "0.1",
                "messageType": "general",
                "identityKey": stranger.identity_key,
                "nonce": base64.b64encode(b"n" * 32).decode(),
                "yourNonce": request.initial_nonce,
                "payload": [1],
                "signature": [0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
            }
        )
    )
    pair.alice_transport.deliver_bytes(carol_to_alice.to_bytes())
    assert [type(e) for e in pair.alice.errors] == [UnexpectedMessageError]


# --- certificates ---------------------------------------------------------------------------


async def test_requested_certificates_arrive_with_the_handshake(
    make_pair: Callable[..., Pair],
) -> None:
    pair = make_pair(
        PeerConfig(requested_certificates=REQUEST),
        PeerConfig(certificates=[bob_certificate()]),
    )
    received: list[CertificatesReceived] = []
    pair.alice.on_certificates(received.append)
    await pair.alice.handshake()
    assert len(received) == 1
    event = received[0]
    assert event.identity_key == BOB.identity_key
    (shown,) = event.certificates
    assert shown.certificate.certifier == CERTIFIER.identity_key
    assert shown.decrypted_fields == {"name": "Bob"}  # only what was asked for
    await pair.bob.send_general(b"not held", identity_key=ALICE.identity_key)
    assert (await receive(pair.alice)).payload == b"not held"


async def test_a_certificate_request_mid_session_is_answered(
    make_pair: Callable[..., Pair],
) -> None:
    pair = make_pair(None, PeerConfig(certificates=[bob_certificate()]))
    received: Collected[CertificatesReceived] = Collected()
    pair.alice.on_certificates(received)
    await pair.alice.handshake()
    await pair.alice.request_certificates(REQUEST, identity_key=BOB.identity_key)
    assert (await received.first()).certificates[0].decrypted_fields == {"name": "Bob"}
    assert list(pair.alice.errors) == list(pair.bob.errors) == []


async def test_the_application_answers_a_certificate_request_itself(
    make_pair: Callable[..., Pair],
) -> None:
    """With answer_certificate_requests=False Bob's application gets Alice's
    certificateRequest as an event and answers it; Alice releases the message she held
    meanwhile."""
    pair = make_pair(None, PeerConfig(answer_certificate_requests=False))
    requests: Collected[CertificatesRequested] = Collected()
    received: list[CertificatesReceived] = []
    pair.bob.on_certificates_requested(requests)
    pair.alice.on_certificates(received.append)
    await pair.alice.handshake()
    await pair.alice.request_certificates(REQUEST, identity_key=BOB.identity_key)
    request = await requests.first()
    assert request.identity_key == ALICE.identity_key
    assert request.requested == REQUEST
    await pair.bob.send_general(b"held until certified", identity_key=ALICE.identity_key)
    await settle()
    assert received == []  # held, not delivered
    shown = bob_certificate().reveal(BOB, ALICE.identity_key, ["name"])
    await pair.bob.transport.send(
        pair.bob.peer.create_certificate_response([shown], session_nonce=request.session_nonce)
    )
    assert (await receive(pair.alice)).payload == b"held until certified"
    assert received[0].certificates[0].decrypted_fields == {"name": "Bob"}
    assert list(pair.alice.errors) == list(pair.bob.errors) == []


async def test_a_request_in_the_initial_request_reaches_the_application(
    make_pair: Callable[..., Pair],
) -> None:
    pair = make_pair(
        PeerConfig(requested_certificates=REQUEST),
        PeerConfig(answer_certificate_requests=False),
    )
    requests: list[CertificatesRequested] = []
    pair.bob.on_certificates_requested(requests.append)
    await pair.alice.handshake()
    await settle()
    assert [r.requested for r in requests] == [REQUEST]


# --- close ----------------------------------------------------------------------------------


async def test_close_leaves_no_pending_tasks_or_timers(pair: Pair) -> None:
    async def slow(event: GeneralMessageReceived) -> None:
        await asyncio.sleep(WAIT * 10)  # still running at close()

    pair.bob.on_general_message(slow)
    await pair.alice.send_general(b"start a slow listener")
    await settle()
    assert any(not t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())
    await pair.alice.close()
    await pair.bob.close()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []
    for peer in (pair.alice, pair.bob):
        handle = peer.timer._handle
        assert handle is None or handle.cancelled()
