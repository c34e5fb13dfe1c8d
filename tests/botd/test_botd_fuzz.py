"""Hostile input to BOTD #2: property tests of the frame parser, the field checks and the
sans-IO core fed garbage (before, during and after the handshake), split at any point.

Every core here is deterministic (fixed identity keys, fixed ephemeral secrets, counter
ids), so a failing example replays exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trustmesh.botd import (
    BotdConfig,
    BotdConnection,
    HandshakeComplete,
    MessageReceived,
    PeerClosed,
    PongReceived,
    State,
)
from trustmesh.botd.core import RECORD_OVERHEAD
from trustmesh.botd.keyschedule import (
    EphemeralKey,
    RekeyingSealer,
    SessionKeys,
    ack_digest,
    finished_digest,
    init_digest,
    sign_compact,
)
from trustmesh.botd.messages import (
    MAX_CLOSE_REASON,
    MAX_CONTROL_RECORD,
    MAX_HANDSHAKE_FRAME,
    MAX_ID_LENGTH,
    Ack,
    Close,
    Finished,
    Frame,
    Init,
    Ping,
    Pong,
    check_id,
    parse_frame,
    parse_pubkey,
)
from trustmesh.crypto.aead import TAG_SIZE
from trustmesh.crypto.keys import Secp256k1PrivateKey, Secp256k1PublicKey
from trustmesh.errors import DecodeError, InvalidKeyError
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.wire.frames import decode_frame
from trustmesh.wire.varint import decode_uvarint, encode_uvarint

FUZZ = settings(max_examples=100, deadline=None)
QUICK = settings(max_examples=30, deadline=None)

RESPONDER = Secp256k1PrivateKey.from_secret(b"\x01" * 32)
INITIATOR = Secp256k1PrivateKey.from_secret(b"\x02" * 32)
STRANGER = Secp256k1PrivateKey.from_secret(b"\x03" * 32)
R_PUB = RESPONDER.public_key().to_bytes()
I_PUB = INITIATOR.public_key().to_bytes()
I_EPH = b"\x11" * 32
R_EPH = b"\x22" * 32
VALID_EPHEMERALS = [
    Secp256k1PrivateKey.from_secret(bytes([n]) * 32).public_key().to_bytes() for n in (4, 5, 6)
]
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
POST_LIMIT = max(BotdConfig().max_message + RECORD_OVERHEAD, MAX_CONTROL_RECORD)
EOF_HANDSHAKE = ConnectionClosed("peer closed during the handshake", error=True, by_peer=True)
EOF_ESTABLISHED = ConnectionClosed("peer ended the stream without Close", error=True, by_peer=True)
BODIES = {"init", "ack", "finished", "ping", "pong", "data", "close"}


# --- deterministic cores --------------------------------------------------------------------


def _ids(prefix: str) -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter):031x}"


def make_responder(config: BotdConfig | None = None) -> BotdConnection:
    core = BotdConnection(RESPONDER, config=config, ephemeral_secret=R_EPH, new_id=_ids("r"))
    assert core.start(0.0) == []
    assert core.state is State.AWAIT_INIT
    return core


def make_initiator(config: BotdConfig | None = None) -> tuple[BotdConnection, bytes]:
    """An initiator in AWAIT_ACK, and the Init frame it sent."""
    core = BotdConnection(
        INITIATOR,
        peer_key=RESPONDER.public_key(),
        config=config,
        ephemeral_secret=I_EPH,
        new_id=_ids("i"),
    )
    assert core.start(0.0) == []
    assert core.state is State.AWAIT_ACK
    init_wire = core.data_to_send()
    assert init_wire
    return core, init_wire


def split_first_frame(wire: bytes) -> tuple[bytes, bytes]:
    """The first frame's payload, and the bytes after that frame."""
    size, start = decode_uvarint(wire)
    return wire[start : start + size], wire[start + size :]


INIT_WIRE = make_initiator()[1]
INIT_PAYLOAD = decode_frame(INIT_WIRE, MAX_HANDSHAKE_FRAME)
INIT_ID = parse_frame(INIT_PAYLOAD)[1].init.id


def _responder_answer() -> bytes:
    responder = make_responder()
    assert responder.receive_data(INIT_WIRE, 0.0) == []
    return responder.data_to_send()


# The responder's answer: the Ack, then its Finished record.
ACK_AND_FINISHED = _responder_answer()
ACK_PAYLOAD, R_FINISHED_WIRE = split_first_frame(ACK_AND_FINISHED)
ACK_WIRE = encode_uvarint(len(ACK_PAYLOAD)) + ACK_PAYLOAD
assert R_FINISHED_WIRE


def handshake(
    config: BotdConfig | None = None, split: Callable[[bytes], list[bytes]] | None = None
) -> tuple[BotdConnection, BotdConnection]:
    """A real handshake; ``split`` chops each handshake message into receive_data calls."""
    chop = split or (lambda wire: [wire])
    initiator, init_wire = make_initiator(config)
    responder = make_responder(config)
    assert feed(responder, chop(init_wire)) == []
    assert feed(initiator, chop(responder.data_to_send())) == [
        HandshakeComplete(RESPONDER.public_key())
    ]
    assert feed(responder, chop(initiator.data_to_send())) == [
        HandshakeComplete(INITIATOR.public_key())
    ]
    assert initiator.established and responder.established
    assert initiator.data_to_send() == b"" and responder.data_to_send() == b""
    return initiator, responder


def forged_sealer(core: BotdConnection, *, as_initiator: bool) -> RekeyingSealer:
    """The sending keys of ``core``'s peer, derived independently from the two ephemeral
    secrets and ``core``'s transcript: a peer that holds the session keys and may send
    whatever it likes. Its first record is record 0 (the Finished)."""
    assert core.transcript_hash is not None
    own, peer = (I_EPH, R_EPH) if as_initiator else (R_EPH, I_EPH)
    shared = EphemeralKey(own).ecdh(Secp256k1PrivateKey.from_secret(peer).public_key())
    sealer, _ = SessionKeys(shared, core.transcript_hash).ciphers(
        initiator=as_initiator, rekey_interval=core.config.rekey_interval
    )
    return sealer


def evil_initiator_sealer(responder: BotdConnection) -> RekeyingSealer:
    """The initiator's keys, positioned after its Finished (post-handshake abuse)."""
    sealer = forged_sealer(responder, as_initiator=True)
    sealer.seal(b"")  # record 0, the Finished, went already
    return sealer


# --- feeding and checking -------------------------------------------------------------------


def feed(core: BotdConnection, chunks: list[bytes], now: float = 0.0) -> list[Event]:
    """One receive_data call per chunk (none empty: b"" is EOF). Checks, per call, that
    once a ConnectionClosed came out nothing more does."""
    events: list[Event] = []
    for chunk in chunks:
        assert chunk, "an empty chunk would be EOF"
        closed = any(isinstance(e, ConnectionClosed) for e in events)
        got = core.receive_data(chunk, now)
        if closed:
            assert got == [], "events after ConnectionClosed"
        events.extend(got)
    return events


def the_close(events: list[Event]) -> ConnectionClosed | None:
    """The one ConnectionClosed, which must be the last event, or None."""
    closes = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closes) <= 1, f"several closes: {events}"
    if not closes:
        return None
    assert events[-1] is closes[0], f"ConnectionClosed is not the last event: {events}"
    return closes[0]


def assert_dead(core: BotdConnection) -> None:
    """A closed core ignores everything and says nothing."""
    assert core.state is State.CLOSED
    assert core.receive_data(INIT_WIRE, 0.0) == []
    assert core.receive_data(b"\x05hello", 0.0) == []
    assert core.receive_data(b"", 0.0) == []
    assert core.handle_timer(1e9) == []
    assert core.data_to_send() == b""


def draw_chunks(data: st.DataObject, stream: bytes, label: str = "cuts") -> list[bytes]:
    """``stream`` cut at arbitrary points into non-empty chunks."""
    if len(stream) < 2:
        return [stream] if stream else []
    cuts = data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8), label=label)
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def _is_compressed_point(data: bytes) -> bool:
    """Independent oracle (OpenSSL, not libsecp256k1): a 33-byte compressed secp256k1 point."""
    if len(data) != 33 or data[0] not in (2, 3):
        return False
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), data)
    except ValueError:
        return False
    return True


# --- strategies -----------------------------------------------------------------------------


def _framed(payload: bytes) -> bytes:
    return encode_uvarint(len(payload)) + payload


def _tag(number: int, wire_type: int) -> bytes:
    return encode_uvarint(number << 3 | wire_type)


def _varint_field(number: int, value: int) -> bytes:
    return _tag(number, 0) + encode_uvarint(value)


def _fixed_field(number: int, wire_type: int, value: bytes) -> bytes:
    return _tag(number, wire_type) + value


def _len_field(number: int, value: bytes) -> bytes:
    return _tag(number, 2) + _framed(value)


def _truncations(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` cut short (by at least one byte when it has any)."""
    return st.integers(0, max(0, len(data) - 1)).map(lambda k: data[:k])


_field_number = st.one_of(st.integers(1, 8), st.integers(0, (1 << 29) - 1))
_scalar_field = st.one_of(
    st.builds(_varint_field, _field_number, st.integers(0, (1 << 63) - 1)),
    st.builds(_fixed_field, _field_number, st.just(1), st.binary(min_size=8, max_size=8)),
    st.builds(_fixed_field, _field_number, st.just(5), st.binary(min_size=4, max_size=4)),
    st.builds(_len_field, _field_number, st.binary(max_size=40)),
    # stray group markers and the two undefined wire types
    st.builds(_fixed_field, _field_number, st.integers(3, 7), st.just(b"")),
)


def _nested(inner: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    field = st.one_of(_scalar_field, st.builds(_len_field, _field_number, inner))
    return st.lists(field, max_size=4).map(b"".join)


# Protobuf-shaped bytes: fields of every wire type, messages nested in messages.
protobuf_wire = st.recursive(
    st.lists(_scalar_field, max_size=4).map(b"".join), _nested, max_leaves=10
)

_text = st.text(max_size=80)
_bytes = st.binary(max_size=80)

FRAME_STRATEGIES: dict[str, st.SearchStrategy[Frame]] = {
    "init": st.builds(
        Init,
        id=_text,
        sender_pubkey=_bytes,
        recipient_pubkey=_bytes,
        ephemeral_pubkey=_bytes,
        signature=_bytes,
    ).map(lambda m: Frame(init=m)),
    "ack": st.builds(Ack, id=_text, init_id=_text, ephemeral_pubkey=_bytes, signature=_bytes).map(
        lambda m: Frame(ack=m)
    ),
    "finished": st.just(Finished()).map(lambda m: Frame(finished=m)),
    "ping": st.builds(Ping, id=_text).map(lambda m: Frame(ping=m)),
    "pong": st.builds(Pong, id=_text, ping_id=_text).map(lambda m: Frame(pong=m)),
    "data": st.binary(max_size=200).map(lambda d: Frame(data=d)),
    "close": st.builds(Close, reason=st.text(max_size=300)).map(lambda m: Frame(close=m)),
}
any_frame = st.one_of(
    *(st.tuples(st.just(name), strategy) for name, strategy in FRAME_STRATEGIES.items())
)
any_frame_bytes = any_frame.map(lambda named: named[1].SerializeToString())

hostile_payload = st.one_of(
    st.binary(max_size=120),
    protobuf_wire,
    protobuf_wire.flatmap(_truncations),
    any_frame_bytes,
    any_frame_bytes.flatmap(_truncations),
)
# What an unauthenticated stranger can put on the wire before the handshake (never
# empty: b"" would be EOF).
_one_frame = hostile_payload.map(_framed)
hostile_stream = st.one_of(
    st.binary(min_size=1, max_size=700),
    _one_frame,
    _one_frame,
    st.lists(_one_frame, min_size=2, max_size=3).map(b"".join),
    _one_frame.flatmap(lambda wire: st.integers(1, len(wire)).map(lambda k: wire[:k])),
    st.tuples(st.binary(min_size=1, max_size=9), hostile_payload).map(lambda t: t[0] + t[1]),
)


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


invalid_utf8 = st.one_of(
    st.sampled_from(
        [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"a\x80b"]
    ),
    st.binary(min_size=1, max_size=24).filter(_not_utf8),
)

_point_from_scalar = st.integers(1, SECP256K1_ORDER - 1).map(
    lambda k: ec.derive_private_key(k, ec.SECP256K1()).public_key()
)
# Key-shaped junk: any length, 33 bytes with a point prefix (about half are on the
# curve), uncompressed points, and the odd valid compressed point.
junk_key = st.one_of(
    st.binary(max_size=70),
    st.tuples(st.sampled_from([b"\x02", b"\x03"]), st.binary(min_size=32, max_size=32)).map(
        b"".join
    ),
    st.binary(min_size=33, max_size=33),
    _point_from_scalar.map(lambda p: p.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)),
    _point_from_scalar.map(lambda p: p.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)),
)
ident = st.one_of(st.just("0123456789abcdef" * 2), st.text(max_size=70))


def non_minimal_uvarint(value: int, padding: int) -> bytes:
    """``value`` encoded with ``padding`` extra zero groups (at most 9 bytes in all)."""
    minimal = encode_uvarint(value)
    encoded = minimal[:-1] + bytes([minimal[-1] | 0x80]) + b"\x80" * (padding - 1) + b"\x00"
    assert len(encoded) <= 9
    return encoded


@st.composite
def non_minimal_uvarints(draw: st.DrawFn) -> bytes:
    value = draw(st.integers(0, (1 << 56) - 1))
    padding = draw(st.integers(1, 9 - len(encode_uvarint(value))))
    return non_minimal_uvarint(value, padding)


# --- parse_frame, check_id, parse_pubkey --------------------------------------------------


@FUZZ
@given(payload=st.one_of(hostile_payload, st.binary(max_size=600)))
@example(payload=b"")
@example(payload=b"\x0b" * 200)  # deep group nesting
@example(payload=b"\x7b" * 200 + b"\x7c" * 200)
@example(payload=b"\x08\x01")  # only an unknown-to-oneof field
def test_parse_frame_raises_only_decode_error(payload: bytes) -> None:
    try:
        body, frame = parse_frame(payload)
    except DecodeError:
        return  # any other exception fails the test
    assert body in BODIES
    assert frame.WhichOneof("body") == body


@FUZZ
@given(named=any_frame)
def test_parse_frame_round_trips_every_body(named: tuple[str, Frame]) -> None:
    name, frame = named
    wire = frame.SerializeToString()
    body, parsed = parse_frame(wire)
    assert body == name
    assert parsed == frame
    assert parsed.SerializeToString() == wire


STRING_FIELDS = [
    ("init", 1, 1),  # Init.id
    ("ack", 2, 1),  # Ack.id
    ("ack", 2, 2),  # Ack.init_id
    ("ping", 4, 1),  # Ping.id
    ("pong", 5, 1),  # Pong.id
    ("pong", 5, 2),  # Pong.ping_id
    ("close", 7, 1),  # Close.reason
]


@pytest.mark.parametrize(("body", "frame_field", "field"), STRING_FIELDS)
@QUICK
@given(raw=invalid_utf8)
def test_invalid_utf8_in_a_string_field_is_a_decode_error(
    body: str, frame_field: int, field: int, raw: bytes
) -> None:
    def payload(value: bytes) -> bytes:
        return _len_field(frame_field, _len_field(field, value))

    with pytest.raises(DecodeError):
        parse_frame(payload(raw))
    # Control: the same bytes made valid UTF-8 parse, so the UTF-8 was the only fault.
    text = raw.decode("utf-8", "replace")
    parsed_body, frame = parse_frame(payload(text.encode()))
    assert parsed_body == body
    message = getattr(frame, body)
    assert getattr(message, message.DESCRIPTOR.fields_by_number[field].name) == text


def test_invalid_utf8_init_id_closes_the_responder() -> None:
    payload = _len_field(1, _len_field(1, b"\xff"))
    assert payload == b"\x0a\x03\x0a\x01\xff"
    with pytest.raises(DecodeError):
        parse_frame(payload)
    core = make_responder()
    close = the_close(core.receive_data(_framed(payload), 0.0))
    assert close is not None and close.error and not close.by_peer
    assert "UTF-8" in close.reason
    assert core.data_to_send() == b""


@FUZZ
@given(value=st.text(max_size=100), what=st.text(max_size=20))
@example(value="", what="id")
@example(value="x" * MAX_ID_LENGTH, what="id")
@example(value="x" * (MAX_ID_LENGTH + 1), what="id")
def test_check_id_accepts_1_to_64_characters_and_raises_only_decode_error(
    value: str, what: str
) -> None:
    if 0 < len(value) <= MAX_ID_LENGTH:
        assert check_id(value, what) == value
    else:
        with pytest.raises(DecodeError):
            check_id(value, what)


@FUZZ
@given(data=junk_key, what=st.text(max_size=20))
@example(data=b"\x02" + b"\x00" * 32, what="k")  # x = 0 is not on the curve
@example(data=b"\x02" + b"\xff" * 32, what="k")  # x >= p
@example(data=b"\x04" + b"\x01" * 32, what="k")
def test_parse_pubkey_accepts_exactly_compressed_points(data: bytes, what: str) -> None:
    try:
        key = parse_pubkey(data, what)
    except InvalidKeyError:  # any other exception fails the test
        assert not _is_compressed_point(data)
        return
    assert _is_compressed_point(data)
    assert isinstance(key, Secp256k1PublicKey)
    assert key.to_bytes() == data


# --- before the handshake: garbage to a responder and to an initiator ------------------------


def _check_garbage_outcome(
    core: BotdConnection, events: list[Event], whole_closed: bool, waiting: State
) -> None:
    assert all(isinstance(e, ConnectionClosed) for e in events), events
    close = the_close(events)
    assert core.data_to_send() == b"", "sent something to an unauthenticated peer"
    # Whether the garbage closes does not depend on how it was split.
    assert (close is not None) == whole_closed
    if close is None:
        assert core.state is waiting
        assert core.receive_data(b"", 0.0) == [EOF_HANDSHAKE]
    else:
        assert close.error and not close.by_peer and close.reason
    assert core.peer_key is None or core.initiator
    assert_dead(core)


@FUZZ
@given(stream=hostile_stream, data=st.data())
def test_responder_survives_garbage_split_anywhere(stream: bytes, data: st.DataObject) -> None:
    whole = make_responder()
    whole_events = whole.receive_data(stream, 0.0)
    whole_closed = the_close(whole_events) is not None

    core = make_responder()
    events = feed(core, draw_chunks(data, stream))
    _check_garbage_outcome(core, events, whole_closed, State.AWAIT_INIT)


@FUZZ
@given(stream=hostile_stream, data=st.data())
def test_initiator_survives_garbage_ack_split_anywhere(stream: bytes, data: st.DataObject) -> None:
    whole, _ = make_initiator()
    whole_events = whole.receive_data(stream, 0.0)
    whole_closed = the_close(whole_events) is not None

    core, _ = make_initiator()
    events = feed(core, draw_chunks(data, stream))
    _check_garbage_outcome(core, events, whole_closed, State.AWAIT_ACK)


good_ident = st.one_of(st.just("0123456789abcdef" * 2), st.text(min_size=1, max_size=64))
STRANGER_PUB = STRANGER.public_key().to_bytes()


@st.composite
def init_attempts(draw: st.DrawFn) -> tuple[bytes, bool, bool]:
    """An Init with zero, one or two faulty fields (a faulty draw may still happen to be
    valid: the oracle decides). Returns the payload, whether a correct responder must
    accept it, and whether an allow-list (of INITIATOR only) is in force."""
    faults = draw(st.sets(st.sampled_from(["id", "sender", "recipient", "eph", "sig"]), max_size=2))
    signer = draw(st.sampled_from([INITIATOR, STRANGER]))
    allow_list = draw(st.booleans())
    signer_pub = signer.public_key().to_bytes()
    id_ = draw(ident if "id" in faults else good_ident)
    sender = signer_pub
    if "sender" in faults:
        sender = draw(st.one_of(st.sampled_from([I_PUB, R_PUB, STRANGER_PUB]), junk_key))
    recipient = R_PUB
    if "recipient" in faults:
        recipient = draw(st.one_of(st.sampled_from([I_PUB, STRANGER_PUB]), junk_key))
    ephemeral = draw(junk_key if "eph" in faults else st.sampled_from(VALID_EPHEMERALS))
    good_signature = sign_compact(signer, init_digest(sender, recipient, ephemeral))
    signature = draw(st.binary(max_size=70)) if "sig" in faults else good_signature
    payload = Frame(
        init=Init(
            id=id_,
            sender_pubkey=sender,
            recipient_pubkey=recipient,
            ephemeral_pubkey=ephemeral,
            signature=signature,
        )
    ).SerializeToString()
    valid = (
        0 < len(id_) <= MAX_ID_LENGTH
        and recipient == R_PUB
        and sender == signer_pub
        and (signer is INITIATOR or not allow_list)
        and _is_compressed_point(ephemeral)
        and signature == good_signature
    )
    return payload, valid, allow_list


@FUZZ
@given(attempt=init_attempts(), data=st.data())
def test_responder_accepts_exactly_the_valid_inits(
    attempt: tuple[bytes, bool, bool], data: st.DataObject
) -> None:
    payload, valid, allow_list = attempt
    config = BotdConfig(allow=frozenset({INITIATOR.public_key()})) if allow_list else None
    core = make_responder(config)
    events = feed(core, draw_chunks(data, _framed(payload)))
    out = core.data_to_send()
    if valid:
        assert events == []
        assert core.state is State.AWAIT_FINISHED
        ack, finished_record = split_first_frame(out)
        body, frame = parse_frame(ack)
        assert body == "ack"
        assert frame.ack.init_id == parse_frame(payload)[1].init.id
        assert finished_record  # its Finished, encrypted
        assert core.peer_key is not None
        assert core.peer_key.to_bytes() == parse_frame(payload)[1].init.sender_pubkey
        assert core.receive_data(b"", 0.0) == [EOF_HANDSHAKE]  # not established yet
    else:
        close = the_close(events)
        assert events == [close] and close is not None and close.error and not close.by_peer
        assert out == b""
        assert core.peer_key is None
    assert_dead(core)


@st.composite
def ack_attempts(draw: st.DrawFn) -> tuple[bytes, bool]:
    """An Ack with zero, one or two faulty fields; returns it and whether it is valid."""
    faults = draw(st.sets(st.sampled_from(["init_id", "id", "eph", "signer", "sig"]), max_size=2))
    signer = STRANGER if "signer" in faults else RESPONDER
    init_id = draw(ident) if "init_id" in faults else INIT_ID
    id_ = draw(ident if "id" in faults else good_ident)
    ephemeral = draw(junk_key if "eph" in faults else st.sampled_from(VALID_EPHEMERALS))
    good_signature = sign_compact(signer, ack_digest(R_PUB, I_PUB, ephemeral))
    signature = draw(st.binary(max_size=70)) if "sig" in faults else good_signature
    payload = Frame(
        ack=Ack(id=id_, init_id=init_id, ephemeral_pubkey=ephemeral, signature=signature)
    ).SerializeToString()
    valid = (
        init_id == INIT_ID
        and 0 < len(id_) <= MAX_ID_LENGTH
        and _is_compressed_point(ephemeral)
        and signer is RESPONDER
        and signature == good_signature
    )
    return payload, valid


@FUZZ
@given(attempt=ack_attempts(), data=st.data())
def test_initiator_accepts_exactly_the_valid_acks(
    attempt: tuple[bytes, bool], data: st.DataObject
) -> None:
    payload, valid = attempt
    core, _ = make_initiator()
    events = feed(core, draw_chunks(data, _framed(payload)))
    out = core.data_to_send()
    assert out == b"", "the initiator sends nothing before the responder's Finished"
    if valid:  # an Ack alone does not establish: the responder's Finished must follow
        assert events == []
        assert core.state is State.AWAIT_FINISHED
        assert core.receive_data(b"", 0.0) == [EOF_HANDSHAKE]
    else:
        close = the_close(events)
        assert events == [close] and close is not None and close.error and not close.by_peer
    assert_dead(core)


def _finished_candidates(
    transcript: bytes, sender: Secp256k1PrivateKey, sender_is_initiator: bool
) -> st.SearchStrategy[tuple[bytes, bool]]:
    """Plaintexts a key-holding peer might send in place of its Finished, each with
    whether it is the one valid Finished."""

    def finished(signature: bytes) -> bytes:
        return Frame(finished=Finished(signature=signature)).SerializeToString()

    good = finished(
        sign_compact(sender, finished_digest(transcript, initiator=sender_is_initiator))
    )
    bad = [
        # the other role's digest: a reflected Finished
        sign_compact(sender, finished_digest(transcript, initiator=not sender_is_initiator)),
        # the right digest, the wrong identity key
        sign_compact(STRANGER, finished_digest(transcript, initiator=sender_is_initiator)),
        # another session's transcript
        sign_compact(sender, finished_digest(bytes(32), initiator=sender_is_initiator)),
        b"",
    ]
    return st.one_of(
        st.just((good, True)),
        st.sampled_from(bad).map(lambda sig: (finished(sig), False)),
        st.binary(max_size=80).map(lambda sig: (finished(sig), False)),
        st.one_of(any_frame_bytes, protobuf_wire, st.binary(max_size=40)).map(
            lambda plaintext: (plaintext, plaintext == good)
        ),
    )


@FUZZ
@given(to_responder=st.booleans(), data=st.data())
def test_only_a_valid_finished_establishes(to_responder: bool, data: st.DataObject) -> None:
    """The peer holds the session keys (it is the peer) but its first record is anything."""
    if to_responder:
        core = make_responder()
        assert core.receive_data(INIT_WIRE, 0.0) == []
        assert core.data_to_send() == ACK_AND_FINISHED
        sender, peer_key = INITIATOR, INITIATOR.public_key()
    else:
        core, _ = make_initiator()
        assert core.receive_data(ACK_WIRE, 0.0) == []
        sender, peer_key = RESPONDER, RESPONDER.public_key()
    assert core.state is State.AWAIT_FINISHED and core.transcript_hash is not None
    sealer = forged_sealer(core, as_initiator=to_responder)
    plaintext, valid = data.draw(
        _finished_candidates(core.transcript_hash, sender, sender_is_initiator=to_responder)
    )
    message = data.draw(st.binary(max_size=30), label="message")
    stream = _framed(sealer.seal(plaintext)) + _framed(
        sealer.seal(Frame(data=message).SerializeToString())
    )
    events = feed(core, draw_chunks(data, stream))
    out = core.data_to_send()
    if valid:
        assert events == [HandshakeComplete(peer_key), MessageReceived(message)]
        assert core.established
        assert bool(out) == (not to_responder)  # the initiator's Finished goes now
    else:
        close = the_close(events)
        assert events == [close] and close is not None and close.error and not close.by_peer
        assert out == b"", "a goodbye to a peer that has not proven itself"
        assert_dead(core)


def shown_reason(text: str) -> str:
    """Docs 3: a Close reason is sent and shown as at most 256 bytes of UTF-8, cut on a
    character boundary."""
    cut = text.encode()[:MAX_CLOSE_REASON]
    while True:
        try:
            return cut.decode()
        except UnicodeDecodeError:
            cut = cut[:-1]


@FUZZ
@given(tail=st.binary(min_size=1, max_size=40))
@example(tail=b"\x00")
@example(tail=b"\x05ab")
@example(tail=b"\x80")
@example(tail=b"\x01")  # a lone length prefix
@example(tail=b"\x80\x01")
@example(tail=encode_uvarint(MAX_HANDSHAKE_FRAME))
@example(tail=encode_uvarint(MAX_HANDSHAKE_FRAME + 1))  # malformed prefixes: see below
@example(tail=b"\x80\x00")
def test_init_followed_by_more_bytes_is_refused_silently(tail: bytes) -> None:
    """Docs 4.2: no further bytes may follow the Init (in the same read), whatever they
    are, a malformed length prefix included; the responder closes and sends nothing."""
    core = make_responder()
    events = core.receive_data(INIT_WIRE + tail, 0.0)
    close = the_close(events)
    assert events == [close] and close is not None and close.error
    assert core.data_to_send() == b""
    assert_dead(core)


@FUZZ
@given(tail=st.binary(min_size=1, max_size=60))
@example(tail=b"\x80\x00")
@example(tail=encode_uvarint(POST_LIMIT + 1))
@example(tail=b"\x80" * 9)
@example(tail=b"\x01")
def test_ack_followed_by_garbage_never_establishes_nor_answers(tail: bytes) -> None:
    """After the Ack come records (the responder's Finished first); garbage there is a
    failed Finished: no HandshakeComplete, nothing sent."""
    core, _ = make_initiator()
    events = core.receive_data(ACK_WIRE + tail, 0.0)
    assert core.data_to_send() == b""
    close = the_close(events)
    assert events == ([] if close is None else [close])
    if close is None:
        assert core.state is State.AWAIT_FINISHED
        assert core.receive_data(b"", 0.0) == [EOF_HANDSHAKE]
    else:
        assert close.error and not close.by_peer
    assert_dead(core)


@pytest.mark.parametrize(
    "tail",
    [b"\x80\x00", encode_uvarint(MAX_HANDSHAKE_FRAME + 1), b"\x80" * 9],
    ids=["non-minimal", "oversize", "ten-byte-varint"],
)
def test_init_followed_by_a_malformed_length_prefix_is_refused_silently(tail: bytes) -> None:
    """Docs 4.2: any failure closes without sending anything. A malformed length prefix
    behind the Init (which the frame decoder raises on, after splitting off the Init)
    counts as bytes after the Init: the Init is not answered first, so no Ack and no
    Finished are queued for the driver to flush to the rejected peer."""
    core = make_responder()
    events = core.receive_data(INIT_WIRE + tail, 0.0)
    close = the_close(events)
    assert events == [close] and close is not None and close.error and not close.by_peer
    assert "bytes after the Init" in close.reason
    assert core.data_to_send() == b""
    assert core.peer_key is None and core.transcript_hash is None
    assert_dead(core)


# --- length prefixes: oversize, non-minimal ---------------------------------------------------


@FUZZ
@given(size=st.integers(MAX_HANDSHAKE_FRAME + 1, (1 << 63) - 1), initiator_side=st.booleans())
@example(size=600, initiator_side=False)
@example(size=MAX_HANDSHAKE_FRAME + 1, initiator_side=True)
def test_oversize_handshake_prefix_closes_before_the_body(size: int, initiator_side: bool) -> None:
    core = make_initiator()[0] if initiator_side else make_responder()
    events = core.receive_data(encode_uvarint(size), 0.0)
    close = the_close(events)
    assert events == [close] and close is not None and close.error and not close.by_peer
    assert str(MAX_HANDSHAKE_FRAME) in close.reason
    assert core.data_to_send() == b""
    assert_dead(core)


@FUZZ
@given(size=st.integers(1, MAX_HANDSHAKE_FRAME), initiator_side=st.booleans())
def test_handshake_prefix_within_the_limit_waits_for_the_body(
    size: int, initiator_side: bool
) -> None:
    core = make_initiator()[0] if initiator_side else make_responder()
    assert core.receive_data(encode_uvarint(size), 0.0) == []
    assert core.data_to_send() == b""
    assert core.receive_data(b"", 0.0) == [EOF_HANDSHAKE]


def _assert_error_close_with_goodbye(
    receiver: BotdConnection, sender: BotdConnection, events: list[Event], *needles: str
) -> ConnectionClosed:
    """An established core that closes on bad input says why in an encrypted Close."""
    close = the_close(events)
    assert close is not None and close.error and not close.by_peer
    for needle in needles:
        assert needle in close.reason
    goodbye = receiver.data_to_send()
    assert sender.receive_data(goodbye, 0.0) == [PeerClosed(shown_reason(close.reason))]
    assert_dead(receiver)
    return close


@FUZZ
@given(size=st.integers(POST_LIMIT + 1, (1 << 63) - 1), to_responder=st.booleans())
@example(size=(1 << 20) + 1000, to_responder=True)
@example(size=POST_LIMIT + 1, to_responder=False)
def test_oversize_record_prefix_closes_before_the_body(size: int, to_responder: bool) -> None:
    initiator, responder = handshake()
    receiver, sender = (responder, initiator) if to_responder else (initiator, responder)
    events = receiver.receive_data(encode_uvarint(size), 0.0)
    assert len(events) == 1
    _assert_error_close_with_goodbye(receiver, sender, events, str(POST_LIMIT), "exceeds")


@QUICK
@given(size=st.integers(1, POST_LIMIT))
@example(size=POST_LIMIT)
def test_record_prefix_within_the_limit_waits_for_the_body(size: int) -> None:
    _, responder = handshake()
    assert responder.receive_data(encode_uvarint(size), 0.0) == []
    assert responder.data_to_send() == b""
    assert responder.receive_data(b"", 0.0) == [EOF_ESTABLISHED]


@FUZZ
@given(prefix=non_minimal_uvarints(), phase=st.sampled_from(["responder", "initiator", "post"]))
@example(prefix=b"\x80\x00", phase="responder")
@example(prefix=b"\x80\x00", phase="post")
@example(prefix=b"\x81\x80\x00", phase="initiator")
def test_non_minimal_length_prefix_closes(prefix: bytes, phase: str) -> None:
    if phase == "post":
        initiator, responder = handshake()
        events = responder.receive_data(prefix, 0.0)
        assert len(events) == 1
        _assert_error_close_with_goodbye(responder, initiator, events, "minimal")
        return
    core = make_initiator()[0] if phase == "initiator" else make_responder()
    events = core.receive_data(prefix, 0.0)
    close = the_close(events)
    assert events == [close] and close is not None and close.error
    assert "minimal" in close.reason
    assert core.data_to_send() == b""
    assert_dead(core)


@pytest.mark.parametrize("phase", ["responder", "post"])
def test_varint_longer_than_nine_bytes_closes(phase: str) -> None:
    prefix = b"\x81" * 9 + b"\x01"
    if phase == "post":
        initiator, responder = handshake()
        events = responder.receive_data(prefix, 0.0)
        _assert_error_close_with_goodbye(responder, initiator, events, "9 bytes")
        return
    core = make_responder()
    events = core.receive_data(prefix, 0.0)
    close = the_close(events)
    assert events == [close] and close is not None and close.error and "9 bytes" in close.reason
    assert core.data_to_send() == b""


# --- truncation ---------------------------------------------------------------------------------


def test_truncated_init_waits_then_eof_is_an_error_close() -> None:
    for cut in range(1, len(INIT_WIRE)):
        core = make_responder()
        assert core.receive_data(INIT_WIRE[:cut], 0.0) == [], cut
        assert core.data_to_send() == b"", cut
        assert core.state is State.AWAIT_INIT
        assert core.receive_data(b"", 0.0) == [EOF_HANDSHAKE], cut
        assert_dead(core)
        # The same cut followed by the rest is just a slow Init.
        core = make_responder()
        assert core.receive_data(INIT_WIRE[:cut], 0.0) == []
        assert core.receive_data(INIT_WIRE[cut:], 0.0) == []
        assert core.data_to_send() == ACK_AND_FINISHED, cut


def test_truncated_ack_and_finished_wait_then_eof_is_an_error_close() -> None:
    """Cut anywhere in the responder's answer: in the Ack, or in its Finished record."""
    for cut in range(1, len(ACK_AND_FINISHED)):
        core, _ = make_initiator()
        assert core.receive_data(ACK_AND_FINISHED[:cut], 0.0) == [], cut
        assert core.data_to_send() == b"", cut
        expected = State.AWAIT_ACK if cut < len(ACK_WIRE) else State.AWAIT_FINISHED
        assert core.state is expected, cut
        assert core.receive_data(b"", 0.0) == [EOF_HANDSHAKE], cut
        assert_dead(core)
        # The same cut followed by the rest is just a slow answer.
        core, _ = make_initiator()
        assert core.receive_data(ACK_AND_FINISHED[:cut], 0.0) == []
        assert core.receive_data(ACK_AND_FINISHED[cut:], 0.0) == [
            HandshakeComplete(RESPONDER.public_key())
        ]
        assert core.data_to_send(), "its own Finished"


def test_truncated_record_waits_then_eof_is_an_error_close() -> None:
    initiator, _ = handshake()
    initiator.send(b"a message that will be cut")
    record = initiator.data_to_send()
    for cut in range(1, len(record)):
        sender, receiver = handshake()  # deterministic: the same keys, the same record
        sender.send(b"a message that will be cut")
        assert sender.data_to_send() == record
        assert receiver.receive_data(record[:cut], 0.0) == [], cut
        assert receiver.data_to_send() == b""
        assert receiver.receive_data(b"", 0.0) == [EOF_ESTABLISHED], cut
        assert_dead(receiver)


# --- after the handshake ------------------------------------------------------------------------


def _flip(record: bytes) -> st.SearchStrategy[bytes]:
    return st.tuples(st.integers(0, len(record) - 1), st.integers(1, 255)).map(
        lambda t: record[: t[0]] + bytes([record[t[0]] ^ t[1]]) + record[t[0] + 1 :]
    )


def _post_garbage(records: list[bytes]) -> st.SearchStrategy[bytes]:
    options = [
        st.binary(max_size=200),
        st.lists(st.binary(max_size=80).map(_framed), min_size=1, max_size=3).map(b"".join),
        non_minimal_uvarints(),
        st.integers(POST_LIMIT + 1, (1 << 63) - 1).map(encode_uvarint),
    ]
    if records:
        options.append(st.sampled_from(records))  # a replay
        options.append(st.sampled_from(records).flatmap(_flip))  # a forgery
    return st.one_of(options).flatmap(
        lambda garbage: st.binary(max_size=20).map(lambda extra: garbage + extra)
    )


@FUZZ
@given(
    messages=st.lists(st.binary(max_size=64), max_size=4),
    to_responder=st.booleans(),
    data=st.data(),
)
def test_post_handshake_garbage_delivers_what_came_before_then_one_error_close(
    messages: list[bytes], to_responder: bool, data: st.DataObject
) -> None:
    initiator, responder = handshake(split=lambda wire: draw_chunks(data, wire, "handshake"))
    sender, receiver = (initiator, responder) if to_responder else (responder, initiator)
    records = []
    for message in messages:
        assert sender.send(message) == []
        records.append(sender.data_to_send())
    garbage = data.draw(_post_garbage(records), label="garbage")
    chunks = draw_chunks(data, b"".join(records) + garbage)
    events = feed(receiver, chunks)
    if the_close(events) is None:  # the garbage was an incomplete frame: end the stream
        assert receiver.state is State.ESTABLISHED
        events += receiver.receive_data(b"", 0.0)
    close = the_close(events)
    assert close is not None and close.error
    assert events[:-1] == [MessageReceived(m) for m in messages]
    if close.by_peer:  # EOF: nothing to say
        assert close == EOF_ESTABLISHED
        assert receiver.data_to_send() == b""
        assert_dead(receiver)
    else:
        _assert_error_close_with_goodbye(receiver, sender, events)


SMALL = BotdConfig(max_message=100)
# Docs 2: max_message + 24, but never less than 512 so that control records fit.
SMALL_LIMIT = max(SMALL.max_message + RECORD_OVERHEAD, MAX_CONTROL_RECORD)


# Short, long, and multi-byte reasons whose 256-byte cut falls inside a character.
close_reasons = st.one_of(
    st.text(max_size=40),
    st.text(min_size=250, max_size=300),
    st.text(alphabet="aé€😀", min_size=60, max_size=200),
)


def _authenticated_plaintexts(our_ping_id: str | None) -> st.SearchStrategy[list[bytes]]:
    """Frames a key-holding peer might send: mostly well-formed (so sequences get deep),
    some with bad ids, wrong bodies, oversize data or no protobuf at all."""
    pong_ids = st.one_of(ident, st.just(our_ping_id)) if our_ping_id else ident
    well_formed = st.one_of(
        st.binary(max_size=SMALL.max_message + 10).map(lambda d: Frame(data=d)),
        ident.map(lambda i: Frame(ping=Ping(id=i))),
        st.builds(Pong, id=ident, ping_id=pong_ids).map(lambda m: Frame(pong=m)),
        st.builds(Close, reason=close_reasons).map(lambda m: Frame(close=m)),
    ).map(lambda frame: frame.SerializeToString())
    hostile = st.one_of(any_frame_bytes, protobuf_wire, st.binary(max_size=40))
    plaintext = st.one_of(well_formed, well_formed, well_formed, hostile)
    return st.lists(plaintext, max_size=6)


def _expected_shape(plaintexts: list[bytes], our_ping_id: str | None) -> list[object]:
    """What a correct receiver does with authenticated frames from an established peer,
    all at one instant (docs/protocols/botd.md): an independent model of the rules."""
    out: list[object] = []
    peer_closed = pinged = False
    for plaintext in plaintexts:
        if len(plaintext) + TAG_SIZE > SMALL_LIMIT:
            return [*out, "error-close"]  # refused at the length prefix
        try:
            body, frame = parse_frame(plaintext)
        except DecodeError:
            return [*out, "error-close"]
        if peer_closed:
            return [*out, "error-close"]  # nothing may follow the peer's Close
        if body == "data" and len(frame.data) <= SMALL.max_message:
            out.append(MessageReceived(frame.data))
        elif body == "ping" and 0 < len(frame.ping.id) <= MAX_ID_LENGTH and not pinged:
            pinged = True  # a second one within 30 s is a flood
        elif (
            body == "pong"
            and our_ping_id is not None
            and 0 < len(frame.pong.id) <= MAX_ID_LENGTH
            and frame.pong.ping_id == our_ping_id
        ):
            out.append(PongReceived(our_ping_id, 0.0))
            our_ping_id = None  # a second answer is unsolicited
        elif body == "close":
            peer_closed = True
            out.append(PeerClosed(shown_reason(frame.close.reason) or "no reason given"))
        else:  # unsolicited pong, Finished again, Init/Ack, bad ids, oversize data
            return [*out, "error-close"]
    return [*out, "orderly-close" if peer_closed else "error-close"]  # then EOF


def _shape(event: Event) -> object:
    if isinstance(event, ConnectionClosed):
        return "error-close" if event.error else "orderly-close"
    return event


@settings(max_examples=250, deadline=None)
@given(we_ping=st.booleans(), data=st.data())
def test_authenticated_hostile_frames_follow_the_protocol_rules(
    we_ping: bool, data: st.DataObject
) -> None:
    """A peer that holds the session keys but sends anything at all."""
    _, responder = handshake(SMALL)
    sealer = evil_initiator_sealer(responder)
    if we_ping:
        assert responder.ping(0.0) == []
    our_ping_id = responder.pending_ping_id
    assert (our_ping_id is not None) == we_ping
    plaintexts = data.draw(_authenticated_plaintexts(our_ping_id), label="plaintexts")
    stream = b"".join(_framed(sealer.seal(plaintext)) for plaintext in plaintexts)
    events = feed(responder, draw_chunks(data, stream))
    if the_close(events) is None:
        events += responder.receive_data(b"", 0.0)
    the_close(events)
    assert [_shape(e) for e in events] == _expected_shape(plaintexts, our_ping_id)
    responder.data_to_send()  # our ping, pongs and the goodbye, if any
    assert_dead(responder)
