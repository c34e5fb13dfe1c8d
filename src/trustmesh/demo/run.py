"""``trustmesh demo``: shows, step by step, what trustmesh does today, and checks each step."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import secrets
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustmesh.crypto.keys import KeyKind, PrivateKey, PublicKey
from trustmesh.demo.channel import NONCE_SIZE, ChannelReady, DemoChannel, MessageReceived
from trustmesh.errors import InvalidSignatureError, ProtocolError
from trustmesh.io.stream import StreamDriver, open_stream, serve_stream
from trustmesh.keystore.filestore import load_key_file, save_key_file
from trustmesh.sansio import ConnectionClosed
from trustmesh.wire.frames import decode_frame, encode_frame
from trustmesh.wire.peerid import KeyType, PeerId, decode_public_key

# The secp256k1 test key of libp2p/specs peer-ids/peer-ids.md and the ID it must give.
LIBP2P_SECP256K1_PUBLIC = bytes.fromhex(
    "08021221037777e994e452c21604f91de093ce415f5432f701dd8cd1a7a6fea0e630bfca99"
)
LIBP2P_SECP256K1_PEER_ID = "16Uiu2HAmLhLvBoYaoZfaMUKuibM6ac163GwKY74c5kiSLg5KvLpY"
STEP_TIMEOUT = 10.0


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


class DemoFailure(Exception):
    """A check in a demo step did not hold."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailure(message)


async def run_demo(workdir: Path) -> list[Step]:
    """Run every step in ``workdir``; a failed step is reported, never hidden."""
    keys: dict[KeyKind, PrivateKey] = {}
    steps: list[Step] = []
    plan: list[tuple[str, Callable[[], Coroutine[Any, Any, tuple[str, dict[str, Any]]]]]] = [
        ("key files", lambda: _keys_step(workdir, keys)),
        ("peer ids", lambda: _peer_id_step(keys)),
        ("signatures", lambda: _signature_step(keys)),
        ("ecdh", _ecdh_step),
        ("secure channel", _channel_step),
    ]
    for name, action in plan:
        try:
            detail, data = await asyncio.wait_for(action(), STEP_TIMEOUT)
            steps.append(Step(name, True, detail, data))
        except (DemoFailure, ProtocolError, OSError, TimeoutError) as exc:
            steps.append(Step(name, False, f"{type(exc).__name__}: {exc}"))
    return steps


async def _keys_step(workdir: Path, keys: dict[KeyKind, PrivateKey]) -> tuple[str, dict[str, Any]]:
    passphrase = secrets.token_urlsafe(16).encode()
    files = {}
    for kind in KeyKind:
        key = PrivateKey.generate(kind)
        path = save_key_file(key, workdir / f"{kind}.pem", passphrase)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        _check(mode == 0o600, f"{path} has mode {mode:o}, not 600")
        _check(b"ENCRYPTED" in path.read_bytes(), f"{path} is not encrypted")
        loaded = load_key_file(path, passphrase)
        _check(loaded.public_key() == key.public_key(), f"{kind} key did not load back")
        keys[kind] = loaded
        files[str(kind)] = str(path)
    return "3 keys written encrypted (scrypt, mode 0600) and loaded back", {"files": files}


async def _peer_id_step(keys: dict[KeyKind, PrivateKey]) -> tuple[str, dict[str, Any]]:
    _need_keys(keys)
    key_type, data = decode_public_key(LIBP2P_SECP256K1_PUBLIC)
    vector = PeerId.from_public_key(key_type, data)
    _check(str(vector) == LIBP2P_SECP256K1_PEER_ID, f"libp2p test vector gave {vector}")
    ids = {}
    for kind, key in keys.items():
        peer_id = key.public_key().peer_id()
        _check(PeerId.parse(str(peer_id)) == peer_id, f"{kind} peer ID does not parse back")
        _check(PeerId.parse(peer_id.to_cid()) == peer_id, f"{kind} CID form does not parse back")
        ids[str(kind)] = str(peer_id)
    ordered = sorted(PeerId.parse(text) for text in ids.values())
    _check(all(int(a) < int(b) for a, b in itertools.pairwise(ordered)), "bad order")
    _check(key_type is KeyType.SECP256K1, "libp2p vector is not secp256k1")
    return "libp2p peer IDs derived, parsed back, ordered; spec vector matches", {"peer_ids": ids}


async def _signature_step(keys: dict[KeyKind, PrivateKey]) -> tuple[str, dict[str, Any]]:
    _need_keys(keys)
    message = b"trustmesh demo message"
    sizes = {}
    for kind, key in keys.items():
        signature = key.sign(message)
        key.public_key().verify(signature, message)
        _check(
            not _verifies(key.public_key(), signature, message + b"!"),
            f"{kind} accepted a signature over another message",
        )
        sizes[str(kind)] = len(signature)
    return "signed and verified with every key type; tampering detected", {"sizes": sizes}


async def _ecdh_step() -> tuple[str, dict[str, Any]]:
    for kind in (KeyKind.SECP256K1, KeyKind.P256):
        a, b = PrivateKey.generate(kind), PrivateKey.generate(kind)
        _check(a.ecdh(b.public_key()) == b.ecdh(a.public_key()), f"{kind} ECDH disagrees")
    return "secp256k1 and P-256 ECDH agree on both sides", {}


async def _channel_step() -> tuple[str, dict[str, Any]]:
    server_key = PrivateKey.generate(KeyKind.SECP256K1)
    client_key = PrivateKey.generate(KeyKind.SECP256K1)
    messages = [b"hello", b"from", b"trustmesh " * 100]
    echoed: list[bytes] = []

    async def echo(driver: StreamDriver[DemoChannel]) -> None:
        async for event in driver:
            if isinstance(event, MessageReceived):
                driver.act(functools.partial(DemoChannel.send, data=event.data))

    def server_core() -> DemoChannel:
        return _core(server_key, client_key.public_key(), initiator=False)

    server = await serve_stream(server_core, echo, "127.0.0.1", 0)
    try:
        port = server.port
        started = time.perf_counter()
        client = await open_stream(
            _core(client_key, server_key.public_key(), initiator=True), "127.0.0.1", port
        )
        _check(isinstance(await client.next_event(), ChannelReady), "no channel established")
        for message in messages:
            client.act(functools.partial(DemoChannel.send, data=message))
        while len(echoed) < len(messages):
            event = await client.next_event()
            _check(not isinstance(event, ConnectionClosed), f"channel closed: {event}")
            if isinstance(event, MessageReceived):
                echoed.append(event.data)
        elapsed_ms = (time.perf_counter() - started) * 1000
        _check(echoed == messages, "echoed messages differ from what was sent")
        client.close()
        await client.wait_closed()
        # A peer without the right key: its forged record must make the server hang up.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_frame(os.urandom(NONCE_SIZE)) + encode_frame(os.urandom(64)))
        await writer.drain()
        reply = await reader.read()  # returns only once the server has closed
        writer.close()
        _check(len(decode_frame(reply)) == NONCE_SIZE, "server answered a forged record")
    finally:
        server.close()
        await server.wait_closed()
    return (
        f"TCP loopback, {len(messages)} messages echoed through AES-256-GCM in "
        f"{elapsed_ms:.1f} ms; a forged record closed the channel",
        {"messages": len(messages), "elapsed_ms": round(elapsed_ms, 2)},
    )


def _need_keys(keys: dict[KeyKind, PrivateKey]) -> None:
    missing = [str(kind) for kind in KeyKind if kind not in keys]
    _check(not missing, f"no {', '.join(missing)} key: the key files step failed")


def _verifies(public: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(signature, message)
    except InvalidSignatureError:
        return False
    return True


def _core(key: PrivateKey, peer: PublicKey, *, initiator: bool) -> DemoChannel:
    return DemoChannel(key, peer, initiator=initiator, nonce=os.urandom(NONCE_SIZE))
