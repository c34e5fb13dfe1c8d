"""Shared helpers of the BRC-103 core tests: the reference vectors, fixed wallets,
deterministic randomness and a hand-driven message relay between two sans-IO peers.

Every message is moved through its wire form (``parse_message_bytes(m.to_bytes())``), so
each test also exercises the writer and the strict parser.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from trustmesh.brc103.messages import AuthMessage, parse_message_bytes
from trustmesh.brc103.peer import Event, Peer
from trustmesh.brc103.wallet import Wallet
from trustmesh.wire.jsonwire import compact_json

VECTORS = Path(__file__).parent / "vectors"

# Keys of the reference vectors (identical in every vector file), plus a third party.
ALICE_KEY = "78a0fb6b8a8adf219f4647fa0cecbdee06ec218ea5395c43b92016189a9a31a8"
BOB_KEY = "f56ec2d979699a6746f84fe37b215272254688c8ae77b408003f1a9c9da1a5f5"
CERTIFIER_KEY = "235908cc1e924e03e6a1246537eb6e52f81d9c5038bd27c19998afa4f9a22eb2"
CAROL_KEY = "c4" * 32
OTHER_CERTIFIER_KEY = "5e" * 32
ANYONE_SECRET = b"\0" * 31 + b"\x01"

CERT_TYPE = base64.b64encode(b"trustmesh test type: identity 01").decode()
OTHER_TYPE = base64.b64encode(b"trustmesh test type: other    02").decode()
OUTPOINT = "ab" * 32 + ".1"


@cache
def vector(name: str) -> dict[str, Any]:
    data = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@cache
def wallet(secret_hex: str) -> Wallet:
    """One wallet per key (wallets are stateless apart from their ECDH cache)."""
    return Wallet.from_hex(secret_hex)


def alice() -> Wallet:
    return wallet(ALICE_KEY)


def bob() -> Wallet:
    return wallet(BOB_KEY)


def carol() -> Wallet:
    return wallet(CAROL_KEY)


def certifier() -> Wallet:
    return wallet(CERTIFIER_KEY)


def other_certifier() -> Wallet:
    return wallet(OTHER_CERTIFIER_KEY)


def anyone() -> Wallet:
    return Wallet(ANYONE_SECRET)


def seeded_random(seed: str) -> Callable[[int], bytes]:
    """A deterministic stand-in for ``os.urandom``: the same seed, the same bytes."""
    counter = itertools.count()

    def random(size: int) -> bytes:
        block = seed.encode() + next(counter).to_bytes(8, "big")
        return hashlib.shake_256(block).digest(size)

    return random


def relay(message: AuthMessage) -> AuthMessage:
    """The message as the other side parses it off the wire."""
    return parse_message_bytes(message.to_bytes())


def edited(message: AuthMessage, **members: Any) -> AuthMessage:
    """The message with wire members replaced (camelCase names), parsed again."""
    obj = message.to_json()
    obj.update(members)
    return parse_message_bytes(compact_json(obj))


def wire_json(message: AuthMessage) -> dict[str, Any]:
    """The message's wire object, decoded (a fresh copy to mutate)."""
    value = json.loads(message.to_bytes())
    assert isinstance(value, dict)
    return value


def one(messages: list[AuthMessage]) -> AuthMessage:
    assert len(messages) == 1, messages
    return messages[0]


def handshake(
    initiator: Peer,
    responder: Peer,
    now_ms: int = 0,
    *,
    peer_identity_key: str | None = None,
) -> tuple[list[Event], list[Event], list[AuthMessage]]:
    """initialRequest → initialResponse. Returns the initiator's events, the responder's
    events and what the initiator queued in answer (a certificateResponse, if any)."""
    request = initiator.initiate(now_ms, peer_identity_key=peer_identity_key)
    responder_events = responder.receive(relay(request), now_ms)
    response = one(responder.messages_to_send())
    initiator_events = initiator.receive(relay(response), now_ms)
    return initiator_events, responder_events, initiator.messages_to_send()
