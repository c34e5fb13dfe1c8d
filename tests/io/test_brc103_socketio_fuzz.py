"""Property tests of the Socket.IO binding's parsers (``trustmesh.io.brc103_socketio``):
whatever arrives, a packet, an ``authMessage`` argument or an event payload is either
read or refused with a typed error; nothing else escapes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trustmesh.brc103.errors import Brc103Error
from trustmesh.brc103.messages import AuthMessage
from trustmesh.brc103.peer import Peer
from trustmesh.brc103.wallet import Wallet
from trustmesh.errors import DecodeError
from trustmesh.io.brc103_socketio import (
    SocketIoEventError,
    SocketIoPacketError,
    StrictPacket,
    auth_message_of,
    decode_event,
    encode_event,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(
    [
        "version",
        "messageType",
        "identityKey",
        "initialNonce",
        "nonce",
        "yourNonce",
        "payload",
        "signature",
        "certificates",
        "requestedCertificates",
    ]
)
VALUES = (
    st.sampled_from(
        ["0.1", "initialRequest", "general", "certificateRequest", "A" * 64, "02" + "ab" * 32]
    )
    | JSON
)
MESSAGE_LIKE = st.dictionaries(KEYS, VALUES, max_size=10)
VALID = Peer(Wallet.from_hex("a1" * 32)).initiate(0).to_json()


@FUZZ
@given(st.text(max_size=200))
@example("")
@example('451-["authMessage",{"_placeholder":true,"num":0}]')
@example("4" + "9" * 200)
@example("2/nsp?x=1,12345678901234567890123[1]")
@example('2["a",\ud800]')
def test_any_text_is_a_packet_or_a_packet_error(text: str) -> None:
    try:
        packet = StrictPacket(encoded_packet=text)
    except SocketIoPacketError:
        return
    assert packet.packet_type in range(5)
    assert packet.attachment_count == 0


@FUZZ
@given(st.binary(max_size=64))
def test_binary_messages_are_refused(data: bytes) -> None:
    try:
        StrictPacket(encoded_packet=data)
    except SocketIoPacketError:
        return
    raise AssertionError("a binary message was read")


@FUZZ
@given(st.lists(JSON | MESSAGE_LIKE, max_size=3))
@example([VALID])
def test_authmessage_arguments_are_a_message_or_a_typed_error(args: list[Any]) -> None:
    # Through the packet reader as they would arrive, then as the handler gets them.
    text = "2" + json.dumps(["authMessage", *args], ensure_ascii=False)
    try:
        packet = StrictPacket(encoded_packet=text)
    except SocketIoPacketError:
        return
    try:
        message = auth_message_of(tuple(packet.data[1:]))
    except (DecodeError, Brc103Error):
        return
    assert isinstance(message, AuthMessage)
    assert len(args) == 1


@FUZZ
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_payload_is_an_event_or_an_event_error(payload: bytes) -> None:
    try:
        name, _data = decode_event(payload)
    except SocketIoEventError:
        return
    assert isinstance(name, str)


@FUZZ
@given(st.text(), JSON)
def test_events_round_trip(name: str, data: Any) -> None:
    try:
        payload = encode_event(name, data)
    except UnicodeEncodeError:  # a lone surrogate: no JSON text of ours carries one
        return
    try:
        decoded = decode_event(payload)
    except SocketIoEventError:
        # Only text that strict JSON refuses (lone surrogates) may not come back.
        assert any("\ud800" <= c <= "\udfff" for c in json.dumps([name, data]))
        return
    assert decoded == (name, data)


def test_an_event_is_what_the_reference_writes() -> None:
    # JSON.stringify({eventName, data}): compact, non-ASCII raw, undefined data left out.
    assert encode_event("é", {"a": [1, None]}) == '{"eventName":"é","data":{"a":[1,null]}}'.encode()
    assert encode_event("x") == b'{"eventName":"x"}'
    assert decode_event(b'{"eventName":"x"}') == ("x", None)
