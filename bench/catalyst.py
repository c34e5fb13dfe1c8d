"""Catalyst: sessions per second to Established, against stdlib asyncio mTLS handshakes.

- sessions_per_s: sessions that reach Established (TLS 1.3 mTLS, OPEN both ways, first
  KEEPALIVE both ways) and then close, with 32 concurrent clients over loopback, key
  exchange X25519. Goal: ratio >= 0.8.
- resumed_sessions_per_s: the same with TLS session resumption (each client node keeps
  its ticket for the server and every measured session resumes). Goal: ratio >= 1.0.
- sessions_per_s_pq: sessions_per_s with X25519MLKEM768, our default. No goal (the
  stdlib ``ssl`` module's OpenSSL may not offer the hybrid group).

The anchor of all three is the same: full TLS 1.3 handshakes with client certificates
required, through ``asyncio.start_server`` / ``asyncio.open_connection`` and
``ssl.SSLContext`` (key exchange pinned to X25519), 32 concurrent clients; each
connection completes the handshake, the client waits for the server's close_notify (the
server accepted its certificate) and closes.

Both sides run in one process and on one event loop, use ECDSA P-256 certificates from
one CA, and have 32 clients with distinct certificates (a Catalyst node evicts an older
session to the same peer identifier). Contexts and nodes are built before the timing.
A round is a fixed count of sessions (CLIENTS x SESSIONS_PER_CLIENT) and includes the
server finishing its side; anchor and subject rounds alternate, and the ratio is the
median of per-round ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.harness import Comparison, Result, compare_rates
from trustmesh.catalyst.session import CatalystConfig
from trustmesh.io.catalyst import CatalystNode, CatalystServer, Session
from trustmesh.io.limits import ResourcePolicy
from trustmesh.tls import TlsConfig, hybrid_group_available
from trustmesh.tls.context import CLASSIC_GROUP, HYBRID_GROUP

HOST = "127.0.0.1"
SERVER_ID = "catalyst-bench-server"
SERVER_ASN = 65000
CLIENTS = 32
SESSIONS_PER_CLIENT = 8  # a round: CLIENTS x SESSIONS_PER_CLIENT sessions
ROUNDS = 5
ROUND_TIMEOUT = 60.0  # seconds; a round that takes longer is a failure, not a figure
ANCHOR_GROUP = "X25519"  # what the anchor's contexts are pinned to

# TLS NamedGroup code points (IANA), for reading the group out of a ServerHello.
GROUP_NAMES = {0x0017: "secp256r1", 0x0018: "secp384r1", 0x001D: "X25519", 0x11EC: HYBRID_GROUP}


# --- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    name: str
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Pki:
    """One CA (ECDSA P-256) and leaf certificates whose CN and DNS SAN are the names."""

    ca_file: Path
    server: Identity
    clients: tuple[Identity, ...]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(workdir: Path, clients: int = CLIENTS) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("catalyst bench CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = workdir / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_file, key_file = workdir / f"{name}.pem", workdir / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Identity(name, cert_file, key_file)

    return Pki(
        ca_file=ca_file,
        server=issue(SERVER_ID),
        clients=tuple(issue(f"catalyst-bench-client-{i:02d}") for i in range(clients)),
    )


# --- the subject: Catalyst sessions -------------------------------------------------------


class CatalystRig:
    """One Catalyst server node and one client node per client identity, each client
    dialling, waiting for Established and closing, ``per_client`` times a round."""

    def __init__(self, pki: Pki, *, post_quantum: bool, resume: bool) -> None:
        self.resume = resume

        def node(ident: Identity, asn: int) -> CatalystNode:
            tls = TlsConfig(ident.cert_file, ident.key_file, pki.ca_file, post_quantum=post_quantum)
            return CatalystNode(CatalystConfig(asn, ident.name), tls, resume=resume)

        self.server_node = node(pki.server, SERVER_ASN)
        self.client_nodes = [node(c, SERVER_ASN + 1 + i) for i, c in enumerate(pki.clients)]
        self.server: CatalystServer | None = None
        self.sessions = 0
        self.resumed = 0
        self.groups: Counter[str | None] = Counter()
        self._active = 0  # server-side sessions not yet closed
        self._idle = asyncio.Event()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def start(self) -> None:
        # Every client dials from 127.0.0.1 as fast as it can: lift the per-address caps
        # and handshake rate a listener puts on one source (docs/limits.md).
        self.server = await self.server_node.serve(
            self._serve, host=HOST, port=0, policy=ResourcePolicy.for_load(4096)
        )
        # One session per client: warms both sides up and, with resume, leaves a ticket.
        await self._run(1)
        if self.resume and self.resumed:
            raise RuntimeError("a first session claims to be resumed")

    async def round(self, per_client: int) -> float:
        """Sessions per second for ``per_client`` sessions from every client."""
        sessions, resumed = self.sessions, self.resumed
        start = time.perf_counter()
        await self._run(per_client)
        elapsed = time.perf_counter() - start
        count = self.sessions - sessions
        if self.resume and self.resumed - resumed != count:
            raise RuntimeError(f"only {self.resumed - resumed} of {count} sessions resumed")
        return count / elapsed

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _run(self, per_client: int) -> None:
        async with asyncio.timeout(ROUND_TIMEOUT):
            await asyncio.gather(*(self._client(node, per_client) for node in self.client_nodes))
            if self._active:  # the round includes the server's side of every session
                self._idle.clear()
                await self._idle.wait()

    async def _serve(self, session: Session) -> None:
        self._active += 1
        try:
            await session.wait_closed()  # what a server without a handler does
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _client(self, node: CatalystNode, count: int) -> None:
        port = self.port
        for _ in range(count):
            session = await node.connect(HOST, port)
            tls = session.tls
            assert tls is not None
            self.sessions += 1
            self.resumed += tls.resumed
            self.groups[tls.group] += 1
            await session.close()


# --- the anchor: stdlib asyncio mTLS handshakes -------------------------------------------


def anchor_contexts(pki: Pki) -> tuple[ssl.SSLContext, list[ssl.SSLContext]]:
    """The anchor's server context and one client context per client identity: TLS 1.3
    only, client certificates required, key exchange pinned to X25519."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(pki.server.cert_file, pki.server.key_file)
    server.load_verify_locations(pki.ca_file)
    server.verify_mode = ssl.CERT_REQUIRED
    server.set_ecdh_curve(ANCHOR_GROUP)
    clients = []
    for ident in pki.clients:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.minimum_version = ssl.TLSVersion.TLSv1_3
        client.load_cert_chain(ident.cert_file, ident.key_file)
        client.load_verify_locations(pki.ca_file)
        client.set_ecdh_curve(ANCHOR_GROUP)
        clients.append(client)
    return server, clients


def negotiated_group(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """The key exchange group these contexts settle on (Python 3.11's ``ssl`` cannot tell):
    run a handshake in memory and read the key_share extension of the ServerHello."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=SERVER_ID)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    with contextlib.suppress(ssl.SSLWantReadError):
        c.do_handshake()
    s_in.write(c_out.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        s.do_handshake()
    return _server_hello_group(s_out.read())


def _server_hello_group(flight: bytes) -> str:
    # TLS record header (5), handshake header (4), legacy_version (2), random (32).
    if len(flight) < 44 or flight[0] != 0x16 or flight[5] != 0x02:
        raise ValueError("not a ServerHello")
    pos = 5 + 4 + 2 + 32
    pos += 1 + flight[pos]  # legacy_session_id_echo
    pos += 2 + 1  # cipher_suite, legacy_compression_method
    end = pos + 2 + int.from_bytes(flight[pos : pos + 2], "big")
    pos += 2
    while pos + 4 <= end:
        kind = int.from_bytes(flight[pos : pos + 2], "big")
        size = int.from_bytes(flight[pos + 2 : pos + 4], "big")
        if kind == 0x0033:  # key_share: the server's group first
            group = int.from_bytes(flight[pos + 4 : pos + 6], "big")
            return GROUP_NAMES.get(group, f"0x{group:04x}")
        pos += 4 + size
    raise ValueError("the ServerHello has no key_share")


class AnchorRig:
    """An ``asyncio.start_server`` TLS server and one client context per client identity."""

    def __init__(self, pki: Pki) -> None:
        self.server_context, self.client_contexts = anchor_contexts(pki)
        self.group = negotiated_group(self.server_context, self.client_contexts[0])
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0
        self.versions: Counter[str | None] = Counter()
        self.client_certificates = 0  # connections whose server saw a client certificate
        self._active = 0
        self._idle = asyncio.Event()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accepted, HOST, 0, ssl=self.server_context)
        self.port = self.server.sockets[0].getsockname()[1]
        await self._run(1)

    async def round(self, per_client: int) -> float:
        """Handshakes per second for ``per_client`` connections from every client."""
        accepted = self.accepted
        start = time.perf_counter()
        await self._run(per_client)
        elapsed = time.perf_counter() - start
        return (self.accepted - accepted) / elapsed

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _run(self, per_client: int) -> None:
        async with asyncio.timeout(ROUND_TIMEOUT):
            await asyncio.gather(*(self._client(c, per_client) for c in self.client_contexts))
            if self._active:  # the round includes the server's side
                self._idle.clear()
                await self._idle.wait()

    async def _client(self, context: ssl.SSLContext, count: int) -> None:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(
                HOST, self.port, ssl=context, server_hostname=SERVER_ID
            )
            # The server's close_notify: it verified our certificate and is done.
            if await reader.read():
                raise RuntimeError("the anchor server sent data")
            writer.close()
            await writer.wait_closed()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        try:
            tls = writer.get_extra_info("ssl_object")
            assert isinstance(tls, ssl.SSLObject)
            self.accepted += 1
            self.versions[tls.version()] += 1
            if tls.getpeercert():
                self.client_certificates += 1
            writer.close()
            await writer.wait_closed()
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()


# --- the run ------------------------------------------------------------------------------


def _measure(
    runner: asyncio.Runner, subject: CatalystRig, anchor: AnchorRig, per_client: int, rounds: int
) -> Comparison:
    def call(coro: Callable[[], Coroutine[Any, Any, float]]) -> Callable[[], float]:
        return lambda: runner.run(coro())

    runner.run(subject.start())
    try:
        return compare_rates(
            call(lambda: subject.round(per_client)),
            call(lambda: anchor.round(per_client)),
            rounds=rounds,
        )
    finally:
        runner.run(subject.stop())


def _expect_group(rig: CatalystRig, group: str) -> None:
    if set(rig.groups) != {group}:
        raise RuntimeError(f"expected every session on {group}, got {dict(rig.groups)}")


def run(
    per_client: int = SESSIONS_PER_CLIENT, rounds: int = ROUNDS, clients: int = CLIENTS
) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp, asyncio.Runner() as runner:
        pki = make_pki(Path(tmp), clients)

        async def build() -> tuple[AnchorRig, CatalystRig, CatalystRig, CatalystRig | None]:
            # Nodes build their TLS contexts in their constructors: all before timing.
            return (
                AnchorRig(pki),
                CatalystRig(pki, post_quantum=False, resume=False),
                CatalystRig(pki, post_quantum=False, resume=True),
                CatalystRig(pki, post_quantum=True, resume=False)
                if hybrid_group_available()
                else None,
            )

        anchor, full, resumed, pq = runner.run(build())
        runner.run(anchor.start())
        try:
            full_rate = _measure(runner, full, anchor, per_client, rounds)
            res_rate = _measure(runner, resumed, anchor, per_client, rounds)
            pq_rate = None if pq is None else _measure(runner, pq, anchor, per_client, rounds)
        finally:
            runner.run(anchor.stop())
        _expect_group(full, CLASSIC_GROUP)
        _expect_group(resumed, CLASSIC_GROUP)
        if anchor.versions.keys() != {"TLSv1.3"} or anchor.client_certificates != anchor.accepted:
            raise RuntimeError("the anchor did not run TLS 1.3 with client certificates")
        label = f"asyncio ssl TLS 1.3 mTLS handshakes ({anchor.group}, {clients} clients)"
        results = [
            Result.of("sessions_per_s", full_rate, "sess/s", label),
            Result.of("resumed_sessions_per_s", res_rate, "sess/s", label),
        ]
        if pq is not None and pq_rate is not None:
            _expect_group(pq, HYBRID_GROUP)
            results.append(Result.of("sessions_per_s_pq", pq_rate, "sess/s", label))
        return results
