"""Self-check of the bsv-sdk (Python) BRC-103 reference harness in bench/anchors/bsv_peer.py.

Two bsv-sdk Peers talk through the adapter wallet and the wire-dict conversion that trustmesh's
interop tests use; the wire form is compared with what bsv-sdk's own HTTP transport sends, the
reference quirks the harness documents are pinned, and the benchmark anchors run briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import coincurve
import pytest
from bsv.auth.auth_message import AuthMessage
from bsv.auth.requested_certificate_set import RequestedCertificateSet
from bsv.auth.transports.simplified_http_transport import SimplifiedHTTPTransport

from bench.anchors.bsv_peer import (
    MemoryTransport,
    ReferencePeerEndpoint,
    ReferencePeerError,
    ReferenceWallet,
    WireMessage,
    auth_message_to_wire,
    general_roundtrip_rate,
    handshake_rate,
    make_reference_peer,
    wire_to_auth_message,
)

WAIT_MS = 2_000
WIRE_KEYS = [
    "version",
    "messageType",
    "identityKey",
    "nonce",
    "initialNonce",
    "yourNonce",
    "certificates",
    "requestedCertificates",
    "payload",
    "signature",
]


def new_key() -> str:
    return coincurve.PrivateKey().secret.hex()


def identity_of(private_key_hex: str) -> str:
    return coincurve.PrivateKey(bytes.fromhex(private_key_hex)).public_key.format(True).hex()


def is_byte_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(b, int) and 0 <= b <= 255 for b in value)


def wire_peers() -> tuple[Any, Any, ReferenceWallet, ReferenceWallet, list[WireMessage]]:
    wa, wb = ReferenceWallet.from_hex(new_key()), ReferenceWallet.from_hex(new_key())
    ta, tb = MemoryTransport.pair(wire=True)
    return make_reference_peer(wa, ta), make_reference_peer(wb, tb), wa, wb, ta.log


def test_wallet_identity_matches_private_key() -> None:
    key = new_key()
    assert ReferenceWallet.from_hex(key).identity_key.hex() == identity_of(key)
    with pytest.raises(ValueError, match="32 bytes"):
        ReferenceWallet.from_hex("00" * 32)


def test_handshake_and_general_messages_through_wire_dicts() -> None:
    a, b, wa, wb, log = wire_peers()
    at_a: list[tuple[str, bytes]] = []
    at_b: list[tuple[str, bytes]] = []
    a.listen_for_general_messages(lambda sender, body: at_a.append((sender.hex(), body)))

    def answer(sender: Any, body: bytes) -> None:
        at_b.append((sender.hex(), body))
        assert b.to_peer(b"re: " + body, sender, WAIT_MS) is None

    b.listen_for_general_messages(answer)
    assert a.to_peer(b"hello", wb.identity_key, WAIT_MS) is None
    assert at_b == [(wa.identity_key.hex(), b"hello")]
    assert at_a == [(wb.identity_key.hex(), b"re: hello")]

    request, response, general, reply = log
    for message in log:
        assert list(message) == WIRE_KEYS
        assert message["version"] == "0.1"
    a_hex, b_hex = wa.identity_key.hex(), wb.identity_key.hex()
    n_a, n_b = request["initialNonce"], response["initialNonce"]
    assert len(n_a) == len(n_b) == 64  # 48-byte session nonces, unpadded base64

    assert request["messageType"] == "initialRequest"
    assert request["identityKey"] == a_hex
    assert (request["nonce"], request["yourNonce"]) == ("", "")
    assert (request["payload"], request["signature"]) == (None, None)
    # json.dumps(default=str) of the Peer's RequestedCertificateSet (notes h.3)
    assert request["requestedCertificates"].startswith("<RequestedCertificateSet(")

    assert response["messageType"] == "initialResponse"
    assert response["identityKey"] == b_hex
    assert response["nonce"] == n_b  # Python also sends nonce = its session nonce (notes h.2)
    assert response["yourNonce"] == n_a
    assert response["certificates"] == []
    assert response["requestedCertificates"] is None  # never asks for certificates
    assert response["payload"] is None
    assert is_byte_list(response["signature"])

    assert general["messageType"] == "general"
    assert general["yourNonce"] == n_b
    assert general["initialNonce"] == ""
    assert bytes(general["payload"]) == b"hello"
    assert is_byte_list(general["signature"])
    assert reply["yourNonce"] == n_a
    assert bytes(reply["payload"]) == b"re: hello"


def test_wire_form_is_what_the_sdk_http_transport_posts() -> None:
    a, _, wa, wb, log = wire_peers()
    assert a.to_peer(b"x", wb.identity_key, WAIT_MS) is None
    posted: list[Any] = []

    def post(url: str, data: bytes, headers: dict[str, str]) -> Any:
        posted.append(json.loads(data))
        return SimpleNamespace(status_code=200, content=b"", text="")

    http = SimplifiedHTTPTransport("http://127.0.0.1:9", client=SimpleNamespace(post=post))
    http.on_data(lambda message: None)
    initial_request = AuthMessage(
        version="0.1",
        message_type="initialRequest",
        identity_key=wa.identity_key,
        initial_nonce=log[0]["initialNonce"],
        requested_certificates=RequestedCertificateSet(),
    )
    non_general = [initial_request, *(wire_to_auth_message(m) for m in log[:2])]
    for message in non_general:
        http.send(message)  # "Empty response body" after posting; the body is what counts
    assert posted == [auth_message_to_wire(m) for m in non_general]
    assert posted[0] == log[0]
    # parsing with the SDK's parser and writing again is lossless for every message type
    assert [auth_message_to_wire(wire_to_auth_message(m)) for m in log] == log
    assert auth_message_to_wire(initial_request, ts_requested_certificates=True)[
        "requestedCertificates"
    ] == {"certifiers": [], "types": {}}


def test_reference_quirks() -> None:
    a, b, _, wb, log = wire_peers()
    seen: list[bytes] = []
    b.listen_for_general_messages(lambda sender, body: seen.append(body))
    assert a.to_peer(b"first", wb.identity_key, WAIT_MS) is None
    # An empty payload goes out as "payload": null, which bsv-sdk then verifies as b"None".
    assert a.to_peer(b"", wb.identity_key, WAIT_MS) is not None
    assert log[-1]["payload"] is None
    # The same message with "payload": [] verifies.
    fixed = dict(log[-1], payload=[])
    assert b.handle_incoming_message(wire_to_auth_message(fixed)) is None
    assert seen == [b"first", b""]
    # A second handshake with a peer it already has a session with never completes (h.8).
    assert a.initiate_handshake(wb.identity_key, 100) is None
    # The parser defaults a missing messageType to initialResponse and refuses snake_case.
    bare = {"version": "0.1", "identityKey": wb.identity_key.hex()}
    assert wire_to_auth_message(bare).message_type == "initialResponse"
    with pytest.raises(ValueError, match="identity_key is required"):
        wire_to_auth_message({"version": "0.1", "messageType": "general"})
    with pytest.raises(ValueError, match="identityKey"):
        wire_to_auth_message({"identity_key": wb.identity_key.hex()})


@contextlib.asynccontextmanager
async def linked(
    a: ReferencePeerEndpoint, b: ReferencePeerEndpoint
) -> AsyncIterator[list[BaseException]]:
    """Pump each endpoint's outbox into the other one's deliver(); yields the pump errors."""
    errors: list[BaseException] = []

    async def pump(src: ReferencePeerEndpoint, dst: ReferencePeerEndpoint) -> None:
        while True:
            wire = await src.outbox.get()
            try:
                await dst.deliver(json.loads(json.dumps(wire)))
            except (ReferencePeerError, ValueError) as exc:
                errors.append(exc)

    tasks = [asyncio.create_task(pump(a, b)), asyncio.create_task(pump(b, a))]
    try:
        yield errors
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_endpoints_handshake_and_echo_over_wire_dicts() -> None:
    key_a, key_b = new_key(), new_key()
    a = ReferencePeerEndpoint(key_a, ts_requested_certificates=True)
    b = ReferencePeerEndpoint(key_b, reply=bytes)
    assert (a.identity_key, b.identity_key) == (identity_of(key_a), identity_of(key_b))
    async with linked(a, b) as errors:
        await a.send_general(b"ping", b.identity_key, max_wait=5.0)
        assert await asyncio.wait_for(b.received.get(), 5) == (a.identity_key, b"ping")
        assert await asyncio.wait_for(a.received.get(), 5) == (b.identity_key, b"ping")
        await b.send_general(b"pong")  # the responder answers on the same session
        assert await asyncio.wait_for(a.received.get(), 5) == (b.identity_key, b"pong")
    assert errors == []
    assert b.reply_errors == []
    assert [m["messageType"] for m in a.sent] == ["initialRequest", "general"]
    assert [m["messageType"] for m in b.sent] == ["initialResponse", "general", "general"]
    assert a.sent[0]["requestedCertificates"] == {"certifiers": [], "types": {}}

    tampered = dict(b.sent[-1], payload=list(b"pwned"))
    with pytest.raises(ReferencePeerError, match="invalid signature"):
        await a.deliver(tampered)
    with pytest.raises(ReferencePeerError, match="version"):
        await a.deliver(dict(b.sent[-1], version="0.2"))


def test_rates_are_positive() -> None:
    assert handshake_rate(0.2) > 0
    assert general_roundtrip_rate(0.2) > 0
