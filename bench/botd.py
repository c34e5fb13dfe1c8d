"""BOTD #2: handshakes, bulk throughput and small-message rate, each against an anchor.

- handshakes_per_s: full in-memory handshakes (Init, Ack, Finished, both sides), against
  pyln-proto's BOLT #8 handshake in its own venv. Goal: ratio >= 1.5.
- throughput_64k: bulk MiB/s over loopback TCP in 64 KiB messages, against stdlib
  asyncio TLS 1.3 on the same loopback with 64 KiB writes. Goal: ratio >= 1.0.
- messages_1k_per_s: 1 KiB messages per second over loopback, against pyln-proto's
  BOLT #8 transport. Goal: ratio >= 2.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.anchors import PylnAnchor
from bench.harness import Result, compare_rates
from trustmesh.botd import BotdConnection
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.io import botd

MIB = 1024 * 1024
ROUND_TIME = 0.4  # seconds per measurement round
ROUNDS = 7


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


class _TlsLoopback:
    """The anchor: stdlib asyncio TLS 1.3 streams on the same loopback."""

    def __init__(self, workdir: Path) -> None:
        self.server_ctx, self.client_ctx = _tls_contexts(workdir)
        self.received = 0
        self.target = 0
        self.done = asyncio.Event()

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


async def _throughput_64k() -> tuple[float, float]:
    payload = os.urandom(64 * 1024)
    total = 64 * MIB
    with tempfile.TemporaryDirectory() as tmp:
        ours, tls = _Loopback(), _TlsLoopback(Path(tmp))
        await ours.start()
        await tls.start()
        try:
            await ours.transfer(payload, 4 * MIB)  # warm up both
            await tls.transfer(payload, 4 * MIB)
            ours_rates, tls_rates = [], []
            for _ in range(ROUNDS):
                tls_rates.append(total / MIB / await tls.transfer(payload, total))
                ours_rates.append(total / MIB / await ours.transfer(payload, total))
        finally:
            await ours.stop()
            await tls.stop()
    return statistics.median(ours_rates), statistics.median(tls_rates)


async def _messages_1k(anchor: Callable[[], float]) -> tuple[float, float]:
    payload = os.urandom(1024)
    count = 20000
    ours = _Loopback()
    await ours.start()
    try:
        await ours.transfer(payload, 1024 * 2000)  # warm up
        ours_rates, anchor_rates = [], []
        for _ in range(ROUNDS):
            anchor_rates.append(anchor())
            ours_rates.append(count / await ours.transfer(payload, 1024 * count))
    finally:
        await ours.stop()
    return statistics.median(ours_rates), statistics.median(anchor_rates)


def run() -> list[Result]:
    with PylnAnchor() as pyln:
        _handshake_rate(ROUND_TIME)  # warm up both sides before measuring
        pyln.rate("handshakes", ROUND_TIME)
        hs, hs_anchor = compare_rates(
            lambda: _handshake_rate(ROUND_TIME),
            lambda: pyln.rate("handshakes", ROUND_TIME),
            rounds=ROUNDS,
        )
        msgs, msgs_anchor = asyncio.run(_messages_1k(lambda: pyln.rate("messages_1k", ROUND_TIME)))
    tput, tput_anchor = asyncio.run(_throughput_64k())
    return [
        Result("handshakes_per_s", hs, "hs/s", "pyln-proto BOLT #8 handshake", hs_anchor),
        Result("throughput_64k", tput, "MiB/s", "asyncio TLS 1.3 loopback", tput_anchor),
        Result("messages_1k_per_s", msgs, "msg/s", "pyln-proto BOLT #8 over TCP", msgs_anchor),
    ]
