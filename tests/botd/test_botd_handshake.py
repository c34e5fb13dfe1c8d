"""The BOTD #2 handshake, sans-IO: two cores joined by hand on a fake clock.

Covers the happy path (Init, Ack and the responder's Finished, the initiator's Finished;
event order, transcript agreement, messages both ways, any byte split) and every way an
Init, Ack or Finished is refused: each refusal is a ConnectionClosed with error=True, no
HandshakeComplete, and nothing sent that the refused input did not earn. Replayed Inits
and Acks, even with the replayed session's ephemeral secret, never complete a handshake:
the Finished signature binds the identity key to the new transcript.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from typing import NamedTuple

import coincurve
import pytest

from trustmesh.botd import (
    BotdConfig,
    BotdConnection,
    BotdError,
    HandshakeComplete,
    MessageReceived,
    ReplayCache,
    State,
)
from trustmesh.botd.keyschedule import (
    EphemeralKey,
    RekeyingOpener,
    RekeyingSealer,
    SessionKeys,
    ack_digest,
    finished_digest,
    init_digest,
    sign_compact,
    transcript_hash,
)
from trustmesh.botd.messages import parse_pubkey
from trustmesh.crypto.keys import PublicKey, Secp256k1PrivateKey
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.wire.pb.botd_pb2 import Ack, Finished, Frame, Init, Ping
from trustmesh.wire.varint import decode_uvarint, encode_uvarint

ALICE = Secp256k1PrivateKey.from_secret(b"\x01" * 32)  # initiator
BOB = Secp256k1PrivateKey.from_secret(b"\x02" * 32)  # responder
CAROL = Secp256k1PrivateKey.from_secret(b"\x03" * 32)  # a third identity
ALICE_EPH = b"\x0a" * 32
BOB_EPH = b"\x0b" * 32
# 0x02 || x with x = 5: x^3 + 7 = 132 has no square root mod p, so no such point exists.
OFF_CURVE = b"\x02" + (5).to_bytes(32, "big")


def initiator(
    key: Secp256k1PrivateKey = ALICE,
    peer: PublicKey | None = None,
    *,
    config: BotdConfig | None = None,
    ids: Iterable[str] | None = None,
    ephemeral_secret: bytes | None = ALICE_EPH,
) -> BotdConnection:
    new_id = iter(ids).__next__ if ids is not None else lambda: secrets.token_hex(16)
    return BotdConnection(
        key,
        peer_key=peer or BOB.public_key(),
        config=config,
        ephemeral_secret=ephemeral_secret,
        new_id=new_id,
    )


def responder(
    key: Secp256k1PrivateKey = BOB,
    *,
    config: BotdConfig | None = None,
    replay_cache: ReplayCache | None = None,
    ephemeral_secret: bytes | None = BOB_EPH,
    ids: Iterable[str] | None = None,
) -> BotdConnection:
    new_id = iter(ids).__next__ if ids is not None else lambda: secrets.token_hex(16)
    return BotdConnection(
        key,
        config=config,
        replay_cache=replay_cache,
        ephemeral_secret=ephemeral_secret,
        new_id=new_id,
    )


def shuttle(a: BotdConnection, b: BotdConnection, now: float) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until neither side has anything to send."""
    a_events: list[Event] = []
    b_events: list[Event] = []
    while True:
        moved = False
        data = a.data_to_send()
        if data:
            b_events += b.receive_data(data, now)
            moved = True
        data = b.data_to_send()
        if data:
            a_events += a.receive_data(data, now)
            moved = True
        if not moved:
            return a_events, b_events


def connect(
    i: BotdConnection, r: BotdConnection, now: float = 0.0
) -> tuple[list[Event], list[Event]]:
    i.start(now)
    r.start(now)
    return shuttle(i, r, now)


def payload_of(frame: bytes) -> bytes:
    length, pos = decode_uvarint(frame)
    assert len(frame) - pos == length
    return frame[pos:]


def reframe(payload: bytes) -> bytes:
    return encode_uvarint(len(payload)) + payload


def edit_init(frame: bytes, change: Callable[[Init], None]) -> bytes:
    parsed = Frame.FromString(payload_of(frame))
    change(parsed.init)
    return reframe(parsed.SerializeToString())


def edit_ack(frame: bytes, change: Callable[[Ack], None]) -> bytes:
    parsed = Frame.FromString(payload_of(frame))
    change(parsed.ack)
    return reframe(parsed.SerializeToString())


def flip_bit(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def assert_rejected(conn: BotdConnection, events: list[Event], reason: str) -> None:
    """A refusal: the last event is an error close naming ``reason``, nothing earlier
    claims a handshake, and the connection is closed."""
    assert events, "expected a ConnectionClosed"
    closed = events[-1]
    assert isinstance(closed, ConnectionClosed)
    assert closed.error is True
    assert reason.lower() in closed.reason.lower(), closed.reason
    assert not any(isinstance(e, HandshakeComplete) for e in events)
    assert not any(isinstance(e, ConnectionClosed) for e in events[:-1])
    assert conn.state is State.CLOSED
    assert not conn.established


def fresh_init(i: BotdConnection | None = None) -> tuple[BotdConnection, bytes]:
    i = i or initiator()
    i.start(0.0)
    return i, i.data_to_send()


def refuse_init(frame: bytes, reason: str, r: BotdConnection | None = None) -> BotdConnection:
    """Feed ``frame`` to a fresh responder and check it refuses it without answering."""
    r = r or responder()
    r.start(0.0)
    events = r.receive_data(frame, 1.0)
    assert_rejected(r, events, reason)
    assert r.data_to_send() == b"", "a refused Init must not be answered"
    assert r.peer_key is None
    assert r.transcript_hash is None
    return r


def split_answer(answer: bytes) -> tuple[bytes, bytes]:
    """A responder's answer to an Init: its Ack frame, then its Finished record frame."""
    length, pos = decode_uvarint(answer)
    ack, finished = answer[: pos + length], answer[pos + length :]
    assert Frame.FromString(payload_of(ack)).WhichOneof("body") == "ack"
    payload_of(finished)  # exactly one more frame
    return ack, finished


def answer_for(init_frame: bytes, key: Secp256k1PrivateKey = BOB) -> tuple[bytes, bytes]:
    """The genuine Ack and Finished record of a responder (Bob, ephemeral BOB_EPH, a
    pinned Ack id: the same Init always gets the same answer)."""
    r = responder(key, ids=["bob-ack"])
    r.start(0.0)
    assert r.receive_data(init_frame, 0.0) == []
    return split_answer(r.data_to_send())


def ack_for(init_frame: bytes) -> bytes:
    """Bob's genuine Ack to ``init_frame`` (without the Finished record behind it)."""
    return answer_for(init_frame)[0]


def refuse_ack(i: BotdConnection, ack_frame: bytes, reason: str) -> None:
    """A bad Ack closes the initiator at once (it does not wait for a Finished), and it
    sends nothing: neither its Finished nor a Close."""
    events = i.receive_data(ack_frame, 1.0)
    assert_rejected(i, events, reason)
    assert i.transcript_hash is None, "no keys derived from a refused Ack"
    assert i.data_to_send() == b"", "nothing sent after a refused Ack"


def session_ciphers(
    own_ephemeral: bytes, peer_ephemeral: bytes, transcript: bytes, *, initiator: bool
) -> tuple[RekeyingSealer, RekeyingOpener]:
    """A side's record ciphers, from the keyschedule alone (not from a core)."""
    shared = EphemeralKey(own_ephemeral).ecdh(parse_pubkey(peer_ephemeral, "peer ephemeral"))
    return SessionKeys(shared, transcript).ciphers(initiator=initiator, rekey_interval=1000)


def finished_frame(signature: bytes) -> Frame:
    return Frame(finished=Finished(signature=signature))


def signed_finished(key: Secp256k1PrivateKey, transcript: bytes, *, initiator: bool) -> Frame:
    """A genuine Finished: ``key``'s signature over the role's digest of ``transcript``."""
    return finished_frame(sign_compact(key, finished_digest(transcript, initiator=initiator)))


# --- the happy path -----------------------------------------------------------------------


def test_handshake_step_by_step_event_order() -> None:
    i, r = initiator(), responder()
    assert i.start(0.0) == []
    assert r.start(0.0) == []
    assert (i.state, r.state) == (State.AWAIT_ACK, State.AWAIT_INIT)
    assert r.data_to_send() == b"", "the responder speaks only after a valid Init"

    init = i.data_to_send()
    assert Frame.FromString(payload_of(init)).WhichOneof("body") == "init"
    assert r.receive_data(init, 1.0) == [], "no HandshakeComplete before Finished"
    assert r.state is State.AWAIT_FINISHED
    assert r.peer_key == ALICE.public_key()

    # The responder answers with its Ack and, right behind it, its encrypted Finished.
    ack, r_finished = split_answer(r.data_to_send())
    assert i.receive_data(ack, 2.0) == [], "an Ack alone establishes nothing"
    assert i.state is State.AWAIT_FINISHED
    assert not i.established
    assert i.transcript_hash == r.transcript_hash
    assert i.data_to_send() == b"", "the initiator waits for the responder's Finished"

    assert i.receive_data(r_finished, 2.5) == [HandshakeComplete(BOB.public_key())]
    assert i.established

    i_finished = i.data_to_send()
    assert i_finished, "the initiator sends its Finished with its HandshakeComplete"
    payload_of(i_finished)  # one record, nothing else
    assert r.state is State.AWAIT_FINISHED
    assert r.receive_data(i_finished, 3.0) == [HandshakeComplete(ALICE.public_key())]
    assert r.established
    assert r.data_to_send() == b"", "the responder has nothing to add after Finished"
    assert i.data_to_send() == b""


def test_both_sides_agree_and_responder_learns_initiator_key() -> None:
    i, r = initiator(ephemeral_secret=None), responder(ephemeral_secret=None)
    i_events, r_events = connect(i, r)
    assert i_events == [HandshakeComplete(BOB.public_key())]
    assert r_events == [HandshakeComplete(ALICE.public_key())]
    assert i.peer_key == BOB.public_key()
    assert r.peer_key == ALICE.public_key()
    assert i.transcript_hash is not None
    assert len(i.transcript_hash) == 32
    assert i.transcript_hash == r.transcript_hash


def test_transcripts_differ_between_sessions() -> None:
    first_i, first_r = initiator(ephemeral_secret=None), responder(ephemeral_secret=None)
    second_i, second_r = initiator(ephemeral_secret=None), responder(ephemeral_secret=None)
    connect(first_i, first_r)
    connect(second_i, second_r)
    assert first_i.transcript_hash != second_i.transcript_hash


def test_messages_flow_both_ways_in_order() -> None:
    i, r = initiator(), responder()
    connect(i, r)
    for n in range(5):
        i.send(b"to bob %d" % n)
        r.send(b"to alice %d" % n)
    r.send(b"")  # an empty message is a message
    i_events, r_events = shuttle(i, r, 1.0)
    assert r_events == [MessageReceived(b"to bob %d" % n) for n in range(5)]
    assert i_events == [MessageReceived(b"to alice %d" % n) for n in range(5)] + [
        MessageReceived(b"")
    ]


def test_handshake_and_data_survive_one_byte_at_a_time() -> None:
    i, r = initiator(), responder()
    i.start(0.0)
    r.start(0.0)
    i_events: list[Event] = []
    r_events: list[Event] = []
    for _ in range(3):
        for byte in i.data_to_send():
            r_events += r.receive_data(bytes([byte]), 0.0)
        for byte in r.data_to_send():
            i_events += i.receive_data(bytes([byte]), 0.0)
        if r.established and i.established:
            break
    i.send(b"split")
    for byte in i.data_to_send():
        r_events += r.receive_data(bytes([byte]), 0.0)
    assert i_events == [HandshakeComplete(BOB.public_key())]
    assert r_events == [HandshakeComplete(ALICE.public_key()), MessageReceived(b"split")]


def test_finished_and_data_in_one_chunk() -> None:
    i, r = initiator(), responder()
    i.start(0.0)
    r.start(0.0)
    r.receive_data(i.data_to_send(), 0.0)
    i.receive_data(r.data_to_send(), 0.0)
    i.send(b"right after Finished")
    events = r.receive_data(i.data_to_send(), 0.0)
    assert events == [
        HandshakeComplete(ALICE.public_key()),
        MessageReceived(b"right after Finished"),
    ]


def test_id_of_64_characters_is_accepted() -> None:
    i, r = initiator(ids=["x" * 64]), responder()
    i_events, r_events = connect(i, r)
    assert i_events == [HandshakeComplete(BOB.public_key())]
    assert r_events == [HandshakeComplete(ALICE.public_key())]


def test_allow_list_admits_listed_key() -> None:
    r = responder(config=BotdConfig(allow=frozenset({CAROL.public_key(), ALICE.public_key()})))
    _, r_events = connect(initiator(), r)
    assert r_events == [HandshakeComplete(ALICE.public_key())]


# --- nothing before the peer's Finished -------------------------------------------------


def forged_record(conn: BotdConnection, frame: Frame, *, initiator: bool) -> bytes:
    """A record sealed with a side's real first key and counter (what that side's Finished
    goes under), for ``conn``'s session: the pinned ephemerals and ``conn``'s transcript.
    Built from the keyschedule, not the core."""
    assert conn.transcript_hash is not None
    bob_eph = coincurve.PrivateKey(BOB_EPH).public_key.format(compressed=True)
    sealer, _ = session_ciphers(ALICE_EPH, bob_eph, conn.transcript_hash, initiator=initiator)
    return reframe(sealer.seal(frame.SerializeToString()))


SKIPPED_FINISHED = [
    (Frame(data=b"early"), "before Finished"),
    (Frame(ping=Ping(id="p")), "expected Finished"),
]


@pytest.mark.parametrize(("frame", "reason"), SKIPPED_FINISHED)
def test_responder_delivers_nothing_before_finished(frame: Frame, reason: str) -> None:
    i, init = fresh_init()
    r = responder()
    r.start(0.0)
    r.receive_data(init, 0.0)
    assert i.receive_data(r.data_to_send(), 0.0) == [HandshakeComplete(BOB.public_key())]
    assert i.data_to_send()  # the real Finished, dropped here
    events = r.receive_data(forged_record(r, frame, initiator=True), 1.0)
    assert_rejected(r, events, reason)
    assert not any(isinstance(e, MessageReceived) for e in events)
    assert r.data_to_send() == b"", "no Close to a peer that never proved itself"


@pytest.mark.parametrize(("frame", "reason"), SKIPPED_FINISHED)
def test_initiator_delivers_nothing_before_finished(frame: Frame, reason: str) -> None:
    """The mirror case: after a valid Ack, a key-holding responder that skips its
    Finished gets no HandshakeComplete, no message, and no Finished or Close."""
    i, init = fresh_init()
    ack, _ = answer_for(init)  # the real Finished, dropped here
    assert i.receive_data(ack, 0.0) == []
    events = i.receive_data(forged_record(i, frame, initiator=False), 1.0)
    assert_rejected(i, events, reason)
    assert not any(isinstance(e, MessageReceived) for e in events)
    assert i.data_to_send() == b""


def test_forged_record_helper_matches_the_real_finished_records() -> None:
    """The forging helper above is right: it reproduces both real Finished records, each
    signed by its side's identity key over its role's digest of the transcript."""
    i, init = fresh_init()
    ack, r_finished = answer_for(init)
    assert i.receive_data(ack, 0.0) == []
    assert i.transcript_hash is not None
    transcript = i.transcript_hash
    bob_finished = signed_finished(BOB, transcript, initiator=False)
    assert forged_record(i, bob_finished, initiator=False) == r_finished
    assert i.receive_data(r_finished, 0.0) == [HandshakeComplete(BOB.public_key())]
    alice_finished = signed_finished(ALICE, transcript, initiator=True)
    assert forged_record(i, alice_finished, initiator=True) == i.data_to_send()


# --- Init refusals ------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 17, 31, 32, 50, 63])
def test_init_signature_bit_flip(index: int) -> None:
    _, init = fresh_init()

    def flip(msg: Init) -> None:
        msg.signature = flip_bit(msg.signature, index)

    refuse_init(edit_init(init, flip), "Init signature")


def test_init_signature_wrong_length() -> None:
    _, init = fresh_init()

    def truncate(msg: Init) -> None:
        msg.signature = msg.signature[:63]

    refuse_init(edit_init(init, truncate), "Init signature")


def test_init_signature_by_another_key() -> None:
    _, init = fresh_init()

    def resign(msg: Init) -> None:
        digest = init_digest(msg.sender_pubkey, msg.recipient_pubkey, msg.ephemeral_pubkey)
        msg.signature = sign_compact(CAROL, digest)

    refuse_init(edit_init(init, resign), "Init signature")


def test_init_with_swapped_ephemeral_key_fails_signature() -> None:
    """The signature covers the ephemeral key: a man in the middle cannot swap it in."""
    _, init = fresh_init()
    mallory_eph = coincurve.PrivateKey(b"\x0c" * 32).public_key.format(compressed=True)

    def swap(msg: Init) -> None:
        msg.ephemeral_pubkey = mallory_eph

    refuse_init(edit_init(init, swap), "Init signature")


def test_init_for_another_recipient() -> None:
    _, init = fresh_init(initiator(peer=CAROL.public_key()))
    refuse_init(init, "another recipient")


@pytest.mark.parametrize(
    "bad_key",
    [
        pytest.param(ALICE.public_key().to_bytes()[:32], id="32-bytes"),
        pytest.param(ALICE.public_key().to_bytes() + b"\x00", id="34-bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(
            ALICE.public_key().coincurve.format(compressed=False), id="uncompressed-65-bytes"
        ),
        pytest.param(OFF_CURVE, id="not-on-curve"),
        pytest.param(b"\x05" + ALICE.public_key().to_bytes()[1:], id="bad-prefix"),
    ],
)
def test_init_malformed_sender_key(bad_key: bytes) -> None:
    _, init = fresh_init()

    def replace(msg: Init) -> None:
        msg.sender_pubkey = bad_key

    refuse_init(edit_init(init, replace), "sender_pubkey")


@pytest.mark.parametrize(
    "bad_key",
    [
        pytest.param(b"\x02" * 32, id="32-bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(
            coincurve.PrivateKey(ALICE_EPH).public_key.format(compressed=False),
            id="uncompressed-65-bytes",
        ),
        pytest.param(OFF_CURVE, id="not-on-curve"),
    ],
)
def test_init_malformed_ephemeral_key(bad_key: bytes) -> None:
    """Validly signed over the bad key, so only the key's form is at fault."""
    _, init = fresh_init()

    def replace(msg: Init) -> None:
        msg.ephemeral_pubkey = bad_key
        msg.signature = sign_compact(
            ALICE, init_digest(msg.sender_pubkey, msg.recipient_pubkey, bad_key)
        )

    refuse_init(edit_init(init, replace), "ephemeral_pubkey")


def test_off_curve_constant_is_really_off_curve() -> None:
    with pytest.raises(ValueError):
        coincurve.PublicKey(OFF_CURVE)


@pytest.mark.parametrize("bad_id", ["", "x" * 65, "y" * 200])
def test_init_bad_id(bad_id: str) -> None:
    _, init = fresh_init(initiator(ids=[bad_id]))
    refuse_init(init, "Init id")


def test_sender_not_on_allow_list() -> None:
    r = responder(config=BotdConfig(allow=frozenset({CAROL.public_key()})))
    _, init = fresh_init()
    refuse_init(init, "allow-list", r)


def test_empty_allow_list_refuses_everyone() -> None:
    _, init = fresh_init()
    refuse_init(init, "allow-list", responder(config=BotdConfig(allow=frozenset())))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(
            Frame(ack=Ack(id="a", init_id="b")).SerializeToString(), "expected Init", id="ack"
        ),
        pytest.param(Frame(ping=Ping(id="p")).SerializeToString(), "expected Init", id="ping"),
        pytest.param(Frame(data=b"hi").SerializeToString(), "expected Init", id="data"),
        pytest.param(b"", "no body", id="empty-frame"),
        pytest.param(b"\xff\xff\xff", "malformed", id="garbage"),
    ],
)
def test_first_frame_not_an_init(payload: bytes, reason: str) -> None:
    refuse_init(reframe(payload), reason)


def test_oversized_first_frame_refused_from_its_prefix() -> None:
    """A length prefix over the handshake limit is refused before its body arrives."""
    refuse_init(encode_uvarint(100_000), "exceeds")


def test_bytes_after_init_before_our_ack() -> None:
    _, init = fresh_init()
    refuse_init(init + b"\x05ab", "bytes after")


def test_complete_frame_after_init_before_our_ack() -> None:
    """A whole frame behind the Init is refused just the same, and the Init goes
    unanswered: the initiator cannot have had anything to say before our Ack."""
    _, init = fresh_init()
    refuse_init(init + reframe(bytes(40)), "bytes after")


def test_init_split_from_trailing_bytes_is_refused_too() -> None:
    """An Init split over two reads, trailing bytes behind its end: no Ack either."""
    _, init = fresh_init()
    r = responder()
    r.start(0.0)
    assert r.receive_data(init[:100], 0.0) == []
    refuse_init(init[100:] + b"\x05ab", "bytes after", r)


def test_bare_length_prefix_after_init_is_refused() -> None:
    """A length prefix alone is trailing bytes too (the decoder has consumed it, so it
    holds no buffered byte); it must not vanish with the handshake decoder."""
    _, init = fresh_init()
    refuse_init(init + b"\x05", "bytes after")


def test_finished_length_prefix_read_with_the_ack_is_kept() -> None:
    """Bytes after the Ack are the responder's Finished. A length prefix read together
    with the Ack (under the handshake decoder) must survive the switch to records."""
    i, init = fresh_init()
    ack, r_finished = answer_for(init)
    _, pos = decode_uvarint(r_finished)
    assert i.receive_data(ack + r_finished[:pos], 1.0) == []
    assert i.state is State.AWAIT_FINISHED
    assert i.data_to_send() == b""
    assert i.receive_data(r_finished[pos:], 1.0) == [HandshakeComplete(BOB.public_key())]


def test_bare_length_prefix_after_ack_then_eof_is_refused() -> None:
    i, init = fresh_init()
    assert i.receive_data(ack_for(init) + b"\x07", 1.0) == []
    assert_rejected(i, i.receive_data(b"", 2.0), "during the handshake")
    assert i.data_to_send() == b""


# --- replayed Init ------------------------------------------------------------------------


def test_replayed_init_refused_with_shared_replay_cache() -> None:
    cache = ReplayCache()
    i, init = fresh_init()
    first = responder(replay_cache=cache)
    first.start(0.0)
    assert first.receive_data(init, 0.0) == []
    i.receive_data(first.data_to_send(), 0.0)
    assert first.receive_data(i.data_to_send(), 0.0) == [HandshakeComplete(ALICE.public_key())]

    # A second responder (another connection to the same server) sees the same bytes.
    refuse_init(init, "replayed", responder(replay_cache=cache))

    # A new Init from the same identity, with a fresh ephemeral key, is still welcome.
    _, other_init = fresh_init(initiator(ephemeral_secret=b"\x0d" * 32))
    third = responder(replay_cache=cache)
    third.start(0.0)
    assert third.receive_data(other_init, 0.0) == []
    assert third.state is State.AWAIT_FINISHED


def test_refused_init_is_not_remembered_by_replay_cache() -> None:
    """A forged Init must not poison the cache for the real initiator."""
    cache = ReplayCache()
    _, init = fresh_init()

    def flip(msg: Init) -> None:
        msg.signature = flip_bit(msg.signature, 40)

    refuse_init(edit_init(init, flip), "Init signature", responder(replay_cache=cache))
    assert len(cache) == 0
    r = responder(replay_cache=cache)
    r.start(0.0)
    assert r.receive_data(init, 0.0) == []
    assert r.state is State.AWAIT_FINISHED


def replay_without_cache() -> tuple[BotdConnection, bytes]:
    """An honest session, then its Init replayed to a responder with no replay cache.
    Returns the victim responder (its Ack sent) and the honest session's Finished."""
    i, init = fresh_init()
    honest = responder()
    honest.start(0.0)
    honest.receive_data(init, 0.0)
    honest_ack = honest.data_to_send()
    i.receive_data(honest_ack, 0.0)
    honest_finished = i.data_to_send()
    assert honest.receive_data(honest_finished, 0.0) == [HandshakeComplete(ALICE.public_key())]

    victim = responder(ephemeral_secret=None)  # a fresh ephemeral key, as in real life
    assert victim.start(100.0) == []
    assert victim.receive_data(init, 100.0) == []
    assert victim.state is State.AWAIT_FINISHED
    assert victim.data_to_send(), "without a cache the replayed Init is answered"
    return victim, honest_finished


def test_replayed_init_without_cache_cannot_finish_with_old_finished() -> None:
    victim, honest_finished = replay_without_cache()
    events = victim.receive_data(honest_finished, 101.0)
    assert_rejected(victim, events, "authentication")
    assert victim.data_to_send() == b""


def test_replayed_init_without_cache_cannot_finish_with_guessed_record() -> None:
    victim, honest_finished = replay_without_cache()
    guess = reframe(flip_bit(payload_of(honest_finished), 0, 0xFF))
    assert_rejected(victim, victim.receive_data(guess, 101.0), "authentication")


def test_replayed_init_without_cache_times_out() -> None:
    victim, _ = replay_without_cache()
    assert victim.get_timer() == pytest.approx(110.0)
    assert victim.handle_timer(109.9) == []
    assert victim.state is State.AWAIT_FINISHED
    events = victim.handle_timer(110.0)
    assert_rejected(victim, events, "timed out")
    assert victim.data_to_send() == b""
    assert victim.get_timer() is None


# --- Ack refusals -------------------------------------------------------------------------


def test_ack_with_wrong_init_id() -> None:
    i, init = fresh_init()

    def retarget(msg: Ack) -> None:
        msg.init_id = "not-the-init-id"

    refuse_ack(i, edit_ack(ack_for(init), retarget), "init_id")


@pytest.mark.parametrize("index", [0, 20, 32, 63])
def test_ack_signature_bit_flip(index: int) -> None:
    i, init = fresh_init()

    def flip(msg: Ack) -> None:
        msg.signature = flip_bit(msg.signature, index)

    refuse_ack(i, edit_ack(ack_for(init), flip), "Ack signature")


def test_ack_signed_by_another_key() -> None:
    i, init = fresh_init()

    def resign(msg: Ack) -> None:
        digest = ack_digest(
            BOB.public_key().to_bytes(), ALICE.public_key().to_bytes(), msg.ephemeral_pubkey
        )
        msg.signature = sign_compact(CAROL, digest)

    refuse_ack(i, edit_ack(ack_for(init), resign), "Ack signature")


def test_ack_from_another_responder_identity() -> None:
    """Carol answers an Init meant for Bob (she ignores the recipient): her valid Ack,
    signed by her own key, is refused by an initiator that wants Bob."""
    i, init = fresh_init()

    def readdress(msg: Init) -> None:  # Alice's Init to Carol, same id and ephemeral
        msg.recipient_pubkey = CAROL.public_key().to_bytes()
        msg.signature = sign_compact(
            ALICE, init_digest(msg.sender_pubkey, msg.recipient_pubkey, msg.ephemeral_pubkey)
        )

    carol = responder(CAROL)
    carol.start(0.0)
    assert carol.receive_data(edit_init(init, readdress), 0.0) == []
    refuse_ack(i, carol.data_to_send(), "Ack signature")


def test_ack_with_malformed_ephemeral_key() -> None:
    i, init = fresh_init()

    def replace(msg: Ack) -> None:
        msg.ephemeral_pubkey = OFF_CURVE

    refuse_ack(i, edit_ack(ack_for(init), replace), "Ack ephemeral_pubkey")


@pytest.mark.parametrize("bad_id", ["", "z" * 65])
def test_ack_bad_id(bad_id: str) -> None:
    i, init = fresh_init()

    def replace(msg: Ack) -> None:
        msg.id = bad_id

    refuse_ack(i, edit_ack(ack_for(init), replace), "Ack id")


def test_initiator_refuses_non_ack() -> None:
    i, init = fresh_init()
    refuse_ack(i, init, "expected Ack")  # its own Init reflected back


def test_garbage_in_place_of_the_responders_finished() -> None:
    """Bytes after the Ack are read as the responder's Finished record: garbage there
    fails to open, and the initiator closes without its Finished or a Close."""
    i, init = fresh_init()
    events = i.receive_data(ack_for(init) + reframe(bytes(40)), 1.0)
    assert_rejected(i, events, "authentication")
    assert i.data_to_send() == b""


NEW_ALICE_EPH = b"\x0e" * 32
VICTIM_EPH = b"\x0f" * 32


class ReplayedAck(NamedTuple):
    alice: BotdConnection  # the new initiator, in AWAIT_FINISHED after the replayed Ack
    new_init: bytes
    forged_ack: bytes  # Bob's old Ack, its init_id edited
    first_init: bytes  # the old session's Init and Bob's answer to it
    old_ack: bytes
    old_finished: bytes


def replayed_ack() -> ReplayedAck:
    """Bob's Ack from an earlier session (Init id "first"), its init_id edited to answer
    a new Init (id "second", a fresh ephemeral key). The spec's Ack signature covers
    neither, so the Ack itself is accepted: the new initiator derives keys and waits for
    Bob's Finished. Deterministic: every call builds the same bytes."""
    _, first_init = fresh_init(initiator(ids=["first"]))
    old_ack, old_finished = answer_for(first_init)  # Bob's ephemeral secret: BOB_EPH

    alice, new_init = fresh_init(initiator(ids=["second"], ephemeral_secret=NEW_ALICE_EPH))

    def retarget(msg: Ack) -> None:
        msg.init_id = "second"

    forged_ack = edit_ack(old_ack, retarget)
    assert alice.receive_data(forged_ack, 1.0) == [], "an Ack alone completes nothing"
    assert alice.state is State.AWAIT_FINISHED
    assert alice.data_to_send() == b""
    return ReplayedAck(alice, new_init, forged_ack, first_init, old_ack, old_finished)


def test_replayed_ack_does_not_complete_initiator() -> None:
    """A replayer without Bob's old ephemeral secret can only replay the old Finished
    record too: under the new session's keys it fails to open."""
    replay = replayed_ack()
    events = replay.alice.receive_data(replay.old_finished, 2.0)
    assert_rejected(replay.alice, events, "failed authentication")
    assert replay.alice.data_to_send() == b"", "no Finished and no Close to the replayer"


def test_replayed_ack_alone_times_out() -> None:
    alice = replayed_ack().alice
    assert alice.get_timer() == pytest.approx(10.0)
    assert alice.handle_timer(9.9) == []
    assert_rejected(alice, alice.handle_timer(10.0), "handshake timed out")
    assert alice.data_to_send() == b""


def old_finished_signature(
    record: bytes, leaked: bytes, init: bytes, ack: bytes, *, sealed_by_initiator: bool
) -> bytes:
    """The signature inside an old session's Finished ``record``, opened as an attacker
    holding one of that session's ephemeral secrets (``leaked``) can."""
    init_eph = Frame.FromString(payload_of(init)).init.ephemeral_pubkey
    ack_eph = Frame.FromString(payload_of(ack)).ack.ephemeral_pubkey
    leaked_pub = coincurve.PrivateKey(leaked).public_key.format(compressed=True)
    assert leaked_pub in (init_eph, ack_eph)
    peer_eph = ack_eph if leaked_pub == init_eph else init_eph
    transcript = transcript_hash(payload_of(init), payload_of(ack))
    _, opener = session_ciphers(leaked, peer_eph, transcript, initiator=not sealed_by_initiator)
    frame = Frame.FromString(opener.open(payload_of(record)))
    assert frame.WhichOneof("body") == "finished"
    return frame.finished.signature


def finished_then_data(sealer: RekeyingSealer, signature: bytes, data: bytes) -> bytes:
    """A Finished carrying ``signature``, then a data record, sealed in sequence."""
    finished = reframe(sealer.seal(finished_frame(signature).SerializeToString()))
    return finished + reframe(sealer.seal(Frame(data=data).SerializeToString()))


FORGED_RESPONDER_FINISHED = [
    "old-finished-signature",
    "ack-signature",
    "own-key",
    "initiator-role",
    "empty",
    "control-bob-signs",
]


@pytest.mark.parametrize("forgery", FORGED_RESPONDER_FINISHED)
def test_replayed_ack_with_leaked_ephemeral_secret_cannot_impersonate_responder(
    forgery: str,
) -> None:
    """Mallory holds ONE old Ack and Finished of Bob's and that session's ephemeral
    secret (BOB_EPH). She can replay the Ack to a new initiator and derive the new session
    keys, so her Finished record opens; but the signature in it must be Bob's over the
    new transcript, which has Alice's fresh ephemeral key in it. No HandshakeComplete,
    no message delivered, nothing sent (docs/protocols/botd.md 4.4). The control case
    shows Mallory's records are otherwise perfect: only Bob's key could complete them."""
    replay = replayed_ack()
    alice = replay.alice

    # Mallory derives the session as Bob would, from the leaked secret.
    alice_eph = Frame.FromString(payload_of(replay.new_init)).init.ephemeral_pubkey
    transcript = transcript_hash(payload_of(replay.new_init), payload_of(replay.forged_ack))
    assert transcript == alice.transcript_hash
    sealer, _ = session_ciphers(BOB_EPH, alice_eph, transcript, initiator=False)

    signatures = {
        # Bob's genuine Finished signature, but over the old session's transcript
        "old-finished-signature": old_finished_signature(
            replay.old_finished,
            BOB_EPH,
            replay.first_init,
            replay.old_ack,
            sealed_by_initiator=False,
        ),
        # Bob's genuine signature from the Ack, over the Ack digest
        "ack-signature": Frame.FromString(payload_of(replay.forged_ack)).ack.signature,
        # the right digest, signed by Mallory's own identity key
        "own-key": sign_compact(CAROL, finished_digest(transcript, initiator=False)),
        # Alice's role's digest (what a reflected Finished would carry)
        "initiator-role": sign_compact(CAROL, finished_digest(transcript, initiator=True)),
        "empty": b"",
        # what only Bob's identity key can make
        "control-bob-signs": sign_compact(BOB, finished_digest(transcript, initiator=False)),
    }
    assert set(signatures) == set(FORGED_RESPONDER_FINISHED)
    events = alice.receive_data(finished_then_data(sealer, signatures[forgery], b"Bob here"), 2.0)
    if forgery.startswith("control"):
        assert events == [HandshakeComplete(BOB.public_key()), MessageReceived(b"Bob here")]
        return

    assert_rejected(alice, events, "Finished signature")
    assert len(events) == 1, "no message delivered"
    assert alice.data_to_send() == b"", "Alice's Finished never goes out"
    with pytest.raises(BotdError):
        alice.send(b"for Bob only")


FORGED_INITIATOR_FINISHED = [
    "old-finished-signature",
    "init-signature",
    "own-key",
    "reflected-responder-finished",
    "empty",
    "control-alice-signs",
]


@pytest.mark.parametrize("forgery", FORGED_INITIATOR_FINISHED)
def test_replayed_init_with_leaked_ephemeral_secret_cannot_impersonate_initiator(
    forgery: str,
) -> None:
    """The mirror case: Mallory replays an old Init of Alice's to a responder without a
    replay cache, and holds that Init's ephemeral secret (ALICE_EPH). She derives the new
    session keys and can read the responder's Finished, but cannot produce Alice's
    signature over the new transcript (which has the responder's fresh ephemeral key in
    it): no HandshakeComplete, no message, nothing sent beyond the Ack and Finished."""
    i, init = fresh_init()
    honest_ack, honest_r_finished = answer_for(init)
    assert i.receive_data(honest_ack + honest_r_finished, 0.0) == [
        HandshakeComplete(BOB.public_key())
    ]
    honest_i_finished = i.data_to_send()

    victim = responder(ephemeral_secret=VICTIM_EPH, ids=["victim-ack"])  # no replay cache
    victim.start(100.0)
    assert victim.receive_data(init, 100.0) == []
    victim_ack, victim_finished = split_answer(victim.data_to_send())

    # Mallory derives the session as Alice would, from the leaked secret, and can read
    # the victim's Finished.
    victim_eph = Frame.FromString(payload_of(victim_ack)).ack.ephemeral_pubkey
    transcript = transcript_hash(payload_of(init), payload_of(victim_ack))
    assert transcript == victim.transcript_hash
    sealer, opener = session_ciphers(ALICE_EPH, victim_eph, transcript, initiator=True)
    opened = Frame.FromString(opener.open(payload_of(victim_finished)))
    assert opened.WhichOneof("body") == "finished"

    signatures = {
        # Alice's genuine Finished signature, but over the old session's transcript
        "old-finished-signature": old_finished_signature(
            honest_i_finished, ALICE_EPH, init, honest_ack, sealed_by_initiator=True
        ),
        # Alice's genuine signature from the Init, over the Init digest
        "init-signature": Frame.FromString(payload_of(init)).init.signature,
        # the right digest, signed by Mallory's own identity key
        "own-key": sign_compact(CAROL, finished_digest(transcript, initiator=True)),
        # the victim's own Finished signature sent back to it
        "reflected-responder-finished": opened.finished.signature,
        "empty": b"",
        # what only Alice's identity key can make
        "control-alice-signs": sign_compact(ALICE, finished_digest(transcript, initiator=True)),
    }
    assert set(signatures) == set(FORGED_INITIATOR_FINISHED)
    stream = finished_then_data(sealer, signatures[forgery], b"Alice here")
    events = victim.receive_data(stream, 101.0)
    if forgery.startswith("control"):
        assert events == [HandshakeComplete(ALICE.public_key()), MessageReceived(b"Alice here")]
        return

    assert_rejected(victim, events, "Finished signature")
    assert len(events) == 1, "no message delivered"
    assert victim.data_to_send() == b"", "no Close to a peer that never proved itself"


# --- handshake timeout --------------------------------------------------------------------


def test_initiator_handshake_timeout() -> None:
    i = initiator()
    assert i.get_timer() is None, "no timer before start"
    i.start(5.0)
    i.data_to_send()
    assert i.get_timer() == pytest.approx(15.0)
    assert i.handle_timer(14.0) == []
    assert i.state is State.AWAIT_ACK
    assert_rejected(i, i.handle_timer(15.0), "timed out")
    assert i.get_timer() is None
    assert i.handle_timer(20.0) == []


def test_responder_handshake_timeout_while_awaiting_init() -> None:
    r = responder(config=BotdConfig(handshake_timeout=2.5))
    r.start(1.0)
    assert r.get_timer() == pytest.approx(3.5)
    assert r.handle_timer(3.0) == []
    assert_rejected(r, r.handle_timer(3.5), "timed out")
    assert r.data_to_send() == b""


def test_handshake_timer_stops_once_established() -> None:
    i, r = initiator(), responder()
    connect(i, r, now=0.0)
    assert i.get_timer() is None
    assert r.get_timer() is None
    assert i.handle_timer(100.0) == []
    assert r.handle_timer(100.0) == []
    assert i.established
    assert r.established


def test_nothing_happens_after_close() -> None:
    _, init = fresh_init()
    r = refuse_init(flip_bit(init, len(init) - 1), "Init signature")
    assert r.receive_data(init, 2.0) == []
    assert r.data_to_send() == b""
