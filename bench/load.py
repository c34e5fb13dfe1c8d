"""Load and abuse: how many authenticated sessions one server holds, what each costs it,
and how an honest client fares while another address floods the server.

- sessions_held_botd, sessions_held_catalyst, sessions_held_mesh, sessions_held_brc103:
  authenticated sessions one server holds at once, counted on the server's side once the
  clients have opened them all (BOTD #2 channels past the handshake; Catalyst sessions in
  Established; mesh links in the node's link table, both HELLOs exchanged; BRC-103
  WebSocket connections whose server-side peer took a signed general message, so its
  session is authenticated). Anchor: the sessions attempted. Goal: >= 1,000 each.
- kib_per_session_botd, ..._catalyst, ..._mesh, ..._brc103: the growth of the server
  process's resident set (``VmRSS``) from before the sessions to while it holds them,
  over the sessions held. Anchor: the same figure for a stdlib ``asyncio`` TLS 1.3
  server (``ssl``, client certificates required) that holds as many idle connections.
  Lower is better. No goal. The note also gives the floor, a bare asyncio TCP
  connection (``start_server`` without TLS), measured the same way.
- flood_latency_ratio: an honest BOTD #2 client's p99 handshake latency (TCP connect to
  established, from 127.0.0.2, 15 a second) while another address (127.0.0.1) holds
  ``idle`` slots of idle TCP connections (each slot reconnects as soon as the server drops
  it; every slot is tried) and runs a BOTD handshake flood from 64 tasks. Anchor: the same
  client's p99 against the same server without the attack. Unloaded and attacked rounds
  alternate (4 of each, a new attacker process each time), so that the machine's own
  noise hits both alike. The server runs the default :class:`ResourcePolicy`, whose
  per-source caps are what protects the honest client. Goal: ratio <= 5. About 20 s.

The flood runs first, then the anchors, then the four session stages (which leave
thousands of loopback sockets in TIME_WAIT behind them).

Processes: every server runs in a process of its own (forked from a ``forkserver`` that
has imported this module), so that its resident set holds the server's side alone; the
clients and the honest client run in the bench's own process, the attacker in another
one. The servers that hold sessions run ``ResourcePolicy.for_load`` (the mesh node as its
``[limits]`` config when it has them, and its clients come from 32 loopback addresses in
any case, which fits the default per-source caps).

File descriptors: each process raises its ``RLIMIT_NOFILE`` soft limit to the hard limit
and checks that it covers what it needs: ``sessions + 256`` in the bench's process and in
each server, ``idle + 256`` in the attacker (1,256 and 5,256 at the defaults).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import importlib
import logging
import multiprocessing
import resource
import socket
import statistics
import struct
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.catalyst import SERVER_ASN, SERVER_ID, Pki, anchor_contexts, make_pki
from bench.harness import Result
from trustmesh.api.ca_client import make_csr
from trustmesh.brc103.peer import PeerConfig
from trustmesh.brc103.wallet import Wallet
from trustmesh.catalyst.errors import PeeringFailed
from trustmesh.catalyst.session import CatalystConfig
from trustmesh.crypto.keys import KeyKind, PrivateKey, PublicKey
from trustmesh.io import botd, brc103_ws
from trustmesh.io.brc103 import AsyncPeer
from trustmesh.io.catalyst import CatalystNode, CatalystServer, Session
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.stream import StreamDriver
from trustmesh.keystore.filestore import save_key_file
from trustmesh.mesh.link import ALPN, LinkConfig, MeshLink, split_address
from trustmesh.mesh.trust import TrustView
from trustmesh.node.config import NodeConfig
from trustmesh.node.links import Link
from trustmesh.node.local import LocalMesh
from trustmesh.tls import TlsConfig, TlsContext, TlsStream

HOST = "127.0.0.1"  # every server listens here; the attacker connects from here too
HONEST = "127.0.0.2"  # the honest client of the flood figure binds this
SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 34))  # mesh clients: 32 addresses
PEM = serialization.Encoding.PEM

SESSIONS = 1000
IDLE = 5000
SAMPLES = 120  # honest handshakes, unloaded and under attack
QUICK_SESSIONS = 50
QUICK_IDLE = 500
QUICK_SAMPLES = 30
FLOOD_ROUNDS = 4
QUICK_FLOOD_ROUNDS = 2

WARMUP = 16  # sessions opened and closed before the baseline resident set is read
FD_MARGIN = 256  # descriptors beyond the sessions (listeners, pipes, files, libraries)
CONCURRENCY = 64  # sessions being opened at once
OPEN_TIMEOUT = 30.0  # one session
CLOSE_TIMEOUT = 30.0  # all sessions of a stage
SETTLE_TIMEOUT = 15.0  # the server's count catching up with the clients'
SETTLE_POLL = 0.02
STAGE_TIMEOUT = 300.0  # one stage, start to stop
WORKER_TIMEOUT = 120.0  # a worker's answer to one command

HONEST_RATE = 15.0  # handshakes per second: under the default 20/s per source
HONEST_TIMEOUT = 10.0  # a failed honest handshake counts as this long
SETTLE_AFTER_ATTACK = 0.5  # seconds between an attack round and the next quiet round
ATTACK_CONNECTS = 256  # the attacker's TCP connects in flight
ATTACK_FLOOD = 64  # the attacker's concurrent BOTD handshakes
ATTACK_CONNECT_TIMEOUT = 3.0
ATTACK_LIMIT = 60.0  # the attacker stops by itself after this many seconds

ANCHOR_KIB = "stdlib asyncio TLS 1.3 mTLS server (ssl), KiB per idle connection, same count"


class BenchFailure(RuntimeError):
    """A measurement that did not do the work the benchmark asked for."""


@dataclass(frozen=True)
class NotedResult(Result):
    """A :class:`Result` with a note on how it was measured (printed as ``note``)."""

    note: str = ""


@dataclass(frozen=True)
class Size:
    sessions: int
    idle: int
    samples: int  # honest handshakes each way, over all rounds
    rounds: int  # unloaded and attacked rounds of the flood figure, alternating

    @classmethod
    def full(cls) -> Size:
        return cls(SESSIONS, IDLE, SAMPLES, FLOOD_ROUNDS)

    @classmethod
    def quick(cls) -> Size:
        return cls(QUICK_SESSIONS, QUICK_IDLE, QUICK_SAMPLES, QUICK_FLOOD_ROUNDS)


# --- process helpers ------------------------------------------------------------------------


def rss_kib() -> int:
    """This process's resident set in KiB (``VmRSS``; the peak where /proc is missing)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def raise_nofile(needed: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; fail if that is below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        raise BenchFailure(
            f"this run needs {needed} file descriptors per process; the hard limit is {hard}"
        )
    return target


def p99(samples: Iterable[float]) -> float:
    data = sorted(samples)
    if len(data) < 2:
        return data[0]
    return statistics.quantiles(data, n=100, method="inclusive")[98]


def _context() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _worker_setup(descriptors: int) -> None:
    # The limits the servers hit are counted; their warnings would only fill stderr.
    logging.getLogger().setLevel(logging.ERROR)
    raise_nofile(descriptors)


def _report_failure(conn: Connection) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(("error", traceback.format_exc()))


async def _command(conn: Connection, within: float = STAGE_TIMEOUT) -> tuple[Any, ...]:
    if not await asyncio.to_thread(conn.poll, within):
        raise BenchFailure(f"no command from the bench within {within:g} s")
    message: tuple[Any, ...] = conn.recv()
    return message


class Worker:
    """A child process and its end of a pipe; it answers commands with tuples whose
    first item names the answer (or ``("error", traceback)``)."""

    def __init__(self, name: str, target: Callable[..., None], *args: object) -> None:
        context = _context()
        self.name = name
        self.conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(*args, child), daemon=True)
        self.process.start()
        child.close()

    async def receive(self, expect: str, within: float = WORKER_TIMEOUT) -> tuple[Any, ...]:
        if not await asyncio.to_thread(self.conn.poll, within):
            raise BenchFailure(f"{self.name}: no {expect!r} within {within:g} s")
        try:
            message: tuple[Any, ...] = self.conn.recv()
        except EOFError:
            self.process.join(1.0)
            raise BenchFailure(f"{self.name} exited ({self.process.exitcode})") from None
        if message[0] == "error":
            raise BenchFailure(f"{self.name} failed:\n{message[1]}")
        if message[0] != expect:
            raise BenchFailure(f"{self.name} answered {message[0]!r}, not {expect!r}")
        return message

    async def ask(self, *command: object, expect: str) -> tuple[Any, ...]:
        self.conn.send(command)
        return await self.receive(expect)

    def close(self) -> None:
        self.conn.close()
        self.process.join(10.0)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5.0)


# --- servers (each in a worker process) -------------------------------------------------------


def _load_policy(sessions: int) -> ResourcePolicy:
    return ResourcePolicy.for_load(sessions + WARMUP + FD_MARGIN)


class Server:
    """One server in a worker: ``start`` says what clients need, ``held`` counts the
    authenticated sessions it holds now, ``stop`` ends it and says what it saw."""

    def __init__(self, sessions: int, workdir: Path, extra: Any) -> None:
        self.sessions = sessions
        self.workdir = workdir
        self.extra = extra
        self.count = 0

    async def start(self) -> dict[str, Any]:
        raise NotImplementedError

    def held(self) -> int:
        return self.count

    async def stop(self) -> dict[str, Any]:
        return {}

    async def hold(self, until_closed: Awaitable[object]) -> None:
        """Count one session while ``until_closed`` runs."""
        self.count += 1
        try:
            await until_closed
        finally:
            self.count -= 1


class AnchorServer(Server):
    """``asyncio.start_server`` with the stdlib ``ssl`` module, client certificates
    required (or without TLS when ``extra`` is None): each connection's handler waits
    for the client's EOF."""

    async def start(self) -> dict[str, Any]:
        context = anchor_contexts(self.extra)[0] if self.extra is not None else None
        self.server = await asyncio.start_server(
            self._connected, HOST, 0, ssl=context, backlog=self.sessions + WARMUP
        )
        return {"port": self.server.sockets[0].getsockname()[1]}

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.hold(_read_to_eof(reader))
        finally:
            writer.transport.abort()  # the client has gone: no goodbye to wait for

    async def stop(self) -> dict[str, Any]:
        self.server.close()
        await self.server.wait_closed()
        return {}


async def _read_to_eof(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError):
        while await reader.read(4096):
            pass


class BotdServer(Server):
    """``trustmesh.io.botd.serve`` under ``ResourcePolicy.for_load`` (or the default
    policy for the flood); its handler holds each channel until the peer closes it."""

    policy: ResourcePolicy | None = None

    async def start(self) -> dict[str, Any]:
        self.key = PrivateKey.generate(KeyKind.SECP256K1)
        policy = self.policy or _load_policy(self.sessions)
        self.server = await botd.serve(self.key, self._channel, HOST, 0, policy=policy)
        return {"port": self.server.port, "key": self.key.public_key().to_bytes()}

    async def _channel(self, channel: botd.Channel) -> None:
        await self.hold(_until_peer_closes(channel))

    async def stop(self) -> dict[str, Any]:
        stats = self.server.listener.stats.snapshot()
        self.server.close()
        await self.server.wait_closed()
        return {"limits": stats}


async def _until_peer_closes(channel: botd.Channel) -> None:
    """Take messages until the peer's Close (the handler's return answers it)."""
    async for _ in channel:
        pass


class FloodServer(BotdServer):
    policy = ResourcePolicy()  # the defaults: per-source caps protect the honest client


class CatalystLoadServer(Server):
    """A :class:`CatalystNode` serving under ``ResourcePolicy.for_load``; each session
    counts from Established until it closes."""

    async def start(self) -> dict[str, Any]:
        pki: Pki = self.extra
        tls = TlsConfig(pki.server.cert_file, pki.server.key_file, pki.ca_file)
        self.node = CatalystNode(CatalystConfig(SERVER_ASN, SERVER_ID), tls, resume=False)
        self.server: CatalystServer = await self.node.serve(
            self._session, HOST, 0, policy=_load_policy(self.sessions)
        )
        groups = self.node.server_context.groups
        return {"port": self.server.port, "group": groups[0]}

    async def _session(self, session: Session) -> None:
        try:
            await session.wait_established()
        except PeeringFailed:
            return
        await self.hold(session.wait_closed())

    async def stop(self) -> dict[str, Any]:
        self.server.close()
        await self.server.wait_closed()
        return {}


def mesh_limits(cap: int) -> dict[str, float]:
    """``ResourcePolicy.for_load(cap)`` as a node's ``[limits]`` (the values it changes)."""
    load, default = ResourcePolicy.for_load(cap), ResourcePolicy()
    return {
        f.name: getattr(load, f.name)
        for f in dataclasses.fields(ResourcePolicy)
        if getattr(load, f.name) != getattr(default, f.name)
    }


def _node_has_limits() -> bool:
    return "limits" in {f.name for f in dataclasses.fields(NodeConfig)}


class MeshServer(Server):
    """Node-1 of a one-node :class:`LocalMesh` (its CA served over HTTPS in the same
    process), ``max_links`` raised to hold every client; the clients' certificates are
    issued by its CA before the bench starts counting."""

    async def start(self) -> dict[str, Any]:
        cap = min(1024, self.sessions + WARMUP)
        settings: dict[str, Any] = {"max_links": cap}
        if _node_has_limits():
            settings["limits"] = mesh_limits(self.sessions + WARMUP + FD_MARGIN)
        self.mesh = LocalMesh(self.workdir / "mesh", 1, node_settings=settings)
        await self.mesh.start()
        self.node = self.mesh.nodes[0]
        clients = self.workdir / "mesh-clients"
        clients.mkdir()
        await asyncio.to_thread(self._issue, clients, self.sessions + WARMUP)
        _, port = split_address(self.node.listen_address)
        return {
            "port": port,
            "clients": str(clients),
            "ca": str(self.mesh.ca_dir),
            "node_id": self.node.node_id,
            "max_links": cap,
            "limits": "limits" in settings,
        }

    def _issue(self, directory: Path, count: int) -> None:
        ca = self.mesh.ca
        assert ca is not None
        issuing = ca.issuing_cert.public_bytes(PEM)
        for index in range(count):
            node_id = mesh_client_id(index)
            key = PrivateKey.generate(KeyKind.P256)
            csr = x509.load_pem_x509_csr(make_csr(key, node_id).encode())
            cert, _ = ca.sign(csr, node_id)
            (directory / f"{node_id}.crt").write_bytes(cert.public_bytes(PEM) + issuing)
            save_key_file(key, directory / f"{node_id}.key", None)

    def held(self) -> int:
        return len(self.node.links)

    async def stop(self) -> dict[str, Any]:
        await self.mesh.stop()
        return {}


def mesh_client_id(index: int) -> str:
    return f"load-{index:04d}"


class Brc103Server(Server):
    """``trustmesh.io.brc103_ws.websocket_handler`` in an aiohttp app, served by
    ``trustmesh.io.https.serve_app`` (plain HTTP, ``ResourcePolicy.for_load``) where the
    library has it, else by aiohttp's ``TCPSite``. A connection counts once its peer took
    a general message (its session is authenticated) and until it closes."""

    async def start(self) -> dict[str, Any]:
        self.wallet = Wallet.generate()
        app = web.Application()
        app.router.add_get("/ws", brc103_ws.websocket_handler(self.wallet, self._peer))
        https = importlib.import_module("trustmesh.io.https")
        serve_app = getattr(https, "serve_app", None)
        if serve_app is not None:
            server = await serve_app(
                app,
                HOST,
                0,
                context=None,
                policy=_load_policy(self.sessions),
                name="brc103 websocket",
            )
            self._stop: Callable[[], Awaitable[None]] = server.stop
            port, site = int(server.port), "trustmesh.io.https.serve_app, for_load policy"
        else:
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            tcp = web.TCPSite(runner, HOST, 0, backlog=self.sessions + WARMUP)
            await tcp.start()
            self._stop = runner.cleanup
            port, site = int(runner.addresses[0][1]), "aiohttp TCPSite"
        return {"url": f"http://{HOST}:{port}/ws", "site": site}

    async def _peer(self, peer: AsyncPeer) -> None:
        await peer.receive()  # a general message: the session is authenticated
        await self.hold(asyncio.Event().wait())  # cancelled when the client goes

    async def stop(self) -> dict[str, Any]:
        await self._stop()
        return {}


SERVERS: dict[str, type[Server]] = {
    "anchor": AnchorServer,
    "botd": BotdServer,
    "catalyst": CatalystLoadServer,
    "mesh": MeshServer,
    "brc103": Brc103Server,
    "flood": FloodServer,
}


def serve_main(kind: str, sessions: int, workdir: str, extra: Any, conn: Connection) -> None:
    """A worker process: run one server and answer the bench's commands."""
    try:
        _worker_setup(sessions + FD_MARGIN)
        asyncio.run(_serve(SERVERS[kind](sessions, Path(workdir), extra), conn))
    except BaseException:
        _report_failure(conn)
    finally:
        conn.close()


async def _serve(server: Server, conn: Connection) -> None:
    conn.send(("ready", await server.start()))
    while True:
        command = await _command(conn)
        if command[0] == "rss":  # wait for the expected count, then read the resident set
            expected = int(command[1])
            for _ in range(int(SETTLE_TIMEOUT / SETTLE_POLL)):
                if server.held() == expected:
                    break
                await asyncio.sleep(SETTLE_POLL)
            gc.collect()
            conn.send(("rss", server.held(), rss_kib()))
        elif command[0] == "stop":
            conn.send(("stopped", await server.stop()))
            return
        else:
            raise BenchFailure(f"unknown command {command!r}")


# --- clients (in the bench's process) ---------------------------------------------------------

Closer = Callable[[], Awaitable[object]]


class Clients:
    """Opens sessions to one server; ``open(index)`` returns once the session is
    authenticated, with the coroutine function that closes it."""

    concurrency = CONCURRENCY

    def __init__(self, info: dict[str, Any], workdir: Path, extra: Any) -> None:
        self.info = info
        self.workdir = workdir
        self.extra = extra

    async def open(self, index: int) -> Closer:
        raise NotImplementedError

    async def teardown(self) -> None:
        return None

    def describe(self) -> str:
        return ""


class AnchorClients(Clients):
    def __init__(self, info: dict[str, Any], workdir: Path, extra: Any) -> None:
        super().__init__(info, workdir, extra)
        self.context = anchor_contexts(extra)[1][0] if extra is not None else None

    async def open(self, index: int) -> Closer:
        _, writer = await asyncio.open_connection(
            HOST,
            self.info["port"],
            ssl=self.context,
            server_hostname=SERVER_ID if self.context is not None else None,
        )

        async def close() -> None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

        return close


class BotdClients(Clients):
    concurrency = 128

    async def open(self, index: int) -> Closer:
        peer = PublicKey.from_bytes(KeyKind.SECP256K1, self.info["key"])
        key = PrivateKey.generate(KeyKind.SECP256K1)
        channel = await botd.connect(HOST, self.info["port"], key, peer)
        return channel.close


class CatalystClients(Clients):
    """One client node per certificate (a server evicts an older session to the same
    BGP identifier); resumption off, so every session is a full handshake."""

    def __init__(self, info: dict[str, Any], workdir: Path, extra: Any) -> None:
        super().__init__(info, workdir, extra)
        pki: Pki = extra
        self.nodes = [
            CatalystNode(
                CatalystConfig(SERVER_ASN + 1 + i, ident.name),
                TlsConfig(ident.cert_file, ident.key_file, pki.ca_file),
                resume=False,
            )
            for i, ident in enumerate(pki.clients)
        ]

    async def open(self, index: int) -> Closer:
        session = await self.nodes[index].connect(HOST, self.info["port"])
        return session.close

    def describe(self) -> str:
        return f"TLS 1.3 mTLS, {self.info['group']}"


class MeshClients(Clients):
    """Raw links: a TLS 1.3 stream (ALPN dadm-mesh/1) running a :class:`MeshLink` per
    client certificate, from 32 loopback addresses, each held by a node-side
    :class:`Link` that answers keepalives."""

    def __init__(self, info: dict[str, Any], workdir: Path, extra: Any) -> None:
        super().__init__(info, workdir, extra)
        ca = Path(info["ca"])
        root = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
        issuing = x509.load_pem_x509_certificate((ca / "issuing.crt").read_bytes())
        self.trust = TrustView([root], [issuing])
        self.ca_file = ca / "ca.crt"
        self.clients = Path(info["clients"])

    def _authorize(self, chain: Any) -> str:
        return self.trust.identity_of(chain, now_ms=time.time_ns() // 1_000_000).node_id

    async def open(self, index: int) -> Closer:
        node_id = mesh_client_id(index)
        tls = TlsConfig(
            self.clients / f"{node_id}.crt",
            self.clients / f"{node_id}.key",
            self.ca_file,
            alpn=(ALPN,),
        )
        core = MeshLink(LinkConfig(node_id), initiator=True, authorize=self._authorize)
        stream = TlsStream(TlsContext(tls, server=False), core)
        core.bind(stream)
        holder: list[Link] = []

        def protocol() -> StreamDriver[TlsStream]:
            driver = StreamDriver(stream)
            holder.append(Link(driver, core, address=None, on_event=_ignore_link_event))
            return driver

        source = SOURCES[index % len(SOURCES)]
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(protocol, HOST, self.info["port"], local_addr=(source, 0))
            up = await holder[0].wait_up()
        except BaseException:
            if holder:
                holder[0].abort("the link did not come up")
                await holder[0].wait_closed()
            raise
        if up.peer_id != self.info["node_id"]:
            raise BenchFailure(f"linked to {up.peer_id}, not {self.info['node_id']}")
        link = holder[0]

        async def close() -> None:
            link.close()
            await link.wait_closed()

        return close

    def describe(self) -> str:
        if self.info["limits"]:
            policy = "the node's [limits] set to ResourcePolicy.for_load"
        else:
            policy = "the node's default ResourcePolicy (it has no [limits])"
        return (
            f"max_links {self.info['max_links']}, {policy}, clients from {len(SOURCES)} addresses"
        )


def _ignore_link_event(link: Link, event: object) -> None:
    return None


class Brc103Clients(Clients):
    """One aiohttp WebSocket per client, each with its own wallet; a session counts once
    its first general message went out (the handshake before it)."""

    def __init__(self, info: dict[str, Any], workdir: Path, extra: Any) -> None:
        super().__init__(info, workdir, extra)
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def open(self, index: int) -> Closer:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()

        async def hold() -> None:
            wallet = Wallet.generate()
            async with brc103_ws.connect(
                self.info["url"], wallet, PeerConfig(), session=self.http
            ) as peer:
                await peer.send_general(b"load")
                ready.set_result(None)
                await done.wait()

        task = asyncio.create_task(hold())
        try:
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (a timeout): the client goes too
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        if not ready.done():
            await task  # raises why it ended
            raise BenchFailure("the WebSocket client ended before its session")

        async def close() -> None:
            done.set()
            await task

        return close

    async def teardown(self) -> None:
        await self.http.close()

    def describe(self) -> str:
        return str(self.info["site"])


CLIENTS: dict[str, type[Clients]] = {
    "anchor": AnchorClients,
    "botd": BotdClients,
    "catalyst": CatalystClients,
    "mesh": MeshClients,
    "brc103": Brc103Clients,
}


async def open_many(clients: Clients, indices: Iterable[int]) -> tuple[list[Closer], list[str]]:
    """Open a session for every index, ``clients.concurrency`` at a time; return the
    closers of those that opened and why the others did not."""
    gate = asyncio.Semaphore(clients.concurrency)

    async def one(index: int) -> Closer:
        async with gate, asyncio.timeout(OPEN_TIMEOUT):
            return await clients.open(index)

    results = await asyncio.gather(*(one(i) for i in indices), return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return opened, errors


async def close_all(closers: list[Closer]) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await asyncio.gather(*(close() for close in closers), return_exceptions=True)


@dataclass(frozen=True)
class Held:
    """One stage: sessions attempted and held, and the server's resident set."""

    kind: str
    attempted: int
    opened: int
    held: int
    rss_before: int  # KiB
    rss_after: int
    errors: tuple[str, ...]
    how: str

    @property
    def kib_per_session(self) -> float:
        return (self.rss_after - self.rss_before) / self.held if self.held else float("nan")


async def hold_sessions(kind: str, sessions: int, workdir: Path, extra: Any = None) -> Held:
    """Start ``kind``'s server in a worker, open ``WARMUP`` sessions and close them, read
    the server's resident set, open ``sessions`` and read it again while they are held."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    worker = Worker(f"the {kind} server", serve_main, kind, sessions, str(workdir), extra)
    clients: Clients | None = None
    try:
        async with asyncio.timeout(STAGE_TIMEOUT):
            (_, info) = await worker.receive("ready")
            clients = CLIENTS[kind](info, workdir, extra)
            warm, warm_errors = await open_many(clients, range(sessions, sessions + WARMUP))
            if warm_errors:
                raise BenchFailure(f"{kind}: warm-up sessions failed: {warm_errors[0]}")
            await close_all(warm)
            _, _, before = await worker.ask("rss", 0, expect="rss")
            opened, errors = await open_many(clients, range(sessions))
            _, held, after = await worker.ask("rss", len(opened), expect="rss")
            await close_all(opened)
            await worker.ask("stop", expect="stopped")
            return Held(
                kind,
                sessions,
                len(opened),
                int(held),
                int(before),
                int(after),
                tuple(errors),
                clients.describe(),
            )
    finally:
        if clients is not None:
            await clients.teardown()
        worker.close()


# --- the flood --------------------------------------------------------------------------------


async def honest_handshakes(
    port: int, peer: PublicKey, key: PrivateKey, count: int
) -> tuple[list[float], int]:
    """``count`` handshakes from 127.0.0.2, ``HONEST_RATE`` a second, one at a time;
    their latencies in seconds (a failed one counts as ``HONEST_TIMEOUT``) and the
    number that failed."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures = 0
    next_at = loop.time()
    for _ in range(count):
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        next_at = max(next_at + 1 / HONEST_RATE, loop.time())
        start = time.perf_counter()
        try:
            async with asyncio.timeout(HONEST_TIMEOUT):
                channel = await botd.connect(HOST, port, key, peer, local_addr=(HONEST, 0))
        except Exception:
            failures += 1
            latencies.append(HONEST_TIMEOUT)
            continue
        latencies.append(time.perf_counter() - start)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await channel.close()
    return latencies, failures


def attack_main(port: int, peer: bytes, idle: int, conn: Connection) -> None:
    """The attacker's process: idle connection slots and a handshake flood, from
    127.0.0.1, until the bench says stop (or ``ATTACK_LIMIT`` passes)."""
    try:
        _worker_setup(idle + FD_MARGIN)
        asyncio.run(_attack(port, PublicKey.from_bytes(KeyKind.SECP256K1, peer), idle, conn))
    except BaseException:
        _report_failure(conn)
    finally:
        conn.close()


async def _attack(port: int, peer: PublicKey, idle: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    stats: Counter[str] = Counter()
    stop = asyncio.Event()
    connects = asyncio.Semaphore(ATTACK_CONNECTS)
    tried = asyncio.Event()  # every idle slot has made its first attempt

    async def idle_slot() -> None:
        first = True
        while not stop.is_set():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                async with connects:
                    stats["idle_attempts"] += 1
                    try:
                        async with asyncio.timeout(ATTACK_CONNECT_TIMEOUT):
                            await loop.sock_connect(sock, (HOST, port))
                    finally:
                        if first:
                            first = False
                            stats["idle_slots_tried"] += 1
                            if stats["idle_slots_tried"] == idle:
                                tried.set()
            except (OSError, TimeoutError) as exc:
                stats["idle_connect_failed"] += 1
                stats[f"idle_connect_failed.{_error_name(exc)}"] += 1
                _reset(sock)
                continue
            stats["idle_connected"] += 1
            try:  # idle: send nothing, and wait for the server to drop us
                await loop.sock_recv(sock, 1)
                stats["idle_closed"] += 1  # an orderly close (FIN)
            except OSError:
                stats["idle_reset"] += 1  # refused at accept, or dropped at a limit
            finally:
                _reset(sock)

    async def flood() -> None:
        key = PrivateKey.generate(KeyKind.SECP256K1)
        while not stop.is_set():
            stats["flood_attempts"] += 1
            try:
                async with asyncio.timeout(ATTACK_CONNECT_TIMEOUT):
                    channel = await botd.connect(HOST, port, key, peer)
            except Exception:
                stats["flood_refused"] += 1
                continue
            stats["flood_handshakes"] += 1
            with contextlib.suppress(Exception):
                async with asyncio.timeout(ATTACK_CONNECT_TIMEOUT):
                    await channel.close()

    started = time.monotonic()
    tasks = [loop.create_task(idle_slot()) for _ in range(idle)]
    tasks += [loop.create_task(flood()) for _ in range(ATTACK_FLOOD)]
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ATTACK_LIMIT):
                await tried.wait()
        stats["ms_to_try_all"] = int(1e3 * (time.monotonic() - started))
        conn.send(("ready", dict(stats)))
        left = max(0.0, ATTACK_LIMIT - (time.monotonic() - started))
        with contextlib.suppress(BenchFailure):
            await _command(conn, left)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    stats["ms"] = int(1e3 * (time.monotonic() - started))
    conn.send(("stopped", dict(stats)))


def _error_name(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    return errno.errorcode.get(code, type(exc).__name__) if code else type(exc).__name__


def _reset(sock: socket.socket) -> None:
    """Close with a RST: thousands of closes leave no TIME_WAIT behind."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass(frozen=True)
class Flood:
    quiet: list[float]  # seconds
    loaded: list[float]
    quiet_failures: int
    loaded_failures: int
    attack: dict[str, int]  # the attacker's counts, summed over the rounds
    limits: dict[str, int]  # the limits the server counted


async def flood(size: Size, workdir: Path) -> Flood:
    """Honest handshakes against a default-policy BOTD server, in ``size.rounds``
    alternating rounds: unloaded, then while a fresh attacker runs. Returns the
    latencies, the attackers' counts and the server's."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    server = Worker("the flood server", serve_main, "flood", size.sessions, str(workdir), None)
    quiet: list[float] = []
    loaded: list[float] = []
    failures = [0, 0]
    attack: Counter[str] = Counter()
    per_round = max(1, size.samples // size.rounds)
    try:
        async with asyncio.timeout(STAGE_TIMEOUT):
            (_, info) = await server.receive("ready")
            port, peer = int(info["port"]), PublicKey.from_bytes(KeyKind.SECP256K1, info["key"])
            key = PrivateKey.generate(KeyKind.SECP256K1)
            await honest_handshakes(port, peer, key, 3)  # warm-up
            for _ in range(size.rounds):
                latencies, failed = await honest_handshakes(port, peer, key, per_round)
                quiet += latencies
                failures[0] += failed
                attacker = Worker("the attacker", attack_main, port, info["key"], size.idle)
                try:
                    await attacker.receive("ready", ATTACK_LIMIT + 10)
                    latencies, failed = await honest_handshakes(port, peer, key, per_round)
                    loaded += latencies
                    failures[1] += failed
                    (_, counts) = await attacker.ask("stop", expect="stopped")
                    attack.update(counts)
                finally:
                    attacker.close()
                await asyncio.sleep(SETTLE_AFTER_ATTACK)
            (_, stopped) = await server.ask("stop", expect="stopped")
            return Flood(quiet, loaded, failures[0], failures[1], dict(attack), stopped["limits"])
    finally:
        server.close()


# --- the run ----------------------------------------------------------------------------------


KINDS = ("botd", "catalyst", "mesh", "brc103")
HOW = {
    "botd": "BOTD #2 channels past the handshake (trustmesh.io.botd.serve/connect)",
    "catalyst": "Catalyst sessions in Established (CatalystNode serve/connect)",
    "mesh": "mesh links up (dadm-mesh/1 over TLS 1.3) in one MeshNode's link table",
    "brc103": "BRC-103 sessions over WebSocket (brc103_ws), each past a signed general message",
}


def run(
    *,
    quick: bool = False,
    sessions: int | None = None,
    idle: int | None = None,
    samples: int | None = None,
) -> list[Result]:
    size = Size.quick() if quick else Size.full()
    size = Size(sessions or size.sessions, idle or size.idle, samples or size.samples, size.rounds)
    raise_nofile(size.sessions + FD_MARGIN)
    return asyncio.run(_run(size))


async def _run(size: Size) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # The flood first: the session stages leave thousands of loopback sockets in
        # TIME_WAIT and a large heap in this process, neither of which is the server's.
        attack = await flood(size, root / "flood")
        await asyncio.to_thread((root / "pki").mkdir)
        pki = await asyncio.to_thread(make_pki, root / "pki", size.sessions + WARMUP)
        anchor = await hold_sessions("anchor", size.sessions, root / "anchor", pki)
        floor = await hold_sessions("anchor", size.sessions, root / "floor")
        stages = {}
        for kind in KINDS:
            extra = pki if kind == "catalyst" else None
            stages[kind] = await hold_sessions(kind, size.sessions, root / kind, extra)
    return [*_session_results(stages, anchor, floor), _flood_result(size, attack)]


def _session_results(stages: dict[str, Held], anchor: Held, floor: Held) -> list[Result]:
    for bare in (anchor, floor):
        if bare.held != bare.attempted:
            raise BenchFailure(f"an anchor held {bare.held} of {bare.attempted} connections")
    results: list[Result] = []
    for kind, stage in stages.items():
        how = f"{HOW[kind]}; {stage.how}" if stage.how else HOW[kind]
        failed = f"; {len(stage.errors)} failed to open: {stage.errors[0]}" if stage.errors else ""
        results.append(
            NotedResult(
                f"sessions_held_{kind}",
                stage.held,
                "sessions",
                "sessions attempted",
                stage.attempted,
                note=f"counted by the server: {how}{failed}",
            )
        )
    for kind, stage in stages.items():
        results.append(
            NotedResult(
                f"kib_per_session_{kind}",
                stage.kib_per_session,
                "KiB",
                ANCHOR_KIB,
                anchor.kib_per_session,
                note=(
                    f"server process alone (clients in another process): VmRSS "
                    f"{stage.rss_before} -> {stage.rss_after} KiB for {stage.held} sessions; "
                    f"anchor {anchor.rss_before} -> {anchor.rss_after} KiB for "
                    f"{anchor.held} (asyncio's SSL protocol allocates a 256 KiB buffer per "
                    f"connection); a bare asyncio TCP connection (start_server, no TLS): "
                    f"{floor.kib_per_session:.1f} KiB; lower is better"
                ),
            )
        )
    return results


def _flood_result(size: Size, attack: Flood) -> Result:
    loaded_ms, quiet_ms = 1e3 * p99(attack.loaded), 1e3 * p99(attack.quiet)
    counts = attack.attack
    limits = ", ".join(f"{k} {v}" for k, v in sorted(attack.limits.items()))
    reset_at_once = counts.get("idle_connect_failed.ECONNRESET", 0)
    other = counts.get("idle_connect_failed", 0) - reset_at_once
    tried = counts.get("idle_slots_tried", 0)
    note = (
        f"BOTD #2 handshakes (TCP connect to established) from {HONEST}, {HONEST_RATE:g}/s, "
        f"{len(attack.quiet)} unloaded and {len(attack.loaded)} under attack in "
        f"{size.rounds} alternating rounds; {attack.loaded_failures} failed under attack, "
        f"{attack.quiet_failures} unloaded (a failure counts as {HONEST_TIMEOUT:g} s); "
        f"median {1e3 * statistics.median(attack.loaded):.1f} ms under attack, "
        f"{1e3 * statistics.median(attack.quiet):.1f} ms unloaded. Server: default "
        f"ResourcePolicy, its own process. Attacker from {HOST}, a new process each round: "
        f"{size.idle} idle connection slots (each reconnects when dropped), all tried in "
        f"every round ({tried} of {size.idle * size.rounds}), "
        f"{counts.get('idle_attempts', 0)} idle connects ({reset_at_once} reset at once, "
        f"{counts.get('idle_connected', 0)} connected, of which "
        f"{counts.get('idle_reset', 0)} reset and {counts.get('idle_closed', 0)} closed by "
        f"the server later; {other} failed otherwise), and "
        f"{counts.get('flood_attempts', 0)} BOTD handshake attempts from {ATTACK_FLOOD} "
        f"tasks ({counts.get('flood_handshakes', 0)} completed), in "
        f"{counts.get('ms', 0) / 1e3:.1f} s of attack. Server limits hit: {limits or 'none'}"
    )
    return NotedResult(
        "flood_latency_ratio",
        loaded_ms,
        "ms p99",
        "p99 unloaded, same client and server, same run",
        quiet_ms,
        note=note,
    )
