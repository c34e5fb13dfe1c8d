"""BOTD #2: handshakes, bulk throughput and small-message rate, each against an anchor.

- handshakes_per_s: full in-memory handshakes (Init, Ack, Finished, both sides), against
  pyln-proto's BOLT #8 handshake in its own venv. Goal: ratio >= 1.5.
- crypto_ceiling_ratio: the same handshakes against the secp256k1 operations a handshake
  pair needs and nothing else (4 signatures, 4 verifications, 2 ECDH, 2 key
  generations), called straight into libsecp256k1 through coincurve's binding. Its
  ratio is the share of that ceiling we reach. Goal: >= 0.6.
- throughput_64k: bulk MiB/s over loopback TCP in 64 KiB messages, against stdlib
  asyncio TLS 1.3 on the same loopback with 64 KiB writes. Goal: ratio >= 2.
- mib_per_s: the same BOTD figure against plain asyncio TCP (no encryption, no framing)
  on the same loopback with 64 KiB writes: what share of the bare transport we keep.
- bulk_floor_ratio: the same BOTD figure against the least any Python channel must do
  per message: AES-256-GCM seal, a 4-byte length prefix, one vectored write; on the
  other side reads into a kept buffer and AES-256-GCM open where the record lies, bytes
  counted, no message handed to anyone. What is left between the two is our framing,
  copies, events and the message API. No goal: it shows where the time goes.
- messages_1k_per_s: 1 KiB messages per second over loopback, against pyln-proto's
  BOLT #8 transport. Goal: ratio >= 2.

Every anchor is measured in the same run, in rounds alternating with ours; a ratio is
the median of the per-round ratios (bench.harness.Comparison). The event
loop is uvloop when installed (trustmesh.eventloop; TRUSTMESH_NO_UVLOOP=1 for asyncio's),
for ours and the asyncio anchors alike, and the report names it (``event_loop``).

The allocator is pinned for the whole process, ours and the anchors alike
(PROCESS_ENV; ``python -m bench botd`` re-executes itself with it when it is not set,
and the report says so under ``allocator``): glibc serves 256 KiB buffers from fresh
mmap()s until a large block has been freed once, and the TLS anchor reads into such
buffers, so without the pin its speed depended on what ran before it in the process.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from bench.anchors import PylnAnchor
from bench.harness import Comparison, Result
from trustmesh import eventloop
from trustmesh.botd import BotdConnection
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.io import botd

MIB = 1024 * 1024
ROUND_TIME = 0.4  # seconds per measurement round
ROUNDS = 7
BULK_TOTAL = 64 * MIB  # bytes per bulk round
MESSAGES_1K = 20000  # messages per 1 KiB round


# glibc malloc tunables for the whole bench process: blocks below 4 MiB from the heap,
# not from mmap(), and the heap trimmed only past 16 MiB free. Same for every side.
PROCESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "4194304", "MALLOC_TRIM_THRESHOLD_": "16777216"}


def info() -> dict[str, object]:
    """Run facts the report prints beside the figures."""
    pinned = all(os.environ.get(name) == value for name, value in PROCESS_ENV.items())
    allocator = (
        "glibc pinned (MALLOC_MMAP_THRESHOLD_=4 MiB, MALLOC_TRIM_THRESHOLD_=16 MiB)"
        if pinned
        else "glibc defaults (not pinned: anchors may be skewed)"
    )
    return {"event_loop": eventloop.event_loop_name(), "allocator": allocator}


def _crypto_ceiling_rate(min_time: float) -> float:
    """Handshake pairs per second if a pair cost only its secp256k1 operations: two
    ephemeral key generations, two ECDH, four signatures and four verifications, each
    one call into libsecp256k1 (through coincurve's cffi binding) with every input
    prepared beforehand."""
    ctx = GLOBAL_CONTEXT.ctx
    secrets_ = (os.urandom(32), os.urandom(32))
    publics = []
    for secret in secrets_:
        point = ffi.new("secp256k1_pubkey *")
        assert lib.secp256k1_ec_pubkey_create(ctx, point, secret)
        publics.append(point)
    digest = os.urandom(32)
    signature = ffi.new("secp256k1_ecdsa_signature *")
    ephemeral = ffi.new("secp256k1_pubkey *")
    shared = ffi.new("unsigned char [32]")
    null = ffi.NULL
    keygen, ecdh = lib.secp256k1_ec_pubkey_create, lib.secp256k1_ecdh
    sign, verify = lib.secp256k1_ecdsa_sign, lib.secp256k1_ecdsa_verify
    count = 0
    start = time.perf_counter()
    deadline = start + min_time
    while True:
        for side in (0, 1):  # each side: an ephemeral key and its ECDH
            secret = os.urandom(32)
            keygen(ctx, ephemeral, secret)
            ecdh(ctx, shared, publics[side], secret, null, null)
        for side in (0, 1, 0, 1):  # Init, Ack and the two Finished
            sign(ctx, signature, digest, secrets_[side], null, null)
            if not verify(ctx, signature, digest, publics[side]):
                raise AssertionError("the ceiling's own signature does not verify")
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def _handshake_rate(min_time: float) -> float:
    a = PrivateKey.generate(KeyKind.SECP256K1)
    b = PrivateKey.generate(KeyKind.SECP256K1)
    b_pub = b.public_key()
    count = 0
    start = time.perf_counter()
    deadline = start + min_time
    while True:
        initiator = BotdConnection(a, peer_key=b_pub)
        responder = BotdConnection(b)
        initiator.start(0.0)
        responder.start(0.0)
        responder.receive_data(initiator.data_to_send(), 0.0)
        initiator.receive_data(responder.data_to_send(), 0.0)
        responder.receive_data(initiator.data_to_send(), 0.0)
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            assert responder.established
            assert initiator.established
            return count / (now - start)


class _Loopback:
    """A BOTD server and a connected client, kept for all rounds of one metric."""

    def __init__(self) -> None:
        self.received = 0
        self.target = 0
        self.done = asyncio.Event()

    async def start(self) -> None:
        server_key = PrivateKey.generate(KeyKind.SECP256K1)

        async def count(channel: botd.Channel) -> None:
            async for data in channel:
                self.received += len(data)
                if self.received >= self.target:
                    self.done.set()

        self.server = await botd.serve(server_key, count, "127.0.0.1", 0)
        self.channel = await botd.connect(
            "127.0.0.1",
            self.server.port,
            PrivateKey.generate(KeyKind.SECP256K1),
            server_key.public_key(),
        )

    async def transfer(self, payload: bytes, total: int) -> float:
        """Send ``total`` bytes in ``payload``-sized messages; seconds until all arrived."""
        self.received, self.target = 0, total
        self.done.clear()
        start = time.perf_counter()
        for _ in range(total // len(payload)):
            await self.channel.send(payload)
        await self.done.wait()
        return time.perf_counter() - start

    async def stop(self) -> None:
        await self.channel.close()
        self.server.close()
        await self.server.wait_closed()


def _tls_contexts(workdir: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = workdir / "cert.pem", workdir / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(cert_file, key_file)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_verify_locations(cert_file)
    return server, client


class _StreamAnchor:
    """An anchor's sender and counting receiver on 127.0.0.1 (``start`` sets them up)."""

    server: asyncio.Server
    writer: asyncio.StreamWriter

    def __init__(self) -> None:
        self.received = 0
        self.target = 0
        self.done = asyncio.Event()

    async def transfer(self, payload: bytes, total: int) -> float:
        self.received, self.target = 0, total
        self.done.clear()
        start = time.perf_counter()
        for _ in range(total // len(payload)):
            self.writer.write(payload)
            await self.writer.drain()
        await self.done.wait()
        return time.perf_counter() - start

    async def stop(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()
        self.server.close()
        await self.server.wait_closed()


class _TlsLoopback(_StreamAnchor):
    """The anchor: stdlib asyncio TLS 1.3 streams on the same loopback."""

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.server_ctx, self.client_ctx = _tls_contexts(workdir)

    async def start(self) -> None:
        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(256 * 1024):
                self.received += len(chunk)
                if self.received >= self.target:
                    self.done.set()
            writer.close()

        self.server = await asyncio.start_server(
            count, "127.0.0.1", 0, ssl=self.server_ctx, limit=256 * 1024
        )
        port = self.server.sockets[0].getsockname()[1]
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=self.client_ctx, server_hostname="localhost"
        )


class _TcpLoopback(_StreamAnchor):
    """The bare-transport anchor: plain asyncio TCP on the same loopback, 64 KiB writes
    drained as the TLS anchor's, bytes counted by a Protocol."""

    async def start(self) -> None:
        outer = self

        class Count(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                outer.received += len(data)
                if outer.received >= outer.target:
                    outer.done.set()

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(Count, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)


class _AeadFloor:
    """The bulk floor: AES-256-GCM records behind a 4-byte length over asyncio TCP, sealed
    and written with nothing in between, opened where they lie in the receiver's kept
    buffer and counted (see bulk_floor_ratio)."""

    HIGH_WATER = 64 * 1024  # the sender yields once this much waits in the transport

    def __init__(self) -> None:
        self.received = 0
        self.target = 0
        self.done = asyncio.Event()
        self._key = AESGCM.generate_key(bit_length=256)
        self._counter = 0

    async def start(self) -> None:
        floor = self

        class Open(asyncio.BufferedProtocol):
            def __init__(self) -> None:
                self.aead = AESGCM(floor._key)
                self.buffer = bytearray(512 * 1024)  # room for a record and a full read
                self.end = 0
                self.counter = 0

            def get_buffer(self, sizehint: int) -> memoryview:
                return memoryview(self.buffer)[self.end :]

            def buffer_updated(self, nbytes: int) -> None:
                self.end += nbytes
                view, pos = memoryview(self.buffer), 0
                while self.end - pos >= 4:
                    size = int.from_bytes(view[pos : pos + 4], "big")
                    if self.end - pos - 4 < size:
                        break
                    record = view[pos + 4 : pos + 4 + size]
                    plaintext = self.aead.decrypt(_NONCE(self.counter), record, None)
                    self.counter += 1
                    floor.received += len(plaintext)
                    pos += 4 + size
                view[: self.end - pos] = view[pos : self.end]
                self.end -= pos
                if floor.received >= floor.target:
                    floor.done.set()

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(Open, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        self._aead = AESGCM(self._key)

    async def transfer(self, payload: bytes, total: int) -> float:
        self.received, self.target = 0, total
        self.done.clear()
        transport, seal = self.transport, self._aead.encrypt
        start = time.perf_counter()
        for _ in range(total // len(payload)):
            record = seal(_NONCE(self._counter), payload, None)
            self._counter += 1
            transport.writelines((len(record).to_bytes(4, "big"), record))
            if transport.get_write_buffer_size() > self.HIGH_WATER:
                await asyncio.sleep(0)  # let the receiver read
        await self.done.wait()
        return time.perf_counter() - start

    async def stop(self) -> None:
        self.transport.close()
        self.server.close()
        await self.server.wait_closed()


_NONCE = struct.Struct(">4xQ").pack


class _Side(Protocol):
    """One side of the bulk comparison."""

    async def start(self) -> None: ...
    async def transfer(self, payload: bytes, total: int) -> float: ...
    async def stop(self) -> None: ...


async def _throughput_64k(rounds: int, total: int) -> tuple[Comparison, Comparison, Comparison]:
    """BOTD MiB/s against TLS 1.3, bare TCP and the AEAD floor, in rounds alternating TLS,
    ours, TCP, floor."""
    payload = os.urandom(64 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        sides: tuple[_Side, ...] = (
            _TlsLoopback(Path(tmp)),
            _Loopback(),
            _TcpLoopback(),
            _AeadFloor(),
        )
        rates: tuple[list[float], ...] = ([], [], [], [])
        for side in sides:
            await side.start()
        try:
            for side in sides:  # warm up each
                await side.transfer(payload, 4 * MIB)
            for _ in range(rounds):
                for side, side_rates in zip(sides, rates, strict=True):
                    side_rates.append(total / MIB / await side.transfer(payload, total))
        finally:
            for side in sides:
                await side.stop()
    tls_rates, ours_rates, tcp_rates, floor_rates = rates
    return (
        Comparison.of(ours_rates, tls_rates),
        Comparison.of(ours_rates, tcp_rates),
        Comparison.of(ours_rates, floor_rates),
    )


async def _messages_1k(anchor: Callable[[], float], rounds: int, count: int) -> Comparison:
    payload = os.urandom(1024)
    ours = _Loopback()
    await ours.start()
    try:
        await ours.transfer(payload, 1024 * (count // 10))  # warm up
        ours_rates, anchor_rates = [], []
        for _ in range(rounds):
            anchor_rates.append(anchor())
            ours_rates.append(count / await ours.transfer(payload, 1024 * count))
    finally:
        await ours.stop()
    return Comparison.of(ours_rates, anchor_rates)


def _handshakes(
    anchor: Callable[[], float], rounds: int, round_time: float
) -> tuple[Comparison, Comparison]:
    """Our handshakes against the anchor's and against the crypto ceiling, in rounds
    alternating anchor, ours, ceiling."""
    ours, anchors, ceilings = [], [], []
    for _ in range(rounds):
        anchors.append(anchor())
        ours.append(_handshake_rate(round_time))
        ceilings.append(_crypto_ceiling_rate(round_time))
    return Comparison.of(ours, anchors), Comparison.of(ours, ceilings)


def run(quick: bool = False) -> list[Result]:
    """``quick``: two short rounds of each, for a smoke test; the figures are rough."""
    rounds = 2 if quick else ROUNDS
    round_time = 0.05 if quick else ROUND_TIME
    total = 4 * MIB if quick else BULK_TOTAL
    messages = 2000 if quick else MESSAGES_1K
    with PylnAnchor() as pyln:
        _handshake_rate(round_time)  # warm up every side before measuring
        _crypto_ceiling_rate(round_time)
        pyln.rate("handshakes", round_time)
        hs, ceiling = _handshakes(lambda: pyln.rate("handshakes", round_time), rounds, round_time)
        msgs = eventloop.run(
            _messages_1k(lambda: pyln.rate("messages_1k", round_time), rounds, messages)
        )
    tls, tcp, floor = eventloop.run(_throughput_64k(rounds, total))
    return [
        Result.of("handshakes_per_s", hs, "hs/s", "pyln-proto BOLT #8 handshake"),
        Result.of(
            "crypto_ceiling_ratio",
            ceiling,
            "hs/s",
            "secp256k1 ops alone (4 sign, 4 verify, 2 ECDH, 2 keygen)",
        ),
        Result.of("throughput_64k", tls, "MiB/s", "asyncio TLS 1.3 loopback"),
        Result.of("mib_per_s", tcp, "MiB/s", "asyncio TCP loopback, no crypto"),
        Result.of("bulk_floor_ratio", floor, "MiB/s", "AES-256-GCM records over asyncio TCP, bare"),
        Result.of("messages_1k_per_s", msgs, "msg/s", "pyln-proto BOLT #8 over TCP"),
    ]
