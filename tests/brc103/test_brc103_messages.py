"""AuthMessages on the wire: the reference's member order, byte arrays, what each type
must carry, the strict parser's refusals, and the JSON text the signatures cover."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from brc103_support import (
    CERT_TYPE,
    alice,
    bob,
    certifier,
    one,
    relay,
    seeded_random,
    wire_json,
)

from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.encoding import (
    MINUS_ONE,
    b64decode,
    is_public_key_hex,
    js_stringify,
    read_bytes,
    read_varint,
    write_varint,
)
from trustmesh.brc103.errors import Brc103Error, MalformedMessageError, UnsupportedVersionError
from trustmesh.brc103.messages import (
    MAX_CERTIFICATES,
    MAX_REQUESTED,
    MAX_SIGNATURE,
    VERSION,
    AuthMessage,
    MessageType,
    RequestedCertificates,
    parse_message,
    parse_message_bytes,
)
from trustmesh.brc103.peer import Peer, PeerConfig
from trustmesh.errors import DecodeError, OversizeError, TruncatedError
from trustmesh.wire.jsonwire import compact_json

REQUEST = RequestedCertificates((certifier().identity_key,), {CERT_TYPE: ("name",)})


def _messages() -> dict[MessageType, AuthMessage]:
    """One message of each type, sent by alice, as a responder requiring certificates
    sees them."""
    master = MasterCertificate.issue(
        certifier(), alice().identity_key, CERT_TYPE, {"name": "Alice", "email": "a@x"}
    )
    a = Peer(alice(), PeerConfig(certificates=[master]), random=seeded_random("alice"))
    b = Peer(bob(), PeerConfig(requested_certificates=REQUEST), random=seeded_random("bob"))
    request = a.initiate(0)
    b.receive(relay(request), 0)
    response = one(b.messages_to_send())
    a.receive(relay(response), 0)
    cert_response = one(a.messages_to_send())
    general = a.create_general(b"hello bob", identity_key=bob().identity_key)
    cert_request = a.create_certificate_request(REQUEST, identity_key=bob().identity_key)
    return {
        MessageType.INITIAL_REQUEST: request,
        MessageType.INITIAL_RESPONSE: response,
        MessageType.CERTIFICATE_REQUEST: cert_request,
        MessageType.CERTIFICATE_RESPONSE: cert_response,
        MessageType.GENERAL: general,
    }


MESSAGES = _messages()

# Reference notes a: the members of each type, in the order the TS reference writes them.
ORDER = {
    MessageType.INITIAL_REQUEST: [
        "version",
        "messageType",
        "identityKey",
        "initialNonce",
        "requestedCertificates",
    ],
    MessageType.INITIAL_RESPONSE: [
        "version",
        "messageType",
        "identityKey",
        "initialNonce",
        "yourNonce",
        "requestedCertificates",
        "signature",
    ],
    MessageType.CERTIFICATE_REQUEST: [
        "version",
        "messageType",
        "identityKey",
        "nonce",
        "initialNonce",
        "yourNonce",
        "requestedCertificates",
        "signature",
    ],
    MessageType.CERTIFICATE_RESPONSE: [
        "version",
        "messageType",
        "identityKey",
        "nonce",
        "initialNonce",
        "yourNonce",
        "certificates",
        "signature",
    ],
    MessageType.GENERAL: [
        "version",
        "messageType",
        "identityKey",
        "nonce",
        "yourNonce",
        "payload",
        "signature",
    ],
}


@pytest.mark.parametrize("message_type", list(MessageType))
def test_wire_member_order(message_type: MessageType) -> None:
    obj = wire_json(MESSAGES[message_type])
    assert list(obj) == ORDER[message_type]
    assert obj["version"] == VERSION == "0.1"
    assert obj["messageType"] == message_type.value


def test_initial_response_with_certificates_order() -> None:
    master = MasterCertificate.issue(certifier(), bob().identity_key, CERT_TYPE, {"name": "Bob"})
    a = Peer(alice(), PeerConfig(requested_certificates=REQUEST))
    b = Peer(bob(), PeerConfig(certificates=[master]))
    b.receive(relay(a.initiate(0)), 0)
    obj = wire_json(one(b.messages_to_send()))
    assert list(obj) == [
        "version",
        "messageType",
        "identityKey",
        "initialNonce",
        "yourNonce",
        "certificates",
        "requestedCertificates",
        "signature",
    ]
    assert list(obj["certificates"][0]) == [
        "type",
        "serialNumber",
        "subject",
        "certifier",
        "revocationOutpoint",
        "fields",
        "signature",
        "keyring",
    ]


def test_byte_members_are_integer_arrays_and_nonces_base64() -> None:
    general = wire_json(MESSAGES[MessageType.GENERAL])
    assert general["payload"] == list(b"hello bob")
    assert all(isinstance(b, int) and 0 <= b <= 255 for b in general["signature"])
    assert len(base64.b64decode(general["nonce"])) == 32
    response = wire_json(MESSAGES[MessageType.INITIAL_RESPONSE])
    assert len(base64.b64decode(response["initialNonce"])) == 48
    assert len(response["initialNonce"]) == 64
    request = wire_json(MESSAGES[MessageType.INITIAL_REQUEST])
    assert request["requestedCertificates"] == {"certifiers": [], "types": {}}
    assert "signature" not in request


@pytest.mark.parametrize("message_type", list(MessageType))
def test_parse_round_trip(message_type: MessageType) -> None:
    message = MESSAGES[message_type]
    parsed = relay(message)
    assert parsed.to_bytes() == message.to_bytes()
    assert parsed.message_type is message_type
    assert parsed.identity_key == alice().identity_key or parsed.identity_key == bob().identity_key
    assert parsed.signature == message.signature
    assert parsed.payload == (message.payload if message_type is MessageType.GENERAL else None)
    if message_type not in (MessageType.INITIAL_REQUEST, MessageType.INITIAL_RESPONSE):
        assert parsed.signed_data() == message.signed_data()


def test_parse_ignores_unknown_members() -> None:
    obj = wire_json(MESSAGES[MessageType.GENERAL])
    obj["x-extension"] = {"anything": [1, 2, 3]}
    assert parse_message(obj).payload == b"hello bob"


def test_initial_request_has_no_payload_signature() -> None:
    with pytest.raises(Brc103Error):
        MESSAGES[MessageType.INITIAL_REQUEST].signed_data()
    with pytest.raises(Brc103Error):
        MESSAGES[MessageType.INITIAL_RESPONSE].signed_data()


def test_signed_json_keeps_received_member_order() -> None:
    """A certificateRequest's signature covers the JSON text as received: another key
    order (still valid JSON) is other signed bytes."""
    obj = wire_json(MESSAGES[MessageType.CERTIFICATE_REQUEST])
    original = parse_message(obj).signed_data()
    assert original == compact_json(obj["requestedCertificates"])
    swapped = dict(reversed(list(obj["requestedCertificates"].items())))
    reordered = parse_message({**obj, "requestedCertificates": swapped}).signed_data()
    assert reordered == compact_json(swapped) != original


def test_certificate_response_signs_certificates_json() -> None:
    obj = wire_json(MESSAGES[MessageType.CERTIFICATE_RESPONSE])
    assert parse_message(obj).signed_data() == js_stringify(obj["certificates"])
    empty = parse_message({**obj, "certificates": []})
    assert empty.certificates == [] and empty.signed_data() == b"[]"


# --- required members -----------------------------------------------------------------

REQUIRED = {
    MessageType.INITIAL_REQUEST: ["initialNonce"],
    MessageType.INITIAL_RESPONSE: ["initialNonce", "yourNonce", "signature"],
    MessageType.CERTIFICATE_REQUEST: ["nonce", "yourNonce", "signature", "requestedCertificates"],
    MessageType.CERTIFICATE_RESPONSE: ["nonce", "yourNonce", "signature", "certificates"],
    MessageType.GENERAL: ["nonce", "yourNonce", "signature"],
}


@pytest.mark.parametrize(
    ("message_type", "member"),
    [(t, m) for t, members in REQUIRED.items() for m in [*members, "identityKey", "messageType"]],
)
def test_required_members(message_type: MessageType, member: str) -> None:
    obj = wire_json(MESSAGES[message_type])
    del obj[member]
    with pytest.raises(MalformedMessageError):
        parse_message(obj)


def test_empty_signature_counts_as_missing() -> None:
    obj = wire_json(MESSAGES[MessageType.GENERAL])
    with pytest.raises(MalformedMessageError):
        parse_message({**obj, "signature": []})
    assert parse_message({**obj, "payload": []}).payload == b""


@pytest.mark.parametrize("version", [None, "0.2", 0.1, "", "0.1 ", ["0.1"]])
def test_version_is_exactly_0_1(version: object) -> None:
    obj = wire_json(MESSAGES[MessageType.GENERAL])
    if version is None:
        del obj["version"]
    else:
        obj["version"] = version
    with pytest.raises(UnsupportedVersionError):
        parse_message_bytes(json.dumps(obj).encode())
    assert issubclass(UnsupportedVersionError, MalformedMessageError)


BAD_MEMBERS: list[tuple[MessageType, str, Any]] = [
    (MessageType.GENERAL, "messageType", "General"),
    (MessageType.GENERAL, "messageType", 3),
    (MessageType.GENERAL, "identityKey", alice().identity_key.upper()),
    (MessageType.GENERAL, "identityKey", alice().identity_key[:-2]),
    (MessageType.GENERAL, "identityKey", "04" + alice().identity_key[2:]),
    (MessageType.GENERAL, "identityKey", None),
    (MessageType.GENERAL, "nonce", "not base64"),
    (MessageType.GENERAL, "nonce", base64.b64encode(bytes(15)).decode()),
    (MessageType.GENERAL, "nonce", ""),
    (MessageType.GENERAL, "nonce", 7),
    (MessageType.GENERAL, "nonce", "A" * 1028),
    (MessageType.GENERAL, "yourNonce", ["x"]),
    (MessageType.GENERAL, "signature", "3044"),
    (MessageType.GENERAL, "signature", [1, 256]),
    (MessageType.GENERAL, "signature", [1, -1]),
    (MessageType.GENERAL, "signature", [1, True]),
    (MessageType.GENERAL, "signature", [1, 2.0]),
    (MessageType.GENERAL, "signature", [1, "2"]),
    (MessageType.GENERAL, "signature", [1] * (MAX_SIGNATURE + 1)),
    (MessageType.GENERAL, "payload", "aGVsbG8="),
    (MessageType.GENERAL, "payload", {"0": 1}),
    (MessageType.GENERAL, "payload", [10**30]),
    (MessageType.CERTIFICATE_REQUEST, "requestedCertificates", []),
    (MessageType.CERTIFICATE_REQUEST, "requestedCertificates", {"certifiers": [], "x": 1}),
    (MessageType.CERTIFICATE_REQUEST, "requestedCertificates", {"certifiers": "02ab"}),
    (MessageType.CERTIFICATE_REQUEST, "requestedCertificates", {"certifiers": ["02ab"]}),
    (MessageType.CERTIFICATE_REQUEST, "requestedCertificates", {"types": []}),
    (MessageType.CERTIFICATE_REQUEST, "requestedCertificates", {"types": {"t": "name"}}),
    (MessageType.CERTIFICATE_REQUEST, "requestedCertificates", {"types": {"t": [""]}}),
    (MessageType.CERTIFICATE_REQUEST, "requestedCertificates", {"types": {"t": [1]}}),
    (
        MessageType.CERTIFICATE_REQUEST,
        "requestedCertificates",
        {"certifiers": [certifier().identity_key] * (MAX_REQUESTED + 1)},
    ),
    (
        MessageType.CERTIFICATE_REQUEST,
        "requestedCertificates",
        {"types": {str(i): ["a"] for i in range(MAX_REQUESTED + 1)}},
    ),
    (
        MessageType.CERTIFICATE_REQUEST,
        "requestedCertificates",
        {"types": {"t": ["a"] * (MAX_REQUESTED + 1)}},
    ),
    (MessageType.CERTIFICATE_RESPONSE, "certificates", {}),
    (MessageType.CERTIFICATE_RESPONSE, "certificates", [1]),
    (MessageType.CERTIFICATE_RESPONSE, "certificates", [{}]),
]


@pytest.mark.parametrize(
    ("message_type", "member", "value"),
    BAD_MEMBERS,
    ids=[f"{t.value}-{m}-{i}" for i, (t, m, _) in enumerate(BAD_MEMBERS)],
)
def test_bad_members_are_malformed(message_type: MessageType, member: str, value: Any) -> None:
    obj = wire_json(MESSAGES[message_type])
    obj[member] = value
    with pytest.raises(MalformedMessageError):
        parse_message_bytes(json.dumps(obj).encode())


def test_certificates_list_bounds() -> None:
    obj = wire_json(MESSAGES[MessageType.CERTIFICATE_RESPONSE])
    (certificate,) = obj["certificates"]
    assert (
        len(
            parse_message({**obj, "certificates": [certificate] * MAX_CERTIFICATES}).certificates
            or []
        )
        == MAX_CERTIFICATES
    )
    with pytest.raises(MalformedMessageError):
        parse_message({**obj, "certificates": [certificate] * (MAX_CERTIFICATES + 1)})
    broken = {**certificate, "subject": "nope"}
    with pytest.raises(MalformedMessageError):
        parse_message({**obj, "certificates": [broken]})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"null",
        b"[]",
        b'"general"',
        b"{",
        b'{"version":"0.1","version":"0.1"}',
        b'{"version":NaN}',
        b'{"version":"0.1","payload":[1e999]}',
        b"\xff\xfe{}",
        b'{"version":"0.1","x":"\\ud800"}',
        b"[" * 40 + b"]" * 40,
        b'{"a":' * 40 + b"1" + b"}" * 40,
        b'{"version":"0.1"} x',
    ],
    ids=[
        "empty",
        "null",
        "array",
        "string",
        "truncated",
        "duplicate-key",
        "nan",
        "infinite-number",
        "bad-utf8",
        "lone-surrogate",
        "deep-array",
        "deep-object",
        "trailing-data",
    ],
)
def test_parse_refuses_bad_json(data: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        parse_message_bytes(data)


def test_parse_size_limit() -> None:
    data = MESSAGES[MessageType.GENERAL].to_bytes()
    assert parse_message_bytes(data, max_size=len(data))
    with pytest.raises(DecodeError) as caught:
        parse_message_bytes(data, max_size=len(data) - 1)
    assert isinstance(caught.value, (OversizeError, MalformedMessageError))


# --- requestedCertificates ------------------------------------------------------------


def test_requested_certificates_semantics() -> None:
    key = certifier().identity_key
    request = RequestedCertificates((key,), {CERT_TYPE: ("name", "email")})
    assert request.required
    assert not RequestedCertificates((), {CERT_TYPE: ("name",)}).required
    assert request.allows(key, CERT_TYPE, ["name"]) is None
    assert request.allows(key, CERT_TYPE, []) is None
    assert "certifier" in (request.allows(alice().identity_key, CERT_TYPE, ["name"]) or "")
    assert "type" in (request.allows(key, "other", ["name"]) or "")
    assert "salary" in (request.allows(key, CERT_TYPE, ["name", "salary"]) or "")
    assert RequestedCertificates.from_json(request.to_json()) == request
    assert RequestedCertificates.from_json({}) == RequestedCertificates()
    assert request.to_json() == {"certifiers": [key], "types": {CERT_TYPE: ["name", "email"]}}


# --- encoding helpers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (252, "fc"),
        (253, "fdfd00"),
        (0xFFFF, "fdffff"),
        (0x10000, "fe00000100"),
        (70000, "fe70110100"),
        (0xFFFFFFFF, "feffffffff"),
        (0x100000000, "ff0000000001000000"),
        (-1, "ffffffffffffffffff"),
    ],
)
def test_varint_encodings(value: int, encoded: str) -> None:
    assert write_varint(value).hex() == encoded
    assert read_varint(bytes.fromhex(encoded) + b"rest", 0) == (value, len(encoded) // 2)


def test_varint_refusals() -> None:
    assert write_varint(-1) == MINUS_ONE
    for bad in (-2, 1 << 64):
        with pytest.raises(ValueError):
            write_varint(bad)
    for data in (b"", b"\xfd\x00", b"\xfe\x00\x00\x00", b"\xff" * 8):
        with pytest.raises(TruncatedError):
            read_varint(data, 0)
    assert read_varint(b"\xfd\x05\x00", 0) == (5, 3)  # non-minimal forms are read
    with pytest.raises(TruncatedError):
        read_bytes(b"abc", 1, 3, "field")
    with pytest.raises(TruncatedError):
        read_bytes(b"abc", 0, -1, "field")


def test_js_stringify_matches_node() -> None:
    """Recorded with Node 20: ``JSON.stringify`` of the same object (integer-like keys
    first in numeric order, control characters escaped, U+2028, U+2029, DEL, ``/`` and
    non-ASCII raw)."""
    value = {
        "k": '\u0001\u001f\u007f\u2028\u2029/\u00e9"\\\n\t\b\f\r\U0001f600',
        "a": [1, -2, 0, "x", True, None, {}],
        "10": {"2": "y", "1": "z"},
    }
    expected = (
        "7b223130223a7b2231223a227a222c2232223a2279227d2c226b223a225c75303030315c7530303166"
        "7fe280a8e280a92fc3a95c225c5c5c6e5c745c625c665c72f09f9880222c2261223a5b312c2d322c30"
        "2c2278222c747275652c6e756c6c2c7b7d5d7d"
    )
    assert js_stringify(value).hex() == expected
    keys = {"b": 1, "4294967295": 2, "4294967294": 3, "01": 4, "0": 5, "-1": 6, "1.5": 7}
    assert js_stringify(keys) == (
        b'{"0":5,"4294967294":3,"b":1,"4294967295":2,"01":4,"-1":6,"1.5":7}'
    )


def test_small_encoding_helpers() -> None:
    assert b64decode("AAEC", "x") == b"\0\1\2"
    with pytest.raises(DecodeError):
        b64decode("AAE", "x")
    with pytest.raises(MalformedMessageError):
        b64decode("é", "x", MalformedMessageError)
    assert is_public_key_hex(alice().identity_key)
    assert not is_public_key_hex(alice().identity_key.upper())
    assert not is_public_key_hex(None)
    assert not is_public_key_hex("04" + "00" * 32)
