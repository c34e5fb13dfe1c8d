"""Signed gossip messages: signing and verifying with real node certificates, the JSON
encoding, every field rule, and fuzzing of the decoder."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshtools import T0, T0_MS, MeshPki, Node, anomaly

from trustmesh.crypto.keys import KeyKind
from trustmesh.errors import DecodeError, OversizeError
from trustmesh.mesh.errors import BadMessageId, BadSignature, MalformedMessage
from trustmesh.mesh.gossip import (
    _ANOMALY_WIRE,
    ID_LABEL,
    MAX_CERT,
    MAX_CHAIN,
    MAX_MESSAGE,
    MAX_META_FIELDS,
    MAX_META_KEY,
    MAX_META_TEXT,
    MAX_SAFE_INT,
    MAX_TTL_MS,
    SIGNING_LABEL,
    GossipMessage,
    _anomaly_content,
    anomaly_payload,
    check_payload,
    crl_from_payload,
    crl_payload,
    decode_message,
    derive_message_id,
    message_from_json,
    sign_message,
    signing_input,
)
from trustmesh.wire.jsonwire import canonical_json, strict_loads

FUZZ = settings(max_examples=300, deadline=None)
PROPERTY = settings(max_examples=150, deadline=None)
Json = dict[str, Any]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path_factory.mktemp("gossip") / "ca")
    yield mesh
    mesh.close()


@pytest.fixture(scope="module")
def node(pki: MeshPki) -> Node:
    return pki.node("node-1")


@pytest.fixture(scope="module")
def message(node: Node) -> GossipMessage:
    return node.sign(anomaly(7, source="ids", count=3), message_id="node-1:m7")


@pytest.fixture(scope="module")
def valid(message: GossipMessage) -> Json:
    """The message as a JSON object, to break one rule at a time (deep-copy first)."""
    return message.to_json()


# --- signing ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [KeyKind.P256, KeyKind.ED25519])
def test_a_signed_message_verifies_under_the_origins_certificate(
    pki: MeshPki, kind: KeyKind
) -> None:
    signer = pki.node(f"signer-{kind}", kind)
    message = signer.sign(anomaly(1))
    identity = pki.trust().identity(message.chain, now=T0)
    assert identity.node_id == signer.node_id
    identity.verify(message.signature, message.signed_bytes())
    # Any change to what the signature covers breaks it.
    for changed in (
        dataclasses.replace(message, payload=anomaly(2)),
        dataclasses.replace(message, origin="node-x"),
        dataclasses.replace(message, message_id="other"),
        dataclasses.replace(message, timestamp=message.timestamp - 1),
        dataclasses.replace(message, expiry=message.expiry + 1),
    ):
        with pytest.raises(BadSignature):
            identity.verify(changed.signature, changed.signed_bytes())
    # Another node's key does not pass for this one.
    other = pki.node(f"other-{kind}", kind).sign(anomaly(1), origin=signer.node_id)
    with pytest.raises(BadSignature):
        identity.verify(other.signature, other.signed_bytes())


def test_signing_input_is_the_label_then_canonical_json(message: GossipMessage) -> None:
    expected = SIGNING_LABEL + canonical_json(
        [message.message_id, message.origin, message.payload, message.timestamp, message.expiry]
    )
    assert message.signed_bytes() == expected
    assert (
        signing_input(
            message.message_id,
            message.origin,
            message.payload,
            message.timestamp,
            message.expiry,
        )
        == expected
    )


def test_sign_message_sets_times_and_an_id_derived_from_the_content(node: Node) -> None:
    message = sign_message(node.key, "node-1", anomaly(), now_ms=1000, ttl_ms=500)
    assert (message.timestamp, message.expiry) == (1000, 1500)
    content = canonical_json(["node-1", anomaly(), 1000, 1500])
    assert message.message_id == hashlib.sha256(ID_LABEL + content).hexdigest()
    assert message.message_id == derive_message_id("node-1", anomaly(), 1000, 1500)
    assert message.chain == ()
    assert message.kind == "anomaly"
    # The same content is the same message; any change to it is another.
    again = sign_message(node.key, "node-1", anomaly(), now_ms=1000, ttl_ms=500)
    assert again.message_id == message.message_id
    for other in (
        sign_message(node.key, "node-2", anomaly(), now_ms=1000, ttl_ms=500),
        sign_message(node.key, "node-1", anomaly(1), now_ms=1000, ttl_ms=500),
        sign_message(node.key, "node-1", anomaly(), now_ms=1001, ttl_ms=499),
        sign_message(node.key, "node-1", anomaly(), now_ms=1000, ttl_ms=501),
    ):
        assert other.message_id != message.message_id


@pytest.mark.parametrize("origin_length", [1, 95, 96, 253])
def test_the_derived_id_fits_any_origin(node: Node, origin_length: int) -> None:
    message = sign_message(node.key, "n" * origin_length, anomaly(), now_ms=T0_MS)
    assert re.fullmatch("[0-9a-f]{64}", message.message_id), message.message_id
    assert decode_message(message.encode()) == message
    assert message.checked_signed_bytes() == message.signed_bytes()


@settings(max_examples=200, deadline=None)
@given(
    origin=st.from_regex(r"[a-z0-9](?:[a-z0-9.-]{0,20}[a-z0-9])?", fullmatch=True),
    text=st.text(max_size=40),
    risk=st.floats(0, 1),
    timestamp=st.integers(0, 1 << 52),
)
def test_one_encoding_gives_the_id_and_the_signing_input(
    origin: str, text: str, risk: float, timestamp: int
) -> None:
    """The receiver derives the id and the signing input from one canonical encoding of
    the content: it must be the signing input the signer made, byte for byte."""
    payload = {"type": "anomaly", "hash": "ab" * 8, "kind": "k", "risk": risk, "meta": {"t": text}}
    message = GossipMessage(
        derive_message_id(origin, payload, timestamp, timestamp + 1),
        origin,
        payload,
        timestamp,
        timestamp + 1,
        b"sig",
    )
    try:
        expected = message.signed_bytes()
    except UnicodeEncodeError:  # a lone surrogate: never valid JSON text
        return
    assert message.checked_signed_bytes() == expected


def test_an_id_not_derived_from_the_content_is_refused(message: GossipMessage) -> None:
    assert message.message_id == "node-1:m7"  # chosen, not derived
    with pytest.raises(BadMessageId, match="not derived"):
        message.checked_signed_bytes()
    assert isinstance(BadMessageId("x"), MalformedMessage)  # a link closes: protocol-error


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL_MS + 1])
def test_sign_message_refuses_a_bad_ttl(node: Node, ttl: int) -> None:
    with pytest.raises(ValueError, match="ttl"):
        sign_message(node.key, "node-1", anomaly(), now_ms=T0_MS, ttl_ms=ttl)


@pytest.mark.parametrize("message_id", ["", "a b", "x" * 129, "é"])
def test_sign_message_refuses_a_bad_message_id(node: Node, message_id: str) -> None:
    with pytest.raises(ValueError, match="message_id"):
        node.sign(message_id=message_id)


def test_sign_message_refuses_a_payload_peers_would_refuse(node: Node) -> None:
    with pytest.raises(MalformedMessage):
        node.sign({"type": "anomaly", "hash": "XYZ", "kind": "k", "risk": 0.5})
    with pytest.raises(MalformedMessage):
        node.sign({"type": "chat", "text": "hi"})


# --- encoding -----------------------------------------------------------------------------


def test_encode_decode_round_trip(message: GossipMessage) -> None:
    assert decode_message(message.encode()) == message
    assert message_from_json(json.loads(message.encode())) == message
    assert len(message.chain) == 2


def test_encoding_without_the_chain_leaves_the_field_out(message: GossipMessage) -> None:
    data = json.loads(message.encode(with_chain=False))
    assert "chain" not in data
    assert decode_message(message.encode(with_chain=False)) == dataclasses.replace(
        message, chain=()
    )


def test_to_json_carries_base64_signature_and_chain(message: GossipMessage) -> None:
    data = message.to_json()
    assert base64.b64decode(data["signature"]) == message.signature
    assert [base64.b64decode(c) for c in data["chain"]] == list(message.chain)
    assert data["payload"] == message.payload


def test_decode_accepts_bytearray_memoryview_and_whitespace(message: GossipMessage) -> None:
    raw = message.encode()
    assert decode_message(bytearray(raw)) == message
    assert decode_message(memoryview(raw)) == message
    assert decode_message(json.dumps(json.loads(raw), indent=2).encode()) == message


def test_crl_payload_round_trip() -> None:
    der = b"\x30\x03\x02\x01\x05"
    payload = crl_payload(der)
    assert payload == {"type": "crl", "crl": base64.b64encode(der).decode()}
    check_payload(payload)
    assert crl_from_payload(payload) == der


def test_anomaly_payload_builds_a_checked_payload() -> None:
    assert anomaly_payload("ab" * 8, "k", 1) == {
        "type": "anomaly",
        "hash": "ab" * 8,
        "kind": "k",
        "risk": 1,
        "meta": {},
    }
    with pytest.raises(MalformedMessage):
        anomaly_payload("ab" * 8, "k", 1.5)


# --- field rules --------------------------------------------------------------------------

Mutation = Callable[[Json], None]


def _set(path: str, value: Any) -> Mutation:
    """Set a field (``payload.meta.x`` style path) to ``value``."""

    def mutate(data: Json) -> None:
        *parents, last = path.split(".")
        target = data
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


def _drop(path: str) -> Mutation:
    def mutate(data: Json) -> None:
        *parents, last = path.split(".")
        target = data
        for key in parents:
            target = target[key]
        del target[last]

    return mutate


def _replace(key: str, value: Any) -> Mutation:
    def mutate(data: Json) -> None:
        data[key] = value

    return mutate


B64 = base64.b64encode
CRL_OK = {"type": "crl", "crl": B64(b"\x30\x00").decode()}

BROKEN: dict[str, Mutation] = {
    # message_id
    "message_id missing": _drop("message_id"),
    "message_id empty": _set("message_id", ""),
    "message_id too long": _set("message_id", "m" * 129),
    "message_id space": _set("message_id", "a b"),
    "message_id slash": _set("message_id", "a/b"),
    "message_id non-ascii": _set("message_id", "mé"),
    "message_id number": _set("message_id", 5),
    "message_id null": _set("message_id", None),
    # origin
    "origin missing": _drop("origin"),
    "origin empty": _set("origin", ""),
    "origin leading hyphen": _set("origin", "-node"),
    "origin trailing dot": _set("origin", "node."),
    "origin underscore": _set("origin", "node_1"),
    "origin too long": _set("origin", "n" * 254),
    "origin list": _set("origin", ["node-1"]),
    # payload
    "payload missing": _drop("payload"),
    "payload list": _set("payload", []),
    "payload string": _set("payload", "anomaly"),
    "payload no type": _set("payload", {"hash": "00" * 8, "kind": "k", "risk": 0}),
    "payload unknown type": _set("payload", {"type": "chat", "text": "hi"}),
    "payload type list": _set("payload.type", ["anomaly"]),
    # anomaly
    "anomaly extra field": _set("payload.log", "raw log line"),
    "anomaly no hash": _drop("payload.hash"),
    "anomaly no kind": _drop("payload.kind"),
    "anomaly no risk": _drop("payload.risk"),
    "hash uppercase": _set("payload.hash", "AB" * 8),
    "hash too short": _set("payload.hash", "ab" * 7),
    "hash odd length": _set("payload.hash", "a" * 17),
    "hash too long": _set("payload.hash", "ab" * 65),
    "hash not hex": _set("payload.hash", "zz" * 8),
    "hash number": _set("payload.hash", 1234),
    "kind empty": _set("payload.kind", ""),
    "kind space": _set("payload.kind", "port scan"),
    "kind too long": _set("payload.kind", "k" * 65),
    "kind number": _set("payload.kind", 3),
    "risk negative": _set("payload.risk", -0.01),
    "risk above one": _set("payload.risk", 1.01),
    "risk bool": _set("payload.risk", True),
    "risk string": _set("payload.risk", "0.5"),
    "risk null": _set("payload.risk", None),
    "meta list": _set("payload.meta", ["a"]),
    "meta string": _set("payload.meta", "a"),
    "meta nested object": _set("payload.meta.x", {"y": 1}),
    "meta nested list": _set("payload.meta.x", [1, 2]),
    "meta empty nested": _set("payload.meta.x", {}),
    "meta too many fields": _set("payload.meta", {f"k{i}": i for i in range(MAX_META_FIELDS + 1)}),
    "meta key too long": _set("payload.meta", {"k" * (MAX_META_KEY + 1): 1}),
    "meta text too long": _set("payload.meta.x", "t" * (MAX_META_TEXT + 1)),
    "meta non-ascii text too long": _set("payload.meta.x", "é" * (MAX_META_TEXT + 1)),
    "meta int too large": _set("payload.meta.x", MAX_SAFE_INT + 1),
    "meta int too small": _set("payload.meta.x", -MAX_SAFE_INT - 1),
    "meta huge int": _set("payload.meta.x", 10**40),
    # crl payloads
    "crl extra field": _set("payload", {**CRL_OK, "number": 3}),
    "crl missing": _set("payload", {"type": "crl"}),
    "crl number": _set("payload", {"type": "crl", "crl": 12}),
    "crl not base64": _set("payload", {"type": "crl", "crl": "not base64!"}),
    "crl bad padding": _set("payload", {"type": "crl", "crl": "MAA"}),
    "crl empty": _set("payload", {"type": "crl", "crl": ""}),
    # times
    "timestamp missing": _drop("timestamp"),
    "timestamp string": _set("timestamp", str(T0_MS)),
    "timestamp float": _set("timestamp", T0_MS + 0.5),
    "timestamp integral float": _set("timestamp", float(T0_MS)),
    "timestamp bool": _set("timestamp", True),
    "timestamp negative": _set("timestamp", -1),
    "timestamp too large": _set("timestamp", 2**53),
    "expiry missing": _drop("expiry"),
    "expiry bool": _set("expiry", False),
    "expiry float": _set("expiry", 1.5),
    "expiry null": _set("expiry", None),
    # signature
    "signature missing": _drop("signature"),
    "signature empty": _set("signature", ""),
    "signature not base64": _set("signature", "%%%%"),
    "signature url-safe base64": _set("signature", "-_-_"),
    "signature too long": _set("signature", B64(b"s" * 514).decode()),
    "signature one byte over": _set("signature", B64(b"s" * 513).decode()),
    "signature raw bytes list": _set("signature", [1, 2]),
    # chain
    "chain object": _set("chain", {"0": "MAA="}),
    "chain string": _set("chain", "MAA="),
    "chain too long": _set("chain", ["MAA="] * (MAX_CHAIN + 1)),
    "chain entry number": _set("chain", [5]),
    "chain entry empty": _set("chain", [""]),
    "chain entry not base64": _set("chain", ["*"]),
    "chain entry too large": _set("chain", [B64(b"c" * (MAX_CERT + 3)).decode()]),
    # the object itself
    "unknown field": _set("ttl", 3600),
    "unknown field null": _set("extra", None),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_field_rule_is_enforced(valid: Json, name: str) -> None:
    data = copy.deepcopy(valid)
    BROKEN[name](data)
    with pytest.raises(MalformedMessage):
        message_from_json(data)
    # The same through the bytes decoder (compact JSON of the broken object).
    with pytest.raises(MalformedMessage):
        decode_message(json.dumps(data).encode())


@pytest.mark.parametrize("top", [[], "message", 7, None, True])
def test_a_message_is_a_json_object(top: Any) -> None:
    with pytest.raises(MalformedMessage):
        message_from_json(top)
    with pytest.raises(MalformedMessage):
        decode_message(json.dumps(top).encode())


ACCEPTED: dict[str, Mutation] = {
    "hash 16 digits": _set("payload.hash", "0f" * 8),
    "hash 128 digits": _set("payload.hash", "0f" * 64),
    "kind 64 chars": _set("payload.kind", "k" * 64),
    "kind punctuation": _set("payload.kind", "a.b_c:d/e-f"),
    "risk zero int": _set("payload.risk", 0),
    "risk one int": _set("payload.risk", 1),
    "risk one float": _set("payload.risk", 1.0),
    "meta absent": _drop("payload.meta"),
    "meta scalars": _set("payload.meta", {"s": "x", "i": -3, "f": 0.25, "b": False, "n": None}),
    "meta fields at the limit": _set("payload.meta", {f"k{i}": i for i in range(MAX_META_FIELDS)}),
    "meta key at the limit": _set("payload.meta", {"k" * MAX_META_KEY: 1}),
    "meta text at the limit": _set("payload.meta.x", "t" * MAX_META_TEXT),
    "meta non-ascii text at the limit": _set("payload.meta.x", "é" * MAX_META_TEXT),
    "meta empty text and key": _set("payload.meta", {"": ""}),
    "meta int at the top": _set("payload.meta.x", MAX_SAFE_INT),
    "meta int at the bottom": _set("payload.meta.x", -MAX_SAFE_INT),
    "meta large float": _set("payload.meta.x", 1.5e308),
    "no chain": _drop("chain"),
    "empty chain": _set("chain", []),
    "chain of four": _set("chain", ["MAA="] * MAX_CHAIN),
    "timestamp zero": _set("timestamp", 0),
    "expiry max": _set("expiry", 2**53 - 1),
    "message_id 128": _set("message_id", "m" * 128),
    "message_id punctuation": _set("message_id", "a.b_c:d-e"),
    "origin single char": _set("origin", "n"),
    "origin 253 chars": _set("origin", "n" * 253),
    "crl payload": _set("payload", CRL_OK),
    "signature 512 bytes": _set("signature", B64(b"s" * 512).decode()),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_boundary_values_are_accepted_and_round_trip(valid: Json, name: str) -> None:
    data = copy.deepcopy(valid)
    ACCEPTED[name](data)
    message = message_from_json(data)
    assert decode_message(message.encode()) == message


def test_every_meta_limit_is_exact_and_checked_on_its_own(valid: Json) -> None:
    """All limits at once at their maximum: accepted; each one pushed one past: refused."""
    meta: dict[str, Any] = {f"{i:0{MAX_META_KEY}d}": "t" * MAX_META_TEXT for i in range(15)}
    meta["n" * MAX_META_KEY] = -MAX_SAFE_INT
    assert len(meta) == MAX_META_FIELDS
    payload = {**valid["payload"], "meta": meta}
    check_payload(payload)
    message = message_from_json({**valid, "payload": payload})
    assert decode_message(message.encode()).payload == payload
    first = f"{0:0{MAX_META_KEY}d}"
    fifteen = {k: v for k, v in meta.items() if k != first}
    for broken, match in (
        ({**meta, "extra": 1}, "at most 16"),
        ({**meta, "n" * MAX_META_KEY: -MAX_SAFE_INT - 1}, "53 bits"),
        ({**meta, "n" * MAX_META_KEY: MAX_SAFE_INT + 1}, "53 bits"),
        ({**meta, first: "t" * (MAX_META_TEXT + 1)}, "text is at most"),
        ({**fifteen, "k" * (MAX_META_KEY + 1): 1}, "keys are at most"),
    ):
        assert len(broken) == MAX_META_FIELDS + (match == "at most 16")
        with pytest.raises(MalformedMessage, match=match):
            check_payload({**payload, "meta": broken})


@pytest.mark.parametrize("value", [b"\x00", [], {}, ("t",), object()])
def test_meta_values_are_json_scalars_only(value: object) -> None:
    with pytest.raises(MalformedMessage, match="scalar"):
        anomaly_payload("ab" * 8, "k", 0.5, {"x": value})


@pytest.mark.parametrize(
    "value",
    [float("inf"), float("-inf"), float("nan"), "\ud800"],
    ids=["inf", "-inf", "nan", "lone-surrogate"],
)
def test_meta_a_peer_would_refuse_is_refused_before_signing(node: Node, value: object) -> None:
    payload = {"type": "anomaly", "hash": "ab" * 8, "kind": "k", "risk": 0.5, "meta": {"x": value}}
    with pytest.raises(MalformedMessage):
        check_payload(payload)
    with pytest.raises(MalformedMessage):
        node.sign(payload)


@pytest.mark.parametrize("size", [512, 513])
def test_the_signature_size_limit_is_exact(valid: Json, size: int) -> None:
    data = {**valid, "signature": B64(b"s" * size).decode()}
    if size <= 512:
        assert message_from_json(data).signature == b"s" * size
    else:
        with pytest.raises(MalformedMessage, match="1 to 512 bytes"):
            message_from_json(data)


def test_a_message_over_the_size_limit_is_oversize(valid: Json) -> None:
    data = {**valid, "payload": {"type": "crl", "crl": "A" * MAX_MESSAGE}}
    with pytest.raises(OversizeError):
        decode_message(json.dumps(data).encode())


@pytest.mark.parametrize(
    "raw",
    [
        b'{"message_id":"a","message_id":"b"}',
        b'{"payload":{"type":"anomaly","type":"crl"}}',
        b'{"timestamp":NaN}',
        b'{"timestamp":Infinity}',
        b'{"payload":{"risk":-Infinity}}',
        b"[" * 1000,
        b'{"message_id":"\xff"}',
        b"",
        b"{}garbage",
    ],
)
def test_json_the_strict_parser_refuses(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_message(raw)


def test_duplicate_keys_are_refused_even_with_equal_values(message: GossipMessage) -> None:
    raw = message.encode()
    doubled = raw[:-1] + b',"origin":"' + message.origin.encode() + b'"}'
    with pytest.raises(MalformedMessage, match="duplicate"):
        decode_message(doubled)


@pytest.mark.parametrize(
    "meta",
    ['{"x":"\\ud800"}', '{"\\udfff":1}', '{"x":"a\\udc00b"}', '{"x":"\\ude00\\ud83d"}'],
)
def test_a_lone_surrogate_in_meta_is_malformed(valid: Json, meta: str) -> None:
    # The \u escape goes into the JSON text as is: valid JSON, a lone surrogate once parsed.
    raw = json.dumps(valid).replace(json.dumps(valid["payload"]["meta"]), meta)
    assert meta in raw
    with pytest.raises(MalformedMessage, match="surrogate"):
        decode_message(raw.encode())


def test_an_escaped_surrogate_pair_is_one_character(valid: Json) -> None:
    raw = json.dumps(valid).replace(json.dumps(valid["payload"]["meta"]), '{"x":"\\ud83d\\ude00"}')
    message = decode_message(raw.encode())
    assert message.payload["meta"] == {"x": "\U0001f600"}
    assert decode_message(message.encode()) == message


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1E309", "123456789e999"])
def test_a_number_that_overflows_a_double_is_malformed(valid: Json, number: str) -> None:
    raw = json.dumps(valid).replace(json.dumps(valid["payload"]["meta"]), f'{{"x":{number}}}')
    assert number in raw
    with pytest.raises(MalformedMessage, match="too large"):
        decode_message(raw.encode())


# --- fuzzing ------------------------------------------------------------------------------


def _decodes_or_refuses(data: bytes) -> GossipMessage | None:
    """decode_message's contract: a message, or a DecodeError (MalformedMessage or
    OversizeError), nothing else."""
    try:
        message = decode_message(data)
    except (MalformedMessage, OversizeError):
        return None
    except DecodeError as exc:
        pytest.fail(f"decode_message raised a bare {type(exc).__name__}: {exc}")
    assert decode_message(message.encode()) == message
    return message


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_raise_only_decode_errors(data: bytes) -> None:
    _decodes_or_refuses(data)


def test_every_truncation_of_a_valid_message_is_malformed(message: GossipMessage) -> None:
    raw = message.encode()
    for end in range(len(raw)):
        with pytest.raises(MalformedMessage):
            decode_message(raw[:end])


@FUZZ
@given(data=st.data())
def test_mutated_valid_messages_decode_or_raise_only_decode_errors(
    message: GossipMessage, data: st.DataObject
) -> None:
    raw = bytearray(message.encode(with_chain=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip" and at < len(raw):
            raw[at] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del raw[at : at + data.draw(st.integers(1, 8))]
        else:
            del raw[at:]
    _decodes_or_refuses(bytes(raw))


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
FIELD_PATHS = [
    "message_id",
    "origin",
    "payload",
    "timestamp",
    "expiry",
    "signature",
    "chain",
    "payload.type",
    "payload.hash",
    "payload.kind",
    "payload.risk",
    "payload.meta",
    "payload.meta.source",
    "extra",
]


@PROPERTY
@given(path=st.sampled_from(FIELD_PATHS), value=json_values)
def test_any_json_in_any_field_decodes_or_is_malformed(valid: Json, path: str, value: Any) -> None:
    data = copy.deepcopy(valid)
    _set(path, value)(data)
    message = _decodes_or_refuses(json.dumps(data).encode())
    if message is not None:
        # What was accepted obeys the rules it was checked against, and is what was sent.
        check_payload(message.payload)
        assert message.payload == data["payload"]
        assert (message.message_id, message.origin) == (data["message_id"], data["origin"])


def test_a_message_from_another_origin_name_still_parses(pki: MeshPki) -> None:
    # Parsing does not judge trust: the engine does (test_mesh_engine.py).
    forged = pki.node("node-2").sign(origin="node-1")
    assert decode_message(forged.encode()).origin == "node-1"


# --- the fast decoding paths (issue 22): the same verdict and value as the strict parser -----


def _strict(data: bytes) -> GossipMessage | None:
    """The strict parser alone (strict_loads, then message_from_json): the reference."""
    try:
        return message_from_json(strict_loads(data, max_size=MAX_MESSAGE, error=MalformedMessage))
    except (MalformedMessage, OversizeError):
        return None


def _same_as_strict(data: bytes) -> None:
    """decode_message (whichever path takes ``data``) accepts exactly what the strict
    parser accepts, with an equal message, payload keys in the same order, and the same
    signing input."""
    expected = _strict(data)
    got = _decodes_or_refuses(data)
    if expected is None:
        assert got is None
        return
    assert got == expected
    assert list(got.payload) == list(expected.payload)
    assert got.encode() == expected.encode()
    assert got.signed_bytes() == expected.signed_bytes()
    try:
        checked = expected.checked_signed_bytes()
    except BadMessageId:
        with pytest.raises(BadMessageId):
            got.checked_signed_bytes()
    else:
        assert got.checked_signed_bytes() == checked


meta_keys = st.text(alphabet=st.sampled_from('ab:é"{}[],\\ '), max_size=4)
meta_values: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers(-(2**54), 2**54)
    | st.floats(allow_nan=False)
    | st.text(alphabet=st.sampled_from('xy:é"{}[],\\ \x01'), max_size=5)
    | st.lists(st.integers(), max_size=2)
)


@settings(max_examples=400, deadline=None)
@given(
    meta=st.dictionaries(meta_keys, meta_values, max_size=4) | st.none(),
    risk=st.sampled_from(
        [
            *("0", "1", "0.5", "1.0", "0.25e0", "1e-3", "-0", "1.5", "1e400", "0.750"),
            # Past Python's 4,300-digit limit for int(): once a raw ValueError that aborted
            # the whole batch, and with it every other link's gossip of that drain.
            *("1" + "0" * 4300, "0." + "0" * 4300, "1e" + "0" * 4300),
        ]
    ),
    kind=st.sampled_from(["k", "a:b", "x/y.z", "bad kind", ""]),
    with_chain=st.booleans(),
    repeat=st.sampled_from(["", ',"seq":1', ',"meta":{}', ',"risk":0']),
)
def test_the_wire_layout_path_decides_as_the_strict_parser(
    message: GossipMessage,
    meta: dict[str, Any] | None,
    risk: str,
    kind: str,
    with_chain: bool,
    repeat: str,
) -> None:
    """Anomalies in the layout encode() writes (the regular-expression path), with meta,
    risk and kind drawn to break its rules, repeated keys and escapes included."""
    payload = f'{{"type":"anomaly","hash":"{"ab" * 8}","kind":"{kind}","risk":{risk}'
    if meta is not None:
        meta_json = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
        if repeat == ',"seq":1' and meta_json != "{}":
            meta_json = meta_json[:-1] + ',"seq":1,"seq":2}'
        payload += f',"meta":{meta_json}'
    if repeat in (',"meta":{}', ',"risk":0'):
        payload += repeat
    payload += "}"
    wire = json.loads(message.encode(with_chain=with_chain))
    head = json.dumps({k: wire[k] for k in ("message_id", "origin")}, separators=(",", ":"))[:-1]
    tail = json.dumps(
        {k: wire[k] for k in wire if k not in ("message_id", "origin", "payload")},
        separators=(",", ":"),
    )[1:]
    _same_as_strict(f'{head},"payload":{payload},{tail}'.encode())


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fast_paths_decide_as_the_strict_parser_on_mutated_messages(
    message: GossipMessage, data: st.DataObject
) -> None:
    raw = bytearray(message.encode(with_chain=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip" and at < len(raw):
            raw[at] = data.draw(st.sampled_from(b'":,{}[]\\ 0aA-+/=.e\x00\xff'))
        elif action == "insert":
            raw[at:at] = data.draw(st.sampled_from([b'"', b":", b',"origin":"n"', b" ", b"{}"]))
        else:
            del raw[at : at + data.draw(st.integers(1, 4))]
    _same_as_strict(bytes(raw))


@PROPERTY
@given(path=st.sampled_from(FIELD_PATHS), value=json_values, indent=st.sampled_from([None, 1]))
def test_the_json_scanner_path_decides_as_the_strict_parser(
    valid: Json, path: str, value: Any, indent: int | None
) -> None:
    """Other layouts (json.dumps' spacing, fields in another order: the scanner path)."""
    data = copy.deepcopy(valid)
    _set(path, value)(data)
    _same_as_strict(json.dumps(data, indent=indent, ensure_ascii=False).encode())
    _same_as_strict(json.dumps(dict(reversed(data.items())), ensure_ascii=False).encode())


def test_the_layout_encode_writes_takes_the_regular_expression_path(
    message: GossipMessage,
) -> None:
    for with_chain in (False, True):
        for meta in ({}, {"a:b": "c:d", "n": None, "f": -0.5, "i": 7, "t": True, "é": "ü"}):
            changed = dataclasses.replace(message, payload=dict(message.payload, meta=meta))
            raw = changed.encode(with_chain=with_chain)
            assert _ANOMALY_WIRE(raw.decode()) is not None
            _same_as_strict(raw)
            assert decode_message(raw) == dataclasses.replace(
                changed, chain=changed.chain if with_chain else ()
            )


def test_repeated_keys_are_refused_on_every_path(message: GossipMessage) -> None:
    compact = message.encode()
    assert compact.startswith(b'{"message_id":')  # the layout the regular expression takes
    for raw in (
        compact.replace(b'"risk":', b'"risk":0.5,"risk":', 1),
        compact.replace(b'"meta":{', b'"meta":{"source":"x",', 1),
        compact.replace(b'"meta":{', b'"meta":{"a:b":"c:d","a:b":1,', 1),
        compact.replace(b'{"message_id"', b'{"origin":"node-1","message_id"', 1),
        json.dumps(json.loads(compact), indent=1)
        .encode()
        .replace(b'"origin"', b'"x":1,"origin"', 1),
    ):
        assert _strict(raw) is None
        with pytest.raises(MalformedMessage):
            decode_message(raw)


def test_a_decoded_message_writes_its_content_as_the_canonical_encoder(
    message: GossipMessage,
) -> None:
    """The anomaly content written directly for a checked message is canonical_json's."""
    for meta in ({}, {"z": 1, "a": "é:x", "m": None, "f": 0.1, "b": True}, None):
        payload = (
            dict(message.payload, meta=meta)
            if meta is not None
            else {k: v for k, v in message.payload.items() if k != "meta"}
        )
        for risk in (0, 1, 0.5, 1e-7, 0.1 + 0.2):
            decoded = decode_message(
                dataclasses.replace(message, payload=dict(payload, risk=risk)).encode()
            )
            assert decoded._checked
            content = canonical_json(
                [decoded.origin, decoded.payload, decoded.timestamp, decoded.expiry]
            )
            assert (
                _anomaly_content(decoded.origin, decoded.payload, decoded.timestamp, decoded.expiry)
                == content
            )
    # A message changed after decoding is not trusted to be checked.
    assert not dataclasses.replace(decoded, payload={"type": "crl", "crl": "MAA="})._checked
