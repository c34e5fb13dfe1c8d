"""BOTD #2 after the handshake, sans-IO on a fake clock: ping/pong rules, keepalive,
rekeying, record tampering, half-close, timers, EOF and send() limits."""

from __future__ import annotations

import array

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustmesh.botd import (
    BotdConfig,
    BotdConnection,
    BotdError,
    HandshakeComplete,
    MessageReceived,
    PeerClosed,
    PingTooSoonError,
    PongReceived,
    State,
)
from trustmesh.botd.core import RECORD_OVERHEAD
from trustmesh.botd.keyschedule import EphemeralKey, SessionKeys, next_keys
from trustmesh.botd.messages import MAX_CLOSE_REASON, MAX_CONTROL_RECORD
from trustmesh.crypto.keys import Secp256k1PrivateKey
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.wire.pb.botd_pb2 import Ack, Close, Finished, Frame, Init, Ping, Pong
from trustmesh.wire.varint import decode_uvarint, encode_uvarint

ALICE = Secp256k1PrivateKey.from_secret(b"\x05" * 32)  # initiator
BOB = Secp256k1PrivateKey.from_secret(b"\x06" * 32)  # responder
ALICE_EPH = b"\x15" * 32
BOB_EPH = b"\x16" * 32


def pair_with_finished(
    i_config: BotdConfig | None = None,
    r_config: BotdConfig | None = None,
    now: float = 0.0,
) -> tuple[BotdConnection, BotdConnection, bytes, bytes]:
    """An initiator (Alice) and a responder (Bob), established at ``now``, with the two
    Finished records as they went on the wire: Bob's (after his Ack), then Alice's."""
    i = BotdConnection(
        ALICE, peer_key=BOB.public_key(), config=i_config, ephemeral_secret=ALICE_EPH
    )
    r = BotdConnection(BOB, config=r_config, ephemeral_secret=BOB_EPH)
    i.start(now)
    r.start(now)
    assert r.receive_data(i.data_to_send(), now) == []
    ack, bob_finished = records(r.data_to_send())
    assert i.receive_data(ack + bob_finished, now) == [HandshakeComplete(BOB.public_key())]
    alice_finished = i.data_to_send()
    assert r.receive_data(alice_finished, now) == [HandshakeComplete(ALICE.public_key())]
    assert i.data_to_send() == b""
    assert r.data_to_send() == b""
    return i, r, bob_finished, alice_finished


def pair(
    i_config: BotdConfig | None = None,
    r_config: BotdConfig | None = None,
    now: float = 0.0,
) -> tuple[BotdConnection, BotdConnection]:
    """An initiator (Alice) and a responder (Bob), established at ``now``."""
    i, r, _, _ = pair_with_finished(i_config, r_config, now)
    return i, r


def deliver(src: BotdConnection, dst: BotdConnection, now: float) -> list[Event]:
    """Everything ``src`` has queued, to ``dst``; an empty queue delivers nothing (b""
    would be EOF)."""
    data = src.data_to_send()
    return dst.receive_data(data, now) if data else []


def records(stream: bytes) -> list[bytes]:
    """Split ``uvarint(len) || record`` frames (each returned with its prefix)."""
    out = []
    while stream:
        length, pos = decode_uvarint(stream)
        out.append(stream[: pos + length])
        stream = stream[pos + length :]
    return out


def inject(sender: BotdConnection, frame: Frame) -> None:
    """Make ``sender`` seal an arbitrary frame in sequence, as a misbehaving peer would."""
    sender._send_frame(frame)


def state(conn: BotdConnection) -> State:
    """The state, read through a call so mypy does not narrow it across steps."""
    return conn.state


def closed_event(events: list[Event]) -> ConnectionClosed:
    assert events, "expected a ConnectionClosed"
    last = events[-1]
    assert isinstance(last, ConnectionClosed), events
    assert not any(isinstance(e, ConnectionClosed) for e in events[:-1])
    return last


def assert_error_close(conn: BotdConnection, events: list[Event], reason: str) -> None:
    closed = closed_event(events)
    assert closed.error is True
    assert reason.lower() in closed.reason.lower(), closed.reason
    assert state(conn) is State.CLOSED


def session_keys(i: BotdConnection) -> SessionKeys:
    """The session keys of a ``pair()``, computed from the pinned ephemeral secrets and
    the connection's transcript hash (ids are random, so each pair has its own)."""
    assert i.transcript_hash is not None
    shared = EphemeralKey(ALICE_EPH).ecdh(Secp256k1PrivateKey.from_secret(BOB_EPH).public_key())
    return SessionKeys(shared, i.transcript_hash)


def nonce(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "big")


def payload(frame: bytes) -> bytes:
    _, pos = decode_uvarint(frame)
    return frame[pos:]


# --- ping / pong --------------------------------------------------------------------------


def test_ping_pong_rtt_is_the_clock_difference() -> None:
    i, r = pair()
    assert i.pending_ping_id is None
    assert i.ping(100.0) == []
    ping_id = i.pending_ping_id
    assert ping_id is not None
    assert deliver(i, r, 100.125) == []  # Bob answers silently
    assert deliver(r, i, 100.5) == [PongReceived(ping_id, 0.5)]
    assert i.pending_ping_id is None
    assert i.established
    assert r.established


def test_ping_too_soon_keeps_connection_usable() -> None:
    i, r = pair()
    i.ping(10.0)
    with pytest.raises(PingTooSoonError):
        i.ping(10.5)  # the first one is still outstanding
    with pytest.raises(PingTooSoonError):
        i.ping(50.0)  # outstanding, even past the interval
    deliver(i, r, 10.0)
    assert len(deliver(r, i, 10.25)) == 1
    with pytest.raises(PingTooSoonError):
        i.ping(39.75)  # answered, but within 30 s of the last ping
    # Nothing was queued by the refused pings, and the channel works both ways.
    assert i.data_to_send() == b""
    i.send(b"still here")
    assert deliver(i, r, 39.75) == [MessageReceived(b"still here")]
    r.send(b"me too")
    assert deliver(r, i, 39.75) == [MessageReceived(b"me too")]
    # Exactly 30 s after the last ping is allowed, and Bob does not call it a flood.
    assert i.ping(40.0) == []
    ping_id = i.pending_ping_id
    assert ping_id is not None
    assert deliver(i, r, 40.0) == []
    assert deliver(r, i, 40.25) == [PongReceived(ping_id, 0.25)]
    assert r.established


def test_responder_can_ping_too() -> None:
    i, r = pair()
    r.ping(1.0)
    ping_id = r.pending_ping_id
    assert ping_id is not None
    assert deliver(r, i, 1.0) == []
    assert deliver(i, r, 3.0) == [PongReceived(ping_id, 2.0)]


def test_two_pings_within_window_close_the_receiver() -> None:
    flooder, victim = pair(i_config=BotdConfig(ping_interval=0))
    flooder.ping(0.0)
    deliver(flooder, victim, 0.0)
    assert len(deliver(victim, flooder, 0.0)) == 1  # the pong
    flooder.ping(29.0)  # allowed by the flooder's own config, not by the spec
    events = deliver(flooder, victim, 29.0)
    assert_error_close(victim, events, "ping flood")
    # The victim told the flooder why, in an encrypted Close.
    events = deliver(victim, flooder, 29.0)
    assert len(events) == 1
    assert isinstance(events[0], PeerClosed)
    assert "ping flood" in events[0].reason
    assert state(flooder) is State.PEER_CLOSED


def test_two_pings_in_one_read_close_the_receiver() -> None:
    i, r = pair()
    inject(i, Frame(ping=Ping(id="one")))
    inject(i, Frame(ping=Ping(id="two")))
    events = deliver(i, r, 5.0)
    assert_error_close(r, events, "ping flood")
    # The first ping was answered (a Pong) before the second one closed it (a Close).
    assert len(records(r.data_to_send())) == 2


def test_pings_thirty_seconds_apart_are_fine() -> None:
    i, r = pair()
    for n in range(4):
        now = 30.0 * n
        i.ping(now)
        ping_id = i.pending_ping_id
        assert ping_id is not None
        assert deliver(i, r, now) == []
        assert deliver(r, i, now + 0.5) == [PongReceived(ping_id, 0.5)]
    assert i.established
    assert r.established


def test_pong_timeout_closes() -> None:
    i, r = pair()
    assert i.get_timer() is None
    i.ping(10.0)
    deliver(i, r, 10.0)
    r.data_to_send()  # Bob's pong is lost
    assert i.get_timer() == pytest.approx(40.0)
    assert i.handle_timer(39.5) == []
    assert i.established
    events = i.handle_timer(40.0)
    assert_error_close(i, events, "no pong")
    # An error after the handshake is explained to the peer.
    events = deliver(i, r, 40.0)
    assert len(events) == 1
    assert isinstance(events[0], PeerClosed)
    assert "pong" in events[0].reason


def test_pong_timeout_none_waits_forever() -> None:
    i, _ = pair(i_config=BotdConfig(pong_timeout=None))
    i.ping(0.0)
    assert i.get_timer() is None
    assert i.handle_timer(1e9) == []
    assert i.established


def test_keepalive_pings_automatically() -> None:
    i, r = pair(i_config=BotdConfig(keepalive=60), now=0.0)
    assert r.get_timer() is None  # Bob has no keepalive
    assert i.get_timer() == pytest.approx(60.0)
    assert i.handle_timer(59.0) == []
    assert i.data_to_send() == b""
    assert i.handle_timer(60.0) == []
    ping_id = i.pending_ping_id
    assert ping_id is not None
    assert i.get_timer() == pytest.approx(90.0)  # now the pong deadline
    assert deliver(i, r, 60.0) == []
    assert deliver(r, i, 60.5) == [PongReceived(ping_id, 0.5)]
    assert i.get_timer() == pytest.approx(120.0)  # the next keepalive
    assert i.handle_timer(120.0) == []
    assert i.pending_ping_id is not None
    assert i.pending_ping_id != ping_id
    assert deliver(i, r, 120.0) == [], "keepalives 60 s apart are no flood"
    assert len(deliver(r, i, 120.0)) == 1


def test_keepalive_with_unanswered_ping_times_out() -> None:
    i, _ = pair(i_config=BotdConfig(keepalive=60, pong_timeout=10))
    i.handle_timer(60.0)
    i.data_to_send()
    assert i.get_timer() == pytest.approx(70.0)
    assert_error_close(i, i.handle_timer(70.0), "no pong")


def test_unsolicited_pong_closes() -> None:
    i, r = pair()
    inject(r, Frame(pong=Pong(id="p1", ping_id="never-sent")))
    assert_error_close(i, deliver(r, i, 1.0), "unsolicited")


def test_pong_for_another_ping_closes() -> None:
    i, r = pair()
    i.ping(0.0)
    i.data_to_send()
    inject(r, Frame(pong=Pong(id="p1", ping_id="not-" + str(i.pending_ping_id))))
    assert_error_close(i, deliver(r, i, 1.0), "unsolicited")


def test_second_pong_for_the_same_ping_closes() -> None:
    i, r = pair()
    i.ping(0.0)
    ping_id = i.pending_ping_id
    assert ping_id is not None
    deliver(i, r, 0.0)
    assert deliver(r, i, 1.0) == [PongReceived(ping_id, 1.0)]
    inject(r, Frame(pong=Pong(id="again", ping_id=ping_id)))
    assert_error_close(i, deliver(r, i, 1.5), "unsolicited")


def test_configurable_ping_numbers() -> None:
    five = BotdConfig(ping_interval=5, ping_window=5, pong_timeout=2)
    i, r = pair(five, five)
    i.ping(0.0)
    assert i.get_timer() == pytest.approx(2.0)
    deliver(i, r, 0.0)
    deliver(r, i, 1.0)
    with pytest.raises(PingTooSoonError):
        i.ping(4.9)
    i.ping(5.0)  # 5 s later: allowed by Alice, accepted by Bob
    assert deliver(i, r, 5.0) == []
    assert r.established

    flooder, victim = pair(BotdConfig(ping_interval=0), BotdConfig(ping_window=5))
    flooder.ping(0.0)
    deliver(flooder, victim, 0.0)
    deliver(victim, flooder, 0.0)
    flooder.ping(4.9)
    assert_error_close(victim, deliver(flooder, victim, 4.9), "5 s window")


def test_config_refuses_keepalive_below_ping_interval() -> None:
    with pytest.raises(ValueError, match="keepalive"):
        BotdConfig(keepalive=10)


def test_ping_before_established_raises() -> None:
    i = BotdConnection(ALICE, peer_key=BOB.public_key())
    i.start(0.0)
    with pytest.raises(BotdError):
        i.ping(0.0)
    assert state(i) is State.AWAIT_ACK


# --- rekeying -----------------------------------------------------------------------------


def test_rekeying_every_three_records() -> None:
    config = BotdConfig(rekey_interval=3)
    i, r = pair(config, config)
    for n in range(10):
        i.send(b"i%d" % n)
        assert deliver(i, r, 1.0) == [MessageReceived(b"i%d" % n)]
        r.send(b"r%d" % n)
        assert deliver(r, i, 1.0) == [MessageReceived(b"r%d" % n)]
    # Each side sealed its Finished + 10 = 11 records: 3 rotations each way.
    assert i.rekeys == (3, 3)
    assert r.rekeys == (3, 3)
    for n in range(3):  # one direction only, so the two counts part
        i.send(b"more %d" % n)
    assert deliver(i, r, 2.0) == [MessageReceived(b"more %d" % n) for n in range(3)]
    assert i.rekeys == (4, 3)
    assert r.rekeys == (3, 4)
    assert i.rekeys == r.rekeys[::-1]


def test_rekeying_in_batches() -> None:
    config = BotdConfig(rekey_interval=3)
    i, r = pair(config, config)
    for n in range(10):
        i.send(b"i%d" % n)
        r.send(b"r%d" % n)
    assert deliver(i, r, 1.0) == [MessageReceived(b"i%d" % n) for n in range(10)]
    assert deliver(r, i, 1.0) == [MessageReceived(b"r%d" % n) for n in range(10)]
    assert i.rekeys == r.rekeys[::-1] == (3, 3)


def test_no_rekey_under_the_default_interval() -> None:
    i, r = pair()
    for n in range(10):
        i.send(b"%d" % n)
    assert len(deliver(i, r, 0.0)) == 10
    assert i.rekeys == r.rekeys == (0, 0)


def test_rotation_follows_the_documented_schedule() -> None:
    """Bob's first three records (his Finished, m0, m1) are sealed under k_r2i at
    counters 0..2; his 4th and 5th (m2, m3) under next_keys(ck_r2i, k_r2i) at counters
    0 and 1 (checked with AESGCM directly)."""
    config = BotdConfig(rekey_interval=3)
    i, r, bob_finished, _ = pair_with_finished(config, config)
    keys = session_keys(i)
    for n in range(4):
        r.send(b"m%d" % n)
    wire = r.data_to_send()
    sent = [payload(f) for f in records(wire)]
    old = AESGCM(keys.k_r2i)
    finished = Frame.FromString(old.decrypt(nonce(0), payload(bob_finished), None))
    assert finished.WhichOneof("body") == "finished"
    for n in range(2):
        assert old.decrypt(nonce(n + 1), sent[n], None) == b"\x32\x02m%d" % n
    _, k1 = next_keys(keys.ck_r2i, keys.k_r2i)
    assert k1 != keys.k_r2i
    assert AESGCM(k1).decrypt(nonce(0), sent[2], None) == b"\x32\x02m2"
    assert AESGCM(k1).decrypt(nonce(1), sent[3], None) == b"\x32\x02m3"
    with pytest.raises(InvalidTag):
        old.decrypt(nonce(3), sent[2], None)
    assert r.rekeys == (1, 0)
    # Alice follows the same schedule.
    assert i.receive_data(wire, 1.0) == [MessageReceived(b"m%d" % n) for n in range(4)]
    assert i.rekeys == (0, 1)


def test_record_under_pre_rotation_key_is_rejected_after_rotation() -> None:
    """Bob's first record, his Finished (key 0, counter 0), replayed after one rotation
    meets the same counter 0 under key 1: it fails only because the key rotated."""
    config = BotdConfig(rekey_interval=3)
    i, r, bob_finished, _ = pair_with_finished(config, config)
    keys = session_keys(i)
    for n in range(2):  # records 1 and 2 under key 0; then Bob's sealer rotates
        r.send(b"m%d" % n)
    assert deliver(r, i, 1.0) == [MessageReceived(b"m%d" % n) for n in range(2)]
    assert i.rekeys == (0, 1)
    # The captured record is genuine under the old key at the very nonce Alice now expects.
    plaintext = AESGCM(keys.k_r2i).decrypt(nonce(0), payload(bob_finished), None)
    assert Frame.FromString(plaintext).WhichOneof("body") == "finished"
    events = i.receive_data(bob_finished, 2.0)
    assert_error_close(i, events, "authentication")
    assert events == [events[-1]], "nothing delivered before the close"


def test_replayed_record_without_rotation_is_rejected() -> None:
    i, r = pair()
    r.send(b"once")
    record = r.data_to_send()
    assert i.receive_data(record, 0.0) == [MessageReceived(b"once")]
    assert_error_close(i, i.receive_data(record, 1.0), "authentication")


# --- tampered records ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["ciphertext", "tag"])
def test_bit_flip_closes_after_delivering_earlier_messages(where: str) -> None:
    i, r = pair()
    for message in (b"first", b"second", b"third"):
        r.send(message)
    first, second, third = records(r.data_to_send())
    damaged = bytearray(third)
    damaged[-1 if where == "tag" else len(third) - 17] ^= 0x40
    events = i.receive_data(first + second + bytes(damaged), 1.0)
    assert events[:2] == [MessageReceived(b"first"), MessageReceived(b"second")]
    assert_error_close(i, events, "authentication")
    assert len(events) == 3
    # Alice says goodbye with the reason; Bob learns of it.
    bob_events = deliver(i, r, 1.0)
    assert len(bob_events) == 1
    assert isinstance(bob_events[0], PeerClosed)
    assert "authentication" in bob_events[0].reason


def test_truncated_record_closes() -> None:
    i, r = pair()
    r.send(b"whole")
    record = payload(r.data_to_send())
    short = record[:10]
    assert_error_close(i, i.receive_data(encode_uvarint(len(short)) + short, 0.0), "auth")


def test_oversized_record_prefix_closes() -> None:
    """Docs: records are capped at max_message + 24 bytes (when that is over 512)."""
    assert RECORD_OVERHEAD == 24
    limit = 1000 + RECORD_OVERHEAD
    i, _ = pair(i_config=BotdConfig(max_message=1000))
    assert i.receive_data(encode_uvarint(limit), 0.0) == []  # waits for the body
    i, r = pair(i_config=BotdConfig(max_message=1000))
    events = i.receive_data(encode_uvarint(limit + 1), 0.0)
    assert_error_close(i, events, f"exceeds the {limit}-byte limit")
    peer_closed = deliver(i, r, 0.0)
    assert len(peer_closed) == 1
    assert isinstance(peer_closed[0], PeerClosed)
    assert "exceeds" in peer_closed[0].reason


def test_record_limit_never_drops_below_the_control_record_size() -> None:
    """With max_message + 24 under 512, the limit is 512, so control records fit."""
    assert MAX_CONTROL_RECORD == 512
    i, _ = pair(i_config=BotdConfig(max_message=100))
    assert i.receive_data(encode_uvarint(MAX_CONTROL_RECORD), 0.0) == []  # waits
    i, _ = pair(i_config=BotdConfig(max_message=100))
    events = i.receive_data(encode_uvarint(MAX_CONTROL_RECORD + 1), 0.0)
    assert_error_close(i, events, f"exceeds the {MAX_CONTROL_RECORD}-byte limit")


def test_received_message_over_max_message_closes() -> None:
    """A peer that allows itself more than we do: its big message closes our side."""
    i, r = pair(i_config=BotdConfig(max_message=1000), r_config=BotdConfig(max_message=100))
    i.send(b"x" * 100)
    assert deliver(i, r, 0.0) == [MessageReceived(b"x" * 100)]
    i.send(b"x" * 101)
    assert_error_close(r, deliver(i, r, 0.0), "exceeds")


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(Frame(init=Init()), id="init"),
        pytest.param(Frame(ack=Ack()), id="ack"),
    ],
)
def test_handshake_frame_after_handshake_closes(frame: Frame) -> None:
    i, r = pair()
    inject(r, frame)
    assert_error_close(i, deliver(r, i, 0.0), "after the handshake")


def test_second_finished_closes() -> None:
    i, r = pair()
    inject(i, Frame(finished=Finished()))
    assert_error_close(r, deliver(i, r, 0.0), "Finished out of place")


# --- close --------------------------------------------------------------------------------


def test_half_close_then_orderly_close_on_both_sides() -> None:
    i, r = pair()
    assert i.close("bye", 1.0) == []
    assert state(i) is State.CLOSING
    with pytest.raises(BotdError):
        i.send(b"after close")
    assert deliver(i, r, 1.0) == [PeerClosed("bye")]
    assert state(r) is State.PEER_CLOSED

    # Bob may still answer, and Alice, closing, still receives.
    r.send(b"reply 1")
    r.send(b"reply 2")
    assert deliver(r, i, 1.5) == [MessageReceived(b"reply 1"), MessageReceived(b"reply 2")]
    assert state(i) is State.CLOSING

    bob_closed = closed_event(r.close("done", 2.0))
    assert bob_closed.error is False
    assert bob_closed.by_peer is True
    assert "bye" in bob_closed.reason
    assert state(r) is State.CLOSED

    alice_closed = closed_event(deliver(r, i, 2.0))
    assert alice_closed.error is False
    assert alice_closed.by_peer is False
    assert "bye" in alice_closed.reason
    assert state(i) is State.CLOSED
    assert i.get_timer() is None
    assert r.get_timer() is None
    assert i.data_to_send() == b""


def test_simultaneous_close_is_orderly_on_both_sides() -> None:
    i, r = pair()
    i.close("alice leaves", 1.0)
    r.close("bob leaves", 1.0)
    alice_closed = closed_event(deliver(r, i, 1.5))
    bob_closed = closed_event(deliver(i, r, 1.5))
    assert (alice_closed.error, bob_closed.error) == (False, False)
    assert "alice leaves" in alice_closed.reason
    assert "bob leaves" in bob_closed.reason
    assert state(i) is State.CLOSED
    assert state(r) is State.CLOSED


def test_close_with_empty_reason() -> None:
    i, r = pair()
    i.close("", 0.0)
    assert deliver(i, r, 0.0) == [PeerClosed("no reason given")]


def test_peer_closed_side_cannot_ping() -> None:
    i, r = pair()
    i.close("bye", 0.0)
    deliver(i, r, 0.0)
    with pytest.raises(BotdError):
        r.ping(0.0)
    assert state(r) is State.PEER_CLOSED


def test_close_twice_is_harmless() -> None:
    i, r = pair()
    i.close("bye", 0.0)
    first = i.data_to_send()
    assert first
    assert i.close("again", 0.5) == []
    assert i.data_to_send() == b"", "only one Close on the wire"
    assert r.receive_data(first, 1.0) == [PeerClosed("bye")]


def test_close_timeout_in_closing() -> None:
    i, _ = pair(i_config=BotdConfig(close_timeout=2.5))
    i.close("bye", 10.0)
    i.data_to_send()  # Bob never answers
    assert i.get_timer() == pytest.approx(12.5)
    assert i.handle_timer(12.0) == []
    assert state(i) is State.CLOSING
    closed = closed_event(i.handle_timer(12.5))
    assert "bye" in closed.reason
    assert closed.by_peer is False
    assert state(i) is State.CLOSED
    assert i.get_timer() is None


def test_close_timeout_in_peer_closed() -> None:
    i, r = pair(r_config=BotdConfig(close_timeout=3))
    i.close("bye", 10.0)
    assert deliver(i, r, 10.5) == [PeerClosed("bye")]
    assert r.get_timer() == pytest.approx(13.5)
    assert r.handle_timer(13.0) == []
    assert state(r) is State.PEER_CLOSED
    closed = closed_event(r.handle_timer(13.5))
    assert closed.error is False
    assert closed.by_peer is True
    assert state(r) is State.CLOSED
    # Bob's automatic Close still reaches Alice, who finishes in order.
    alice_closed = closed_event(deliver(r, i, 13.5))
    assert alice_closed.error is False
    assert state(i) is State.CLOSED


def test_anything_after_peers_close_is_an_error() -> None:
    i, r = pair()
    inject(i, Frame(close=Close()))
    i.send(b"sneaky")  # still ESTABLISHED on Alice's side, so send() works
    events = deliver(i, r, 0.0)
    assert isinstance(events[0], PeerClosed)
    assert_error_close(r, events, "after the peer's own Close")


def test_close_before_established_sends_nothing() -> None:
    i = BotdConnection(ALICE, peer_key=BOB.public_key())
    i.start(0.0)
    i.data_to_send()
    closed = closed_event(i.close("never mind", 1.0))
    assert closed.error is False
    assert i.data_to_send() == b""
    assert state(i) is State.CLOSED


# --- EOF ----------------------------------------------------------------------------------


def test_eof_mid_handshake_is_an_error() -> None:
    i = BotdConnection(ALICE, peer_key=BOB.public_key())
    r = BotdConnection(BOB)
    i.start(0.0)
    r.start(0.0)
    r.receive_data(i.data_to_send(), 0.0)  # Bob now waits for Finished
    assert r.data_to_send()  # the Ack, which never arrives
    assert (i.state, r.state) == (State.AWAIT_ACK, State.AWAIT_FINISHED)
    for side in (i, r):
        events = side.receive_data(b"", 1.0)
        assert len(events) == 1
        closed = closed_event(events)
        assert closed.error is True
        assert closed.by_peer is True
        assert "handshake" in closed.reason
        assert state(side) is State.CLOSED
        assert side.data_to_send() == b""


def test_eof_without_close_is_an_error() -> None:
    i, r = pair()
    r.send(b"last words")
    events = i.receive_data(r.data_to_send(), 1.0)
    assert events == [MessageReceived(b"last words")]
    closed = closed_event(i.receive_data(b"", 1.0))
    assert closed.error is True
    assert closed.by_peer is True
    assert "without Close" in closed.reason


def test_eof_after_our_close_is_orderly() -> None:
    i, _ = pair()
    i.close("bye", 0.0)
    closed = closed_event(i.receive_data(b"", 1.0))
    assert closed.error is False


def test_eof_after_peers_close_is_orderly() -> None:
    i, r = pair()
    i.close("bye", 0.0)
    deliver(i, r, 0.0)
    closed = closed_event(r.receive_data(b"", 1.0))
    assert closed.error is False
    assert closed.by_peer is True


def test_nothing_after_closed() -> None:
    i, r = pair()
    assert_error_close(i, i.receive_data(b"", 0.0), "without Close")
    r.send(b"too late")
    assert i.receive_data(r.data_to_send(), 1.0) == []
    assert i.handle_timer(100.0) == []
    assert i.close("again", 2.0) == []


# --- send() limits ------------------------------------------------------------------------


def test_send_over_max_message_raises_and_channel_survives() -> None:
    i, r = pair(i_config=BotdConfig(max_message=100))
    with pytest.raises(ValueError, match="exceeds"):
        i.send(b"x" * 101)
    assert i.established
    assert i.data_to_send() == b""
    i.send(b"x" * 100)  # no nonce was spent on the refused message
    assert deliver(i, r, 0.0) == [MessageReceived(b"x" * 100)]


def test_send_over_default_max_message_raises() -> None:
    i, r = pair()
    with pytest.raises(ValueError):
        i.send(bytes((1 << 20) + 1))
    i.send(b"fine")
    assert deliver(i, r, 0.0) == [MessageReceived(b"fine")]


def test_send_before_established_raises() -> None:
    i = BotdConnection(ALICE, peer_key=BOB.public_key())
    r = BotdConnection(BOB)
    with pytest.raises(BotdError, match="start"):
        i.send(b"too early")
    i.start(0.0)
    r.start(0.0)
    with pytest.raises(BotdError, match="await-ack"):
        i.send(b"too early")
    with pytest.raises(BotdError, match="await-init"):
        r.send(b"too early")
    r.receive_data(i.data_to_send(), 0.0)
    with pytest.raises(BotdError, match="await-finished"):
        r.send(b"too early")
    ack, bob_finished = records(r.data_to_send())
    assert i.receive_data(ack, 0.0) == []
    with pytest.raises(BotdError, match="await-finished"):
        i.send(b"too early")  # keys derived, but Bob's Finished not yet checked
    with pytest.raises(BotdError, match="await-finished"):
        i.ping(0.0)
    # None of the refusals broke the handshake.
    assert i.receive_data(bob_finished, 0.0) == [HandshakeComplete(BOB.public_key())]
    assert r.receive_data(i.data_to_send(), 0.0) == [HandshakeComplete(ALICE.public_key())]


# --- fixed bugs (regressions) -------------------------------------------------------------


def test_keepalive_deadline_at_clock_zero() -> None:
    """get_timer() once filtered deadlines with `if d`, dropping a deadline of 0.0."""
    i, _ = pair(i_config=BotdConfig(keepalive=60), now=-60.0)
    assert i.get_timer() == 0.0
    assert i.handle_timer(0.0) == []
    assert i.pending_ping_id is not None, "the keepalive ping went at 0.0"


def test_ping_works_with_small_max_message() -> None:
    """Records were capped at max_message + 24 bytes, so with a small max_message a
    Ping/Pong record was refused as oversize."""
    small = BotdConfig(max_message=16)
    i, r = pair(small, small)
    i.ping(0.0)
    ping_id = i.pending_ping_id
    assert ping_id is not None
    assert deliver(i, r, 0.0) == []
    assert deliver(r, i, 0.5) == [PongReceived(ping_id, 0.5)]


def test_close_reason_fits_with_small_max_message() -> None:
    """A Close with a long reason was refused as oversize by a peer with a small
    max_message."""
    small = BotdConfig(max_message=100)
    i, r = pair(small, small)
    i.close("r" * 200, 0.0)
    assert deliver(i, r, 0.0) == [PeerClosed("r" * 200)]


def test_close_reason_is_cut_to_256_bytes_on_a_character_boundary() -> None:
    """Docs: a Close reason goes out as at most 256 bytes of UTF-8, so the Close record
    always fits, even for the smallest max_message."""
    assert MAX_CLOSE_REASON == 256
    tiny = BotdConfig(max_message=1)
    i, r = pair(tiny, tiny)
    reason = "a" + "€" * 200  # 601 bytes; 256 would end inside the 86th euro sign
    i.close(reason, 0.0)
    events = deliver(i, r, 0.0)
    assert events == [PeerClosed("a" + "€" * 85)]
    assert len(("a" + "€" * 85).encode()) == 256
    # The closing side keeps its full reason locally.
    r.close("bye", 0.0)
    closed = closed_event(deliver(r, i, 0.0))
    assert closed.reason == reason
    assert closed.error is False


def test_a_view_of_wider_items_is_sent_as_its_bytes() -> None:
    # send() measured the message with len(): items, not bytes. A view of 4-byte items
    # got a header a quarter of its size, and the peer a malformed frame.
    i, r = pair()
    words = memoryview(array.array("I", range(64)))
    assert i.send(words) == []
    events = deliver(i, r, 0.0)
    assert [e.data for e in events if isinstance(e, MessageReceived)] == [words.tobytes()]
