"""trustmesh's BRC-103 peer against the Python reference (bsv-sdk 2.4.0's ``bsv.auth.peer.Peer``).

Our :class:`~trustmesh.io.brc103.AsyncPeer` and the reference, wrapped by
``bench.anchors.bsv_peer.ReferencePeerEndpoint``, exchange AuthMessages as decoded JSON
objects: ours go out as ``AuthMessage.to_json()``, the reference's come in through
``parse_message``, so each side reads exactly what the other writes (including the Python
reference's quirks: every member present, ``""`` for absent nonces, a ``repr`` string as
``requestedCertificates``, ``payload: null`` for an empty payload).

tests/interop/test_bsv_sdk_selfcheck.py checks the reference harness on its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import pytest

from bench.anchors.bsv_peer import ReferencePeerEndpoint, WireMessage
from trustmesh.brc103.errors import (
    IdentityMismatchError,
    MessageSignatureError,
    NonceError,
    ReplayError,
)
from trustmesh.brc103.messages import AuthMessage, parse_message
from trustmesh.brc103.peer import GeneralMessageReceived, Peer
from trustmesh.brc103.wallet import Wallet
from trustmesh.io.brc103 import AsyncPeer, MessageHandler

OUR_KEY = "e5" * 32
REFERENCE_KEY = "f6" * 32
THIRD_KEY = "17" * 32
OUR_ID = Wallet.from_hex(OUR_KEY).identity_key
WAIT = 5.0  # any one exchange; each takes a few milliseconds


async def within(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, WAIT)


def wire_copy(wire: WireMessage) -> WireMessage:
    """What the other side would decode: a copy through JSON text."""
    copied: WireMessage = json.loads(json.dumps(wire))
    return copied


class ReferenceLink:
    """Our side's :class:`~trustmesh.io.brc103.MessageTransport`, wired to a reference
    endpoint: what we send is delivered to the reference as a wire object; what the
    reference sends (its ``on_send``) is parsed and handed to our peer.

    With ``divert`` set, messages from the reference are queued there instead, for a test
    to change, drop or deliver (:meth:`inject`) itself."""

    def __init__(self) -> None:
        self.endpoint: ReferencePeerEndpoint | None = None
        self._handler: MessageHandler | None = None
        self.to_reference: list[WireMessage] = []
        self.from_reference: list[WireMessage] = []
        self.divert: asyncio.Queue[WireMessage] | None = None
        self.errors: list[Exception] = []  # messages of the reference that did not parse

    def set_handler(self, handler: MessageHandler) -> None:
        self._handler = handler

    async def send(self, message: AuthMessage) -> None:
        assert self.endpoint is not None
        wire: WireMessage = json.loads(message.to_bytes())
        self.to_reference.append(wire)
        await self.endpoint.deliver(wire)  # ReferencePeerError if the reference refuses it

    def on_reference_send(self, wire: WireMessage) -> None:
        """The endpoint's ``on_send`` (called on the event loop)."""
        self.from_reference.append(wire)
        if self.divert is not None:
            self.divert.put_nowait(wire)
            return
        try:
            self.inject(wire)
        except Exception as exc:  # the loop would only log it
            self.errors.append(exc)

    def inject(self, wire: WireMessage) -> None:
        """Hand our peer one message as if the reference had sent it."""
        assert self._handler is not None
        self._handler(parse_message(wire_copy(wire)))


class Linked(NamedTuple):
    ours: AsyncPeer
    reference: ReferencePeerEndpoint
    link: ReferenceLink


@asynccontextmanager
async def linked(*, reply: bool = False) -> AsyncIterator[Linked]:
    """Our AsyncPeer and a reference peer on one link; with ``reply`` the reference answers
    each general message with ``b"re: " + payload``. Checks on the way out that neither
    side failed in the background."""
    link = ReferenceLink()
    reference = ReferencePeerEndpoint(
        REFERENCE_KEY,
        link.on_reference_send,
        reply=(lambda payload: b"re: " + payload) if reply else None,
    )
    link.endpoint = reference
    ours = AsyncPeer(Peer(Wallet.from_hex(OUR_KEY)), link, handshake_timeout=WAIT)
    try:
        yield Linked(ours, reference, link)
    finally:
        await ours.close()
    assert link.errors == []
    assert reference.reply_errors == []


async def received_by_us(ours: AsyncPeer) -> GeneralMessageReceived:
    event: GeneralMessageReceived = await within(ours.receive())
    return event


async def received_by_reference(reference: ReferencePeerEndpoint) -> tuple[str, bytes]:
    got: tuple[str, bytes] = await within(reference.received.get())
    return got


async def test_we_initiate_then_general_messages_flow_both_ways() -> None:
    async with linked(reply=True) as (ours, reference, link):
        assert await within(ours.handshake()) == reference.identity_key
        await within(ours.send_general(b"ping", identity_key=reference.identity_key))
        assert await received_by_reference(reference) == (ours.identity_key, b"ping")
        answer = await received_by_us(ours)
        assert (answer.identity_key, answer.payload) == (reference.identity_key, b"re: ping")

        await within(reference.send_general(b"unprompted", ours.identity_key))
        unprompted = await received_by_us(ours)
        assert (unprompted.identity_key, unprompted.payload) == (
            reference.identity_key,
            b"unprompted",
        )
        assert unprompted.session_nonce == answer.session_nonce  # one session throughout
        [session] = ours.peer.sessions
        assert session.initiator
        assert not ours.errors

    # The reference's initialResponse, as it writes it: every member present, its session
    # nonce also as "nonce", an empty certificate list, no request of its own.
    initial_response = link.from_reference[0]
    assert initial_response["messageType"] == "initialResponse"
    assert initial_response["nonce"] == initial_response["initialNonce"]
    assert initial_response["yourNonce"] == link.to_reference[0]["initialNonce"]
    assert initial_response["certificates"] == []
    assert initial_response["requestedCertificates"] is None
    assert [m["messageType"] for m in link.to_reference] == ["initialRequest", "general"]
    assert [m["messageType"] for m in link.from_reference] == [
        "initialResponse",
        "general",
        "general",
    ]


async def test_reference_initiates_and_we_answer() -> None:
    async with linked() as (ours, reference, link):
        await within(reference.send_general(b"hello from bsv-sdk", ours.identity_key))
        hello = await received_by_us(ours)
        assert (hello.identity_key, hello.payload) == (
            reference.identity_key,
            b"hello from bsv-sdk",
        )
        [session] = ours.peer.sessions
        assert not session.initiator
        assert session.peer_identity_key == reference.identity_key

        await within(ours.send_general(b"answer", identity_key=hello.identity_key))
        assert await received_by_reference(reference) == (ours.identity_key, b"answer")
        await within(reference.send_general(b"again", ours.identity_key))
        assert (await received_by_us(ours)).payload == b"again"
        assert not ours.errors

    # The reference writes its (empty) certificate request as a Python repr string, which we
    # read as "no request".
    initial_request = link.from_reference[0]
    assert initial_request["messageType"] == "initialRequest"
    assert initial_request["requestedCertificates"].startswith("<RequestedCertificateSet(")
    assert [m["messageType"] for m in link.to_reference] == ["initialResponse", "general"]


async def test_empty_payloads_both_ways() -> None:
    # The reference sends an empty payload as "payload": null; ours goes out as [].
    async with linked() as (ours, reference, link):
        await within(ours.handshake())
        await within(reference.send_general(b"", ours.identity_key))
        assert link.from_reference[-1]["payload"] is None
        assert (await received_by_us(ours)).payload == b""
        await within(ours.send_general(b"", identity_key=reference.identity_key))
        assert link.to_reference[-1]["payload"] == []
        assert await received_by_reference(reference) == (ours.identity_key, b"")
        assert not ours.errors


async def capture_next(
    link: ReferenceLink, reference: ReferencePeerEndpoint, payload: bytes
) -> WireMessage:
    """The reference's next general message to us (``payload``), held back instead of
    delivered."""
    link.divert = asyncio.Queue()
    try:
        await within(reference.send_general(payload, OUR_ID))
        wire: WireMessage = await within(link.divert.get())
    finally:
        link.divert = None
    return wire


async def test_we_refuse_tampered_reference_messages() -> None:
    async with linked() as (ours, reference, link):
        await within(ours.handshake())
        genuine = await capture_next(link, reference, b"genuine")

        link.inject({**genuine, "payload": list(b"tampered")})
        assert isinstance(ours.errors[-1], MessageSignatureError)
        signature = list(genuine["signature"])
        signature[-1] ^= 1
        link.inject({**genuine, "signature": signature})
        assert isinstance(ours.errors[-1], MessageSignatureError)
        # The reference would deliver this one under the third party's name (notes g).
        third = Wallet.from_hex(THIRD_KEY).identity_key
        link.inject({**genuine, "identityKey": third})
        assert isinstance(ours.errors[-1], IdentityMismatchError)
        assert len(ours.errors) == 3

        # None of the refusals used up the message's nonce: the genuine one still gets in,
        # and it is the first message we receive.
        link.inject(genuine)
        first = await received_by_us(ours)
        assert (first.identity_key, first.payload) == (reference.identity_key, b"genuine")
        assert len(ours.errors) == 3


async def test_we_refuse_replays_that_the_reference_accepts() -> None:
    async with linked() as (ours, reference, link):
        await within(ours.handshake())
        await within(reference.send_general(b"once", ours.identity_key))
        assert (await received_by_us(ours)).payload == b"once"

        link.inject(link.from_reference[-1])
        assert len(ours.errors) == 1
        assert isinstance(ours.errors[0], ReplayError)
        await within(reference.send_general(b"next", ours.identity_key))
        assert (await received_by_us(ours)).payload == b"next"  # the replay never surfaced

        # The reference has no replay protection: our message, delivered twice, arrives twice.
        await within(ours.send_general(b"twice", identity_key=reference.identity_key))
        await within(reference.deliver(wire_copy(link.to_reference[-1])))
        assert await received_by_reference(reference) == (ours.identity_key, b"twice")
        assert await received_by_reference(reference) == (ours.identity_key, b"twice")
        assert len(ours.errors) == 1


@pytest.mark.parametrize(
    ("member", "error"), [("nonce", MessageSignatureError), ("yourNonce", NonceError)]
)
async def test_we_refuse_reference_messages_with_a_changed_nonce(
    member: str, error: type[Exception]
) -> None:
    # The message nonce is part of the signature's key ID; yourNonce must be a session nonce
    # of ours (its HMAC verifies). The other side's nonce fits neither place.
    async with linked() as (ours, reference, link):
        await within(ours.handshake())
        genuine = await capture_next(link, reference, b"payload")
        other = {"nonce": link.to_reference[0]["initialNonce"], "yourNonce": genuine["nonce"]}
        link.inject({**genuine, member: other[member]})
        assert len(ours.errors) == 1
        assert isinstance(ours.errors[0], error)
        link.inject(genuine)
        assert (await received_by_us(ours)).payload == b"payload"
