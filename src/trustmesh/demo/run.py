"""``trustmesh demo --tour``: the foundation under the mesh, step by step, each checked:
key files, libp2p peer IDs, signatures, ECDH, a BOTD #2 channel and a PSEC channel."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from trustmesh.botd import BotdConfig, BotdConnection, HandshakeFailed
from trustmesh.crypto.keys import KeyKind, PrivateKey, PublicKey
from trustmesh.demo.steps import DemoFailure, Step, check
from trustmesh.errors import InvalidSignatureError, ProtocolError
from trustmesh.io import botd
from trustmesh.io.psec import PsecEndpoint, open_psec
from trustmesh.keystore.filestore import load_key_file, save_key_file
from trustmesh.node.local import issue_node_files
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.channel import ChannelClosed, ChannelData, ChannelUp
from trustmesh.psec.dtls import NAME as DTLS
from trustmesh.psec.identity import psec_identity
from trustmesh.psec.quic import NAME as QUIC
from trustmesh.sansio import Event
from trustmesh.wire.frames import decode_frame, encode_frame
from trustmesh.wire.pb.botd_pb2 import Frame
from trustmesh.wire.peerid import KeyType, PeerId, decode_public_key

# The secp256k1 test key of libp2p/specs peer-ids/peer-ids.md and the ID it must give.
LIBP2P_SECP256K1_PUBLIC = bytes.fromhex(
    "08021221037777e994e452c21604f91de093ce415f5432f701dd8cd1a7a6fea0e630bfca99"
)
LIBP2P_SECP256K1_PEER_ID = "16Uiu2HAmLhLvBoYaoZfaMUKuibM6ac163GwKY74c5kiSLg5KvLpY"
STEP_TIMEOUT = 10.0


async def run_tour(workdir: Path) -> list[Step]:
    """Run every step in ``workdir``; a failed step is reported, never hidden."""
    keys: dict[KeyKind, PrivateKey] = {}
    steps: list[Step] = []
    plan: list[tuple[str, Callable[[], Coroutine[Any, Any, tuple[str, dict[str, Any]]]]]] = [
        ("key files", lambda: _keys_step(workdir, keys)),
        ("peer ids", lambda: _peer_id_step(keys)),
        ("signatures", lambda: _signature_step(keys)),
        ("ecdh", _ecdh_step),
        ("botd channel", _botd_step),
        ("psec channel", lambda: _psec_step(workdir, DTLS)),
        ("psec quic channel", lambda: _psec_step(workdir, QUIC)),
    ]
    for name, action in plan:
        started = time.monotonic()
        try:
            detail, data = await asyncio.wait_for(action(), STEP_TIMEOUT)
            steps.append(Step(name, True, detail, time.monotonic() - started, data))
        except (DemoFailure, ProtocolError, OSError, TimeoutError) as exc:
            steps.append(
                Step(name, False, f"{type(exc).__name__}: {exc}", time.monotonic() - started)
            )
    return steps


async def _keys_step(workdir: Path, keys: dict[KeyKind, PrivateKey]) -> tuple[str, dict[str, Any]]:
    passphrase = secrets.token_urlsafe(16).encode()
    files = {}
    for kind in KeyKind:
        key = PrivateKey.generate(kind)
        path = save_key_file(key, workdir / f"{kind}.pem", passphrase)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        check(mode == 0o600, f"{path} has mode {mode:o}, not 600")
        check(b"ENCRYPTED" in path.read_bytes(), f"{path} is not encrypted")
        loaded = load_key_file(path, passphrase)
        check(loaded.public_key() == key.public_key(), f"{kind} key did not load back")
        keys[kind] = loaded
        files[str(kind)] = str(path)
    return "3 keys written encrypted (scrypt, mode 0600) and loaded back", {"files": files}


async def _peer_id_step(keys: dict[KeyKind, PrivateKey]) -> tuple[str, dict[str, Any]]:
    _need_keys(keys)
    key_type, data = decode_public_key(LIBP2P_SECP256K1_PUBLIC)
    vector = PeerId.from_public_key(key_type, data)
    check(str(vector) == LIBP2P_SECP256K1_PEER_ID, f"libp2p test vector gave {vector}")
    ids = {}
    for kind, key in keys.items():
        peer_id = key.public_key().peer_id()
        check(PeerId.parse(str(peer_id)) == peer_id, f"{kind} peer ID does not parse back")
        check(PeerId.parse(peer_id.to_cid()) == peer_id, f"{kind} CID form does not parse back")
        ids[str(kind)] = str(peer_id)
    ordered = sorted(PeerId.parse(text) for text in ids.values())
    check(all(int(a) < int(b) for a, b in itertools.pairwise(ordered)), "bad order")
    check(key_type is KeyType.SECP256K1, "libp2p vector is not secp256k1")
    return "libp2p peer IDs derived, parsed back, ordered; spec vector matches", {"peer_ids": ids}


async def _signature_step(keys: dict[KeyKind, PrivateKey]) -> tuple[str, dict[str, Any]]:
    _need_keys(keys)
    message = b"trustmesh demo message"
    sizes = {}
    for kind, key in keys.items():
        signature = key.sign(message)
        key.public_key().verify(signature, message)
        check(
            not _verifies(key.public_key(), signature, message + b"!"),
            f"{kind} accepted a signature over another message",
        )
        sizes[str(kind)] = len(signature)
    return "signed and verified with every key type; tampering detected", {"sizes": sizes}


async def _ecdh_step() -> tuple[str, dict[str, Any]]:
    for kind in (KeyKind.SECP256K1, KeyKind.P256):
        a, b = PrivateKey.generate(kind), PrivateKey.generate(kind)
        check(a.ecdh(b.public_key()) == b.ecdh(a.public_key()), f"{kind} ECDH disagrees")
    return "secp256k1 and P-256 ECDH agree on both sides", {}


async def _botd_step() -> tuple[str, dict[str, Any]]:
    server_key, client_key, stranger = (PrivateKey.generate(KeyKind.SECP256K1) for _ in range(3))
    server_pub = server_key.public_key()
    messages = [b"hello", b"from", b"trustmesh " * 100]
    rejections: asyncio.Queue[str] = asyncio.Queue()

    async def echo(channel: botd.Channel) -> None:
        async for message in channel:
            await channel.send(message)

    config = BotdConfig(allow=frozenset({client_key.public_key()}))
    server = await botd.serve(
        server_key,
        echo,
        "127.0.0.1",
        0,
        config=config,
        on_reject=lambda _remote, reason: rejections.put_nowait(reason),
    )
    async with server:
        started = time.perf_counter()
        async with botd.connect("127.0.0.1", server.port, client_key, server_pub) as channel:
            for message in messages:
                await channel.send(message)
            echoed = [await channel.recv() for _ in messages]
            rtt = await channel.ping()
        elapsed_ms = (time.perf_counter() - started) * 1000
        check(echoed == messages, "echoed messages differ from what was sent")
        # A key that is not on the allow-list is refused before any data.
        check(
            await _handshake_refused(server.port, stranger, server_pub),
            "a key not on the allow-list was accepted",
        )
        reason = await rejections.get()
        check("allow-list" in reason, f"the stranger was refused for another reason: {reason}")
        # An Init whose signature was tampered with: the server hangs up, saying nothing.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_forged_init(client_key, server_pub))
        await writer.drain()
        reply = await reader.read()  # returns only once the server has closed
        writer.close()
        check(reply == b"", "the server answered a forged Init")
        reason = await rejections.get()
        check("signature" in reason, f"the forged Init was refused for another reason: {reason}")
    return (
        f"BOTD #2 over TCP loopback: handshake, {len(messages)} messages echoed and a ping "
        f"(rtt {rtt * 1000:.2f} ms) in {elapsed_ms:.1f} ms; a key off the allow-list and a "
        "forged Init were refused",
        {"messages": len(messages), "elapsed_ms": round(elapsed_ms, 2), "rtt_ms": rtt * 1000},
    )


async def _psec_step(workdir: Path, scheme: str) -> tuple[str, dict[str, Any]]:
    """Two mesh identities negotiate ``scheme`` over UDP, confirm the transcript and
    echo a datagram."""
    home = Path(tempfile.mkdtemp(prefix="psec-", dir=workdir))  # a run never reuses files
    ca = CertificateAuthority.init(home / "ca", None, name="tour CA")
    try:
        identities = [
            psec_identity(issue_node_files(ca, name, home / name), (scheme,))
            for name in ("node-a", "node-b")
        ]
    finally:
        ca.close()
    ups: dict[int, ChannelUp] = {}
    echoed: asyncio.Queue[bytes] = asyncio.Queue()
    changed = asyncio.Event()
    closed: list[str] = []
    endpoints: list[PsecEndpoint] = []

    def on_event(side: int) -> Callable[[tuple[str, int], Event], None]:
        def handle(address: tuple[str, int], event: Event) -> None:
            if isinstance(event, ChannelUp):
                ups[side] = event
                changed.set()
            elif isinstance(event, ChannelData):
                if side == 1:
                    endpoints[1].send(address, event.data)  # b echoes
                else:
                    echoed.put_nowait(event.data)
            elif isinstance(event, ChannelClosed):
                closed.append(event.reason)
                changed.set()
                echoed.put_nowait(b"")  # wakes a wait for the echo; checked below

        return handle

    for side, identity in enumerate(identities):
        endpoint = await open_psec(identity, "127.0.0.1", 0, on_event=on_event(side))
        endpoints.append(endpoint)
    try:
        started = time.perf_counter()
        target = ("127.0.0.1", endpoints[1].port)
        endpoints[0].connect(target, expected_peer=identities[1].peer_id)
        while len(ups) < 2 and not closed:
            changed.clear()
            await changed.wait()
        check(not closed, f"the PSEC channel closed: {closed}")
        endpoints[0].send(target, b"hello over psec")
        data = await echoed.get()
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        for endpoint in endpoints:
            endpoint.close()
    check(data == b"hello over psec", "the echoed datagram differs")
    check(ups[0].peer_id == identities[1].peer_id, "node-a reached another peer ID than it dialled")
    check(ups[1].peer_id == identities[0].peer_id, "node-b saw another peer ID than node-a's")
    how = {
        DTLS: "DTLS 1.2 with both mesh certificates (address validated by a cookie)",
        QUIC: "QUIC with both mesh certificates (the client's checked by the server before "
        "HANDSHAKE_DONE) carrying RFC 9221 DATAGRAM frames",
    }[scheme]
    return (
        f"PSEC over UDP loopback: {ups[0].scheme} negotiated, {how}, the transcript confirmed "
        f"both ways, peer IDs checked against the certificates, a datagram echoed, in "
        f"{elapsed_ms:.1f} ms",
        {"scheme": ups[0].scheme, "elapsed_ms": round(elapsed_ms, 2)},
    )


async def _handshake_refused(port: int, key: PrivateKey, peer: PublicKey) -> bool:
    try:
        channel = await botd.connect("127.0.0.1", port, key, peer)
    except HandshakeFailed:
        return True
    await channel.close()
    return False


def _forged_init(key: PrivateKey, peer: PublicKey) -> bytes:
    """A real Init from ``key`` to ``peer`` with one bit of its signature flipped."""
    core = BotdConnection(key, peer_key=peer)
    core.start(0.0)
    frame = Frame.FromString(decode_frame(core.data_to_send()))
    signature = bytearray(frame.init.signature)
    signature[10] ^= 0x01
    frame.init.signature = bytes(signature)
    return encode_frame(frame.SerializeToString())


def _need_keys(keys: dict[KeyKind, PrivateKey]) -> None:
    missing = [str(kind) for kind in KeyKind if kind not in keys]
    check(not missing, f"no {', '.join(missing)} key: the key files step failed")


def _verifies(public: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(signature, message)
    except InvalidSignatureError:
        return False
    return True
