"""BRC-103 mutual authentication: handshakes and general-message round trips, in memory,
each against the Python reference ``bsv-sdk`` (2.4.0) Peer measured in the same run.

- handshakes_per_s: complete BRC-103 handshakes per second between two trustmesh peers.
  Anchor: two bsv-sdk Peers (:func:`bench.anchors.bsv_peer.handshake_rate`). Goal: ratio >= 2.
- handshakes_new_peer_per_s: the same handshakes, each without the ECDH points the
  two wallets cached for each other (each keeps its own ``self`` point), as between two
  running nodes that meet for the first time: A and B each compute one ECDH more. Same
  anchor, whose cost does not change (bsv-sdk caches no ECDH). No goal set.
- general_roundtrip_per_s: signed general-message round trips per second on one
  established session (32-byte payload each way). Anchor:
  :func:`bench.anchors.bsv_peer.general_roundtrip_rate`, same payload. No goal set.

Both sides run synchronously in this thread, with no event loop, threads or sleeps: our
side drives the sans-IO core (:class:`trustmesh.brc103.peer.Peer`) directly, the anchor's
Peers deliver to each other through a synchronous in-memory transport. Each side measures
its own rate over the same time per round; rounds alternate, anchor first
(:func:`bench.harness.compare_rates`); the ratio is the median of per-round ratios.

One handshake iteration, our side (A initiates, B responds):

1. Two new :class:`Peer` objects (empty session tables), as the anchor builds two new Peers.
2. A: ``initiate(now, peer_identity_key=B)`` makes its session nonce (16 random bytes and
   their BRC-42 HMAC) and the initialRequest; the message is written to its JSON wire
   form (``AuthMessage.to_bytes``).
3. B: ``parse_message_bytes`` (the strict parser), ``receive``: B makes its own session
   nonce, signs both nonces with its BRC-42 child key for A and queues the
   initialResponse; ``messages_to_send`` takes it, ``to_bytes`` writes it.
4. A: ``parse_message_bytes``, ``receive``: A checks the HMAC of its nonce in
   ``yourNonce``, finds the session, verifies B's signature with B's child key and marks
   the session authenticated. The iteration checks that this produced exactly one
   ``HandshakeCompleted`` for B on A's session, and that B holds an authenticated
   session with A.

One handshake iteration, anchor side (see its docstring): two new bsv-sdk Peers on a new
in-memory transport pair; ``get_authenticated_session(B)`` on A makes A's nonce, sends
the initialRequest, B makes its session, nonce and signed initialResponse, A verifies
the nonce and the signature and marks the session authenticated; all inside the call.
The anchor hands bsv-sdk's ``AuthMessage`` objects across without a wire form, so it does
not pay for JSON; ours does, as :class:`trustmesh.io.brc103.MemoryTransport` would.

On both sides a round makes two wallets (identity keys) and one handshake before its
timing, and keeps them for all its handshakes, as a long-lived node keeps its key. Our
:class:`~trustmesh.brc103.wallet.Wallet` caches the ECDH point it shares with each
counterparty (and with itself, for the nonce HMACs), so after the warm-up a handshake with
the same peer computes no ECDH; bsv-sdk's ProtoWallet computes one for every derivation.
handshakes_new_peer_per_s takes that cache away for the other peer.

One round trip, our side: A ``create_general(32 bytes, identity_key=B)`` (signed with a
fresh 32-byte nonce), ``to_bytes``; B parses and ``receive``s it (nonce HMAC, session,
identity, replay check, signature) and gets a ``GeneralMessageReceived``; B answers with
``create_general`` of the payload it received, ``to_bytes``; A parses and ``receive``s
it. Each event's sender and payload are checked. Each round uses a new peer pair and
handshake, made before the timing. Anchor: ``a.to_peer(payload, B)``; B's listener
answers with ``b.to_peer``; A's listener counts the answer; all inside the call.
"""

from __future__ import annotations

import time

from bench.anchors.bsv_peer import PAYLOAD, general_roundtrip_rate, handshake_rate
from bench.harness import Result, compare_rates
from trustmesh.brc103.messages import AuthMessage, MessageType, parse_message_bytes
from trustmesh.brc103.peer import Event, GeneralMessageReceived, HandshakeCompleted, Peer
from trustmesh.brc103.wallet import Wallet

ROUND_TIME = 0.4  # seconds per measurement round, each side
ROUNDS = 7
ANCHOR = "bsv-sdk 2.4.0 Peer pair, in memory"


class BenchFailure(RuntimeError):
    """A measurement that did not do the work the benchmark asked for."""


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _wire(message: AuthMessage) -> AuthMessage:
    """The message as the other end gets it: JSON bytes and the strict parser."""
    return parse_message_bytes(message.to_bytes())


def handshake(wallet_a: Wallet, wallet_b: Wallet) -> tuple[Peer, Peer]:
    """Two new peers; A runs a full handshake with B. Returns ``(a, b)``."""
    a, b = Peer(wallet_a), Peer(wallet_b)
    now = _now_ms()
    request = a.initiate(now, peer_identity_key=wallet_b.identity_key)
    if b.receive(_wire(request), now):
        raise BenchFailure("the responder raised events for an initialRequest")
    (response,) = b.messages_to_send()
    if response.message_type is not MessageType.INITIAL_RESPONSE:
        raise BenchFailure(f"the responder sent a {response.message_type}")
    events = a.receive(_wire(response), now)
    if (
        len(events) != 1
        or not isinstance(events[0], HandshakeCompleted)
        or events[0].identity_key != wallet_b.identity_key
        or events[0].session_nonce != request.initial_nonce
    ):
        raise BenchFailure(f"the handshake did not complete: {events!r}")
    if a.messages_to_send():
        raise BenchFailure("the initiator queued messages after the handshake")
    return a, b


def forget_each_other(wallet_a: Wallet, wallet_b: Wallet) -> None:
    """Drop the ECDH point each wallet cached for the other, so that their next handshake
    is a first contact (each still knows its own ``self`` point, as a running node does)."""
    wallet_a._shared.pop(wallet_b.public_key, None)
    wallet_b._shared.pop(wallet_a.public_key, None)


def handshake_round(min_time: float, *, first_contact: bool = False) -> float:
    """Complete handshakes per second, each between two new peers (see the module doc).

    Like the anchor, a round makes two wallets and one handshake before the timing. With
    ``first_contact`` each handshake starts without the wallets' cached ECDH points for
    each other (:func:`forget_each_other`)."""
    wallet_a, wallet_b = Wallet.generate(), Wallet.generate()
    handshake(wallet_a, wallet_b)
    count = 0
    start = time.perf_counter()
    deadline = start + min_time
    while True:
        if first_contact:
            forget_each_other(wallet_a, wallet_b)
        _, b = handshake(wallet_a, wallet_b)
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            session = b.sessions.by_identity(wallet_a.identity_key)
            if session is None or not session.is_authenticated:
                raise BenchFailure("the responder kept no authenticated session")
            return count / (now - start)


def _delivered(events: list[Event], sender: str, payload: bytes) -> GeneralMessageReceived:
    """The one event of a general message from ``sender`` carrying ``payload``."""
    if len(events) == 1:
        (event,) = events
        if (
            isinstance(event, GeneralMessageReceived)
            and event.identity_key == sender
            and event.payload == payload
        ):
            return event
    raise BenchFailure(f"a general message was not delivered intact: {events!r}")


def roundtrip_round(min_time: float, *, payload: bytes = PAYLOAD) -> float:
    """Signed general-message round trips per second on one session (see the module doc)."""
    wallet_a, wallet_b = Wallet.generate(), Wallet.generate()
    a, b = handshake(wallet_a, wallet_b)
    id_a, id_b = wallet_a.identity_key, wallet_b.identity_key

    def round_trip() -> None:
        now = _now_ms()
        received = b.receive(_wire(a.create_general(payload, identity_key=id_b)), now)
        answer = b.create_general(_delivered(received, id_a, payload).payload, identity_key=id_a)
        _delivered(a.receive(_wire(answer), now), id_b, payload)

    round_trip()  # warm up: B's first signature and A's first verification on this session
    count = 0
    start = time.perf_counter()
    deadline = start + min_time
    while True:
        round_trip()
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def run(*, round_time: float = ROUND_TIME, rounds: int = ROUNDS) -> list[Result]:
    handshake_round(round_time / 4)  # warm up both sides before measuring
    handshake_rate(round_time / 4)
    hs = compare_rates(
        lambda: handshake_round(round_time),
        lambda: handshake_rate(round_time),
        rounds=rounds,
    )
    first = compare_rates(
        lambda: handshake_round(round_time, first_contact=True),
        lambda: handshake_rate(round_time),
        rounds=rounds,
    )
    rt = compare_rates(
        lambda: roundtrip_round(round_time),
        lambda: general_roundtrip_rate(round_time),
        rounds=rounds,
    )
    return [
        Result.of("handshakes_per_s", hs, "hs/s", ANCHOR),
        Result.of("handshakes_new_peer_per_s", first, "hs/s", ANCHOR),
        Result.of("general_roundtrip_per_s", rt, "rt/s", ANCHOR),
    ]
