"""The listeners under attack, each started under ``support.POLICY`` on 127.0.0.1, with
what an attack needs to know about it: its first flight, how an honest client is served
(from 127.0.0.2), how an attacker authenticates, and what each connection holds.

Not a test module: tests/adversarial/test_*.py build these in their fixtures.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID
from support import (
    ATTACKER,
    HONEST,
    POLICY,
    WAIT,
    Attack,
    Conn,
    CoreClient,
    Held,
    Tap,
    attacker_tls,
    client_hello,
    driver_held,
    http_request,
    now,
    ws_frame,
    ws_read,
    ws_upgrade,
)

from trustmesh.api.authfetch import AuthFetch
from trustmesh.api.brc104 import Brc104Server
from trustmesh.api.brc104_demo import demo_app
from trustmesh.api.ca import MAX_BODY as CA_MAX_BODY
from trustmesh.api.ca_server import CaServer
from trustmesh.botd import BotdConnection, HandshakeComplete, MessageReceived
from trustmesh.brc103 import http as brc104
from trustmesh.brc103.encoding import b64encode
from trustmesh.brc103.messages import parse_message_bytes
from trustmesh.brc103.peer import GeneralMessageReceived, Peer
from trustmesh.brc103.wallet import Wallet
from trustmesh.catalyst.session import CatalystConfig, CatalystSession, SessionEstablished
from trustmesh.crypto.keys import KeyKind, PrivateKey, Secp256k1PrivateKey
from trustmesh.errors import ConnectionClosedError
from trustmesh.io import botd
from trustmesh.io.brc103 import AsyncPeer, monotonic_ms
from trustmesh.io.brc103_ws import MAX_PENDING_SENDS, websocket_handler
from trustmesh.io.brc103_ws import connect as ws_connect
from trustmesh.io.catalyst import CatalystNode, CatalystServer
from trustmesh.io.https import HttpServer, serve_app
from trustmesh.io.limits import LIMIT_FIELDS, Admission, ResourcePolicy
from trustmesh.io.listener import Listener
from trustmesh.io.stream import ServerHandle, StreamDriver, StreamServer
from trustmesh.mesh.gossip import MAX_MESSAGE as MAX_GOSSIP
from trustmesh.mesh.gossip import anomaly_payload
from trustmesh.mesh.link import ALPN, LinkConfig, LinkUp, MeshLink
from trustmesh.node.config import load_config
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.sansio import Event, StreamCore
from trustmesh.tls import TlsConfig, TlsContext, TlsStream


def stream_server(handle: ServerHandle[Any]) -> StreamServer[Any]:
    """The StreamServer behind a protocol's server handle."""
    return handle._server


def common_name(chain: Any) -> str:
    leaf: x509.Certificate = chain[0]
    return str(leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


class StreamTarget:
    """A listener of ``StreamDriver`` connections (BOTD, Catalyst, mesh links)."""

    name = "?"
    tls = True
    authenticated: type[Event] = Event  # the client core's event for "the server accepted us"

    def __init__(self, server: StreamServer[Any], policy: ResourcePolicy = POLICY) -> None:
        self.server = server
        self.policy = policy

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def listener(self) -> Listener:
        return self.server.listener

    @property
    def counts(self) -> collections.Counter[str]:
        """How often each limit was hit (a missing one: 0)."""
        return collections.Counter(self.listener.stats.counts)

    # --- what a target says about itself ------------------------------------------------

    async def stop(self) -> None:
        raise NotImplementedError

    def first_flight(self) -> bytes:
        """What a real client sends first (a fresh one each call)."""
        raise NotImplementedError

    def client_context(self, *, honest: bool) -> TlsContext:
        """The client TLS context of the honest identity or the attacker's."""
        raise NotImplementedError

    def client_core(self, *, honest: bool) -> tuple[StreamCore, Tap]:
        """A real client core (the honest identity or the attacker's), with a tap for
        bytes no real core would send (inside TLS where there is TLS)."""
        raise NotImplementedError

    app_slack = 0  # what the application may hold past max_queued_bytes (see Watch.check)

    def app_held(self, driver: StreamDriver[Any]) -> int:
        """Bytes the application holds for this connection beyond the driver's queue."""
        return 0

    async def provoke(self, client: CoreClient, tap: Tap) -> None:
        """Make the server send this (authenticated) client a lot, for ever."""
        raise NotImplementedError

    async def after_authenticated(self, client: CoreClient) -> None:
        """The rest of an honest exchange, once authenticated."""

    # --- shared -------------------------------------------------------------------------

    def held(self) -> Iterable[Held]:
        return [driver_held(d, self.app_held(d)) for d in self.server.connections]

    async def connect(self, *, honest: bool, rcvbuf: int | None = None) -> tuple[CoreClient, Tap]:
        """A client core connected and authenticated (honest from 127.0.0.2, or the
        attacker from 127.0.0.1)."""
        core, tap = self.client_core(honest=honest)
        client = await CoreClient.open(
            core, self.port, local=HONEST if honest else ATTACKER, rcvbuf=rcvbuf
        )
        try:
            await client.until(self.authenticated)
        except BaseException:
            await client.aclose()
            raise
        return client, tap

    async def honest(self) -> None:
        """One honest exchange from 127.0.0.2: authenticate, use the service, say
        goodbye the protocol's way and see the server end the connection."""
        client, _ = await self.connect(honest=True)
        async with client:
            await self.after_authenticated(client)
            await client.act(lambda core: core.close("honest client done", now()))
            await client.until_closed()

    def server_side(self, client: CoreClient) -> StreamDriver[Any]:
        """The server's driver of this client's connection."""
        sockname = client.conn.writer.get_extra_info("sockname")
        for driver in self.server.connections:
            peer = driver.get_extra_info("peername")
            if isinstance(peer, tuple) and tuple(peer[:2]) == tuple(sockname[:2]):
                return driver
        raise AssertionError(f"no server connection for {sockname}")

    async def inject(self, client: CoreClient, tap: Tap, data: bytes) -> None:
        """Bytes past the client's core: inside TLS if there is TLS, else raw."""
        if self.tls:
            await client.act(lambda tls: tls.inner_action(lambda _: tap.inject(data)))
        else:
            await client.inject(data)


# --- BOTD --------------------------------------------------------------------------------

BOTD_KEY = Secp256k1PrivateKey.from_secret(b"\x15" * 32)
BOTD_HIGH_WATER = 32 * 1024  # the echo handler waits on drain above this (under the cap)


ECHO_MESSAGE = 32 * 1024  # what the slow reader has echoed


class BotdTarget(StreamTarget):
    """``botd.serve`` with an echo handler."""

    name = "botd"
    tls = False
    authenticated = HandshakeComplete
    app_slack = ECHO_MESSAGE  # the channel's inbox may pass its limit by one message

    def __init__(self, server: botd.BotdServer, channels: dict[int, botd.Channel]) -> None:
        super().__init__(stream_server(server))
        self.handle = server
        self.channels = channels  # by id() of the server-side driver

    @classmethod
    async def start(cls, policy: ResourcePolicy = POLICY) -> BotdTarget:
        channels: dict[int, botd.Channel] = {}

        async def echo(channel: botd.Channel) -> None:
            key = id(channel._driver)
            channels[key] = channel
            try:
                async for data in channel:
                    await channel.send(data)
            except ConnectionClosedError:
                pass
            finally:
                channels.pop(key, None)

        server = await botd.serve(
            BOTD_KEY, echo, ATTACKER, 0, policy=policy, name="botd", high_water=BOTD_HIGH_WATER
        )
        return cls(server, channels)

    async def stop(self) -> None:
        self.handle.close()
        async with asyncio.timeout(WAIT):
            await self.handle.wait_closed()

    def first_flight(self) -> bytes:
        core = BotdConnection(
            PrivateKey.generate(KeyKind.SECP256K1), peer_key=BOTD_KEY.public_key()
        )
        core.start(0.0)
        return core.data_to_send()

    def client_core(self, *, honest: bool) -> tuple[StreamCore, Tap]:
        core = BotdConnection(
            PrivateKey.generate(KeyKind.SECP256K1), peer_key=BOTD_KEY.public_key()
        )
        return core, Tap(core)

    def app_held(self, driver: StreamDriver[Any]) -> int:
        channel = self.channels.get(id(driver))  # its inbox, counted message by message
        return sum(len(m) for m in channel._inbox) if channel is not None else 0

    async def after_authenticated(self, client: CoreClient) -> None:
        await client.act(lambda core: core.send(b"honest echo"))
        message = await client.until(MessageReceived)
        assert message.data == b"honest echo"

    async def provoke(self, client: CoreClient, tap: Tap) -> None:
        payload = b"e" * ECHO_MESSAGE
        while not client.conn.writer.is_closing():  # echoed to a client that never reads
            await client.act(lambda core: core.send(payload))


# --- Catalyst ------------------------------------------------------------------------------

CATALYST_SERVER = CatalystConfig(my_asn=65002, bgp_identifier="node-b", hold_time=90)
CATALYST_CLIENTS = {
    False: CatalystConfig(my_asn=65001, bgp_identifier="node-a"),  # the attacker
    True: CatalystConfig(my_asn=65003, bgp_identifier="node-c"),  # the honest client
}


def catalyst_pki(directory: Path) -> dict[str, TlsConfig]:
    """A CA and a certificate for node-a, node-b and node-c."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    configs = {}
    for name in ("node-a", "node-b", "node-c"):
        leaf = ca.issue_cert(name)
        leaf.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(directory / f"{name}.key"))
        configs[name] = TlsConfig(
            directory / f"{name}.pem", directory / f"{name}.key", directory / "ca.pem"
        )
    return configs


class CatalystTarget(StreamTarget):
    """``CatalystNode.serve`` over TLS 1.3 (no handler: a session lives until its end)."""

    name = "catalyst"
    authenticated = SessionEstablished

    def __init__(
        self, handle: CatalystServer, clients: dict[bool, TlsContext], policy: ResourcePolicy
    ) -> None:
        super().__init__(stream_server(handle), policy)
        self.handle = handle
        self.clients = clients

    @classmethod
    async def start(cls, directory: Path, policy: ResourcePolicy = POLICY) -> CatalystTarget:
        pki = catalyst_pki(directory)
        node = CatalystNode(CATALYST_SERVER, pki["node-b"])
        handle = await node.serve(host=ATTACKER, port=0, policy=policy)
        clients = {
            False: TlsContext(pki["node-a"], server=False),
            True: TlsContext(pki["node-c"], server=False),
        }
        return cls(handle, clients, policy)

    async def stop(self) -> None:
        self.handle.close()
        async with asyncio.timeout(WAIT):
            await self.handle.wait_closed()

    def first_flight(self) -> bytes:
        return client_hello()

    def client_context(self, *, honest: bool) -> TlsContext:
        return self.clients[honest]

    def client_core(self, *, honest: bool) -> tuple[StreamCore, Tap]:
        session = CatalystSession(CATALYST_CLIENTS[honest], initiator=True)
        tap = Tap(session)
        stream = TlsStream(self.clients[honest], tap)
        session.bind(stream)
        return stream, tap


# --- mesh links ----------------------------------------------------------------------------

PAD = {f"pad{i}": "x" * 256 for i in range(8)}  # 2 KiB of meta: a big anomaly
MESH_SETTINGS: dict[str, Any] = {"digest_interval": 0.2, "crl_interval": 3600.0}


def limits_of(policy: ResourcePolicy) -> dict[str, float]:
    """A policy as node.toml's ``[limits]`` table."""
    return {name: getattr(policy, name) for name in LIMIT_FIELDS}


class MeshTarget(StreamTarget):
    """A mesh node's link listener (and, for the HTTP tests, its API): node-1 of a
    LocalMesh with its CA; node-2 (the attacker) and node-3 (the honest client) are
    enrolled but not started: their certificates speak for them."""

    name = "mesh"
    authenticated = LinkUp

    def __init__(
        self, mesh: LocalMesh, node: MeshNode, clients: dict[bool, tuple[str, TlsContext]]
    ) -> None:
        assert node.link_server is not None
        super().__init__(node.link_server, node.config.policy)
        self.mesh = mesh
        self.node = node
        self.clients = clients
        self.directories: dict[bool, Path] = {}
        self._published = 0

    @classmethod
    async def start(cls, directory: Path, policy: ResourcePolicy = POLICY) -> MeshTarget:
        mesh = LocalMesh(directory, 1, node_settings=dict(MESH_SETTINGS))
        try:
            await mesh.start_ca()
            victim = await mesh.enroll(1)
            # Not through node.toml: load_config applies the operator's 5 s floor to the
            # HTTP deadlines, and these tests use shorter ones.
            config = dataclasses.replace(load_config(victim), limits=limits_of(policy))
            node = MeshNode(victim, config)
            await node.start()
            mesh.nodes.append(node)
            clients: dict[bool, tuple[str, TlsContext]] = {}
            directories: dict[bool, Path] = {}
            for honest, index in ((False, 2), (True, 3)):
                enrolled = await mesh.enroll(index)
                tls = TlsConfig(
                    cert_file=enrolled / "node.crt",
                    key_file=enrolled / "node.key",
                    ca_file=enrolled / "ca.crt",
                    alpn=(ALPN,),
                )
                clients[honest] = (f"node-{index}", TlsContext(tls, server=False))
                directories[honest] = enrolled
        except BaseException:
            await mesh.stop()
            raise
        target = cls(mesh, node, clients)
        target.directories = directories
        return target

    async def stop(self) -> None:
        async with asyncio.timeout(WAIT * 2):
            await self.mesh.stop()

    def first_flight(self) -> bytes:
        return client_hello(alpn=(ALPN,))

    def client_context(self, *, honest: bool) -> TlsContext:
        return self.clients[honest][1]

    def client_core(self, *, honest: bool) -> tuple[StreamCore, Tap]:
        node_id, context = self.clients[honest]
        link = MeshLink(LinkConfig(node_id), initiator=True, authorize=common_name)
        tap = Tap(link)
        stream = TlsStream(context, tap)
        link.bind(stream)
        return stream, tap

    async def provoke(self, client: CoreClient, tap: Tap) -> None:
        while not client.conn.writer.is_closing():  # gossip to a link that never reads
            for _ in range(20):
                self._published += 1
                payload = anomaly_payload(f"{self._published:032x}", "flood", 0.5, PAD)
                self.node.publish(payload)
            await asyncio.sleep(0)  # let the node's writes and deadlines run


# --- HTTP listeners --------------------------------------------------------------------------


class Tracked:
    """The connections a listener makes from now on (its factory wrapped), each with a
    future that ends when its socket is gone: what a watch counts, and what a test
    waits on to see the server drop a peer that does not read."""

    def __init__(self, listener: Listener) -> None:
        self.made: list[Any] = []
        self.lost: dict[int, asyncio.Future[None]] = {}
        self._new = asyncio.Event()
        factory = listener._factory
        loop = asyncio.get_running_loop()

        def tracking(admission: Admission) -> asyncio.BaseProtocol:
            protocol = factory(admission)
            self.made.append(protocol)
            self._new.set()
            gone = self.lost[id(protocol)] = loop.create_future()
            original = protocol.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                original(exc)
                if not gone.done():
                    gone.set_result(None)

            setattr(protocol, "connection_lost", connection_lost)  # noqa: B010
            return protocol

        listener._factory = tracking

    async def of(self, conn: Conn) -> tuple[Any, asyncio.Future[None]]:
        """The server's connection object for this client connection (once accepted),
        and its future."""
        sockname = conn.writer.get_extra_info("sockname")
        async with asyncio.timeout(WAIT):
            while True:
                for protocol in self.made:
                    raw = protocol._raw
                    peer = raw.get_extra_info("peername") if raw is not None else None
                    if isinstance(peer, tuple) and tuple(peer[:2]) == tuple(sockname[:2]):
                        return protocol, self.lost[id(protocol)]
                self._new.clear()
                await self._new.wait()


def http_held(connection: Any) -> Held:
    """What one HTTP(S) connection holds: unsent bytes on the socket, plaintext that
    came before the HTTP protocol started, and aiohttp's queued request bodies."""
    if connection._closed:
        return Held(0, 0)
    raw = connection._raw
    unsent = raw.get_write_buffer_size() if raw is not None and not raw.is_closing() else 0
    queued = sum(len(p) for p in connection._pending)
    app = connection._app
    for _, payload in getattr(app, "_messages", ()):
        queued += getattr(payload, "_size", 0)
    return Held(unsent, queued)


class HttpTarget:
    """An aiohttp app under ``serve_app`` (HTTPS on trustmesh TLS, or plain HTTP)."""

    name = "?"
    tls = True
    get_path = "/"  # a cheap GET, answered on a kept-alive connection
    biggest_response = 64 * 1024  # the largest response the slow reader asks for
    max_body = 1024 * 1024  # the app's client_max_size: a request body it reads whole

    def __init__(self, server: HttpServer, policy: ResourcePolicy = POLICY) -> None:
        self.server = server
        self.policy = policy
        self.tracked = Tracked(server.listener)
        self.client_tls = attacker_tls() if self.tls else None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def listener(self) -> Listener:
        return self.server.listener

    @property
    def counts(self) -> collections.Counter[str]:
        return collections.Counter(self.listener.stats.counts)

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://{ATTACKER}:{self.port}"

    def held(self) -> Iterable[Held]:
        return [http_held(c) for c in self.tracked.made]

    async def stop(self) -> None:
        raise NotImplementedError

    async def open(
        self, attack: Attack, n: int = 1, *, authenticated: bool = False, **options: Any
    ) -> list[Conn]:
        """Attacker connections that speak HTTP (TLS done first where there is TLS;
        ``authenticated``: with the attacker's client certificate where the API takes
        one)."""
        return await attack.open(n, tls=self.client_tls, **options)

    def first_flight(self) -> bytes:
        """What a real client sends first: a ClientHello, or (plain HTTP) the start of
        a request head."""
        return client_hello() if self.tls else b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"

    async def honest(self) -> None:
        raise NotImplementedError

    def session(self, ssl_context: ssl.SSLContext | bool = False) -> aiohttp.ClientSession:
        """An aiohttp client bound to 127.0.0.2, one connection per request."""
        connector = aiohttp.TCPConnector(ssl=ssl_context, local_addr=(HONEST, 0), force_close=True)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(WAIT))

    async def slow_reader(self, conn: Conn) -> None:
        """Make the server answer this connection with much more than it reads: by
        default, pipelined GETs of ``get_path``."""
        request = http_request("GET", self.get_path)
        while await conn.send(request * 64):
            pass


class NodeApiTarget(HttpTarget):
    """A mesh node's HTTPS API (mTLS requested; the honest client is node-3)."""

    name = "node-api"
    get_path = "/v1/mesh/health"
    max_body = MAX_GOSSIP + 1024

    def __init__(self, mesh: MeshTarget) -> None:
        assert mesh.node.api_server is not None
        super().__init__(mesh.node.api_server, mesh.policy)
        self.mesh = mesh

    @classmethod
    async def start(cls, directory: Path, policy: ResourcePolicy = POLICY) -> NodeApiTarget:
        return cls(await MeshTarget.start(directory, policy))

    async def stop(self) -> None:
        await self.mesh.stop()

    async def open(
        self, attack: Attack, n: int = 1, *, authenticated: bool = False, **options: Any
    ) -> list[Conn]:
        tls = self.node_tls(honest=False) if authenticated else self.client_tls
        return await attack.open(n, tls=tls, **options)

    def node_tls(self, honest: bool) -> ssl.SSLContext:
        directory = self.mesh.directories[honest]
        context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
        context.check_hostname = False  # node certificates name nodes, not addresses
        context.load_cert_chain(str(directory / "node.crt"), str(directory / "node.key"))
        return context

    async def honest(self) -> None:
        async with (
            self.session(self.node_tls(honest=True)) as http,
            http.get(f"{self.origin}/v1/mesh/health") as response,
        ):
            assert response.status == 200, await response.text()
            assert (await response.json())["node_id"] == "node-1"


class CaApiTarget(HttpTarget):
    """The CA's HTTPS API (``CaServer``)."""

    name = "ca-api"
    get_path = "/v1/openapi.json"
    biggest_response = 64 * 1024  # the OpenAPI document, about 38 KB
    max_body = CA_MAX_BODY

    def __init__(self, server: CaServer, ca: CertificateAuthority, directory: Path) -> None:
        assert server._http is not None
        super().__init__(server._http, server.policy)
        self.ca_server = server
        self.ca = ca
        self.directory = directory

    @classmethod
    async def start(cls, directory: Path, policy: ResourcePolicy = POLICY) -> CaApiTarget:
        ca = CertificateAuthority.init(directory / "ca", CA_PASSPHRASE)
        registrar = Registrar(ca, EnrollmentPolicy(), MeshSettings())
        server = CaServer(registrar, CA_PASSPHRASE, ATTACKER, 0, policy=policy)
        try:
            await server.start()
        except BaseException:
            ca.close()
            raise
        return cls(server, ca, directory / "ca")

    async def stop(self) -> None:
        try:
            await self.ca_server.stop()
        finally:
            self.ca.close()

    async def honest(self) -> None:
        context = ssl.create_default_context(cafile=str(self.directory / "ca.crt"))
        async with (
            self.session(context) as http,
            http.get(f"{self.origin}/v1/health") as response,
        ):
            assert response.status == 200, await response.text()


CA_PASSPHRASE = b"adversarial CA passphrase"
BRC_SERVER = Wallet.from_hex("15" * 32)
BRC_CLIENTS = {False: Wallet.from_hex("16" * 32), True: Wallet.from_hex("17" * 32)}
ECHO_BODY = 2 * 1024 * 1024  # each slow reader's request body, echoed back: 2 MiB responses
ECHOES = 4  # more than the kernel's socket buffers take (its send buffer grows to 4 MiB)


class Brc104Target(HttpTarget):
    """``Brc104Server`` in front of the demo app (what ``trustmesh brc103 serve`` runs),
    plain HTTP."""

    name = "brc104"
    tls = False
    get_path = "/hello"  # 401 without BRC-104 headers
    biggest_response = ECHO_BODY + 4096
    max_body = ECHO_BODY

    def __init__(self, server: HttpServer, brc: Brc104Server, policy: ResourcePolicy) -> None:
        super().__init__(server, policy)
        self.brc = brc

    @classmethod
    async def start(cls, policy: ResourcePolicy = POLICY) -> Brc104Target:
        brc = Brc104Server(BRC_SERVER, policy=policy)
        app = demo_app(brc, max_body=ECHO_BODY)
        server = await serve_app(
            app, ATTACKER, 0, context=None, policy=policy, name="BRC-104", shutdown_timeout=1.0
        )
        return cls(server, brc, policy)

    async def stop(self) -> None:
        await self.server.stop()

    async def honest(self) -> None:
        async with self.session() as http, AuthFetch(BRC_CLIENTS[True], session=http) as fetch:
            response = await fetch.fetch(f"{self.origin}/hello")
            assert response.status == 200, response.body

    async def signed_request(
        self, fetch: AuthFetch, path: str, body: bytes, content_type: str
    ) -> bytes:
        """A POST as AuthFetch would sign it, as raw bytes for a socket."""
        identity = await fetch.server_identity(self.origin)
        request_id = brc104.new_request_id()
        headers = [("content-type", content_type)]
        payload = brc104.encode_request_payload(
            request_id, "POST", path, "", brc104.signed_request_headers(headers), body
        )
        message = fetch.peer.create_general(
            payload, session=fetch.peer.session(identity_key=identity)
        )
        auth = brc104.auth_headers(message, b64encode(request_id))
        return http_request("POST", path, headers + list(auth.items()), body)

    async def slow_reader(self, conn: Conn) -> None:
        """Authenticated POSTs of 2 MiB to /echo-bin, whose answers it never reads."""
        async with (
            aiohttp.ClientSession() as http,
            AuthFetch(BRC_CLIENTS[False], session=http) as fetch,
        ):
            requests = [
                await self.signed_request(
                    fetch, "/echo-bin", bytes(ECHO_BODY), "application/octet-stream"
                )
                for _ in range(ECHOES)
            ]
        for request in requests:
            await conn.send(request)
        await asyncio.Event().wait()  # until cancelled: nothing more to say


WS_SERVER = Wallet.from_hex("18" * 32)
WS_ECHO = 16 * 1024  # the payload of each message the slow reader sends (echoed back)


async def ws_echo(peer: AsyncPeer) -> None:
    """Answer every general message with ``echo:`` + its payload, until cancelled."""

    async def answer(event: GeneralMessageReceived) -> None:
        await peer.send_general(b"echo:" + event.payload, identity_key=event.identity_key)

    peer.on_general_message(answer)
    await asyncio.Event().wait()


class WebSocketTarget(HttpTarget):
    """The BRC-103 WebSocket endpoint (an echo) at /ws, plain HTTP."""

    name = "brc103-ws"
    tls = False
    get_path = "/nothing-here"  # 404, then the connection is kept alive
    # Replies are written as they are made; the reader stops once MAX_PENDING_SENDS of
    # them are in flight, so that many echoes may wait unsent (with their framing).
    biggest_response = MAX_PENDING_SENDS * (WS_ECHO + 1024)

    @classmethod
    async def start(cls, policy: ResourcePolicy = POLICY) -> WebSocketTarget:
        app = web.Application()
        app.router.add_get("/ws", websocket_handler(WS_SERVER, ws_echo))
        server = await serve_app(
            app, ATTACKER, 0, context=None, policy=policy, name="BRC-103 WS", shutdown_timeout=1.0
        )
        return cls(server, policy)

    async def stop(self) -> None:
        await self.server.stop()

    @property
    def url(self) -> str:
        return f"http://{ATTACKER}:{self.port}/ws"

    async def honest(self) -> None:
        async with (
            self.session() as http,
            ws_connect(self.url, Wallet.generate(), session=http) as peer,
        ):
            await peer.send_general(b"honest")
            async with asyncio.timeout(WAIT):
                reply = await peer.receive()
            assert reply.payload == b"echo:honest"

    async def upgrade(self, conn: Conn) -> None:
        await conn.send(ws_upgrade("/ws"))
        async with asyncio.timeout(WAIT):
            head = await conn.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    async def handshake(self, conn: Conn, client: Peer) -> None:
        """A BRC-103 handshake over an upgraded connection (a real Peer core)."""
        await conn.send(ws_frame(client.initiate(monotonic_ms()).to_bytes()))
        async with asyncio.timeout(WAIT):
            opcode, data = await ws_read(conn.reader)
        assert opcode == 0x1, (opcode, data)
        client.receive(parse_message_bytes(data), monotonic_ms())

    async def slow_reader(self, conn: Conn) -> None:
        """Authenticated, then 16 KiB messages, each echoed, never read."""
        client = Peer(BRC_CLIENTS[False])
        await self.upgrade(conn)
        await self.handshake(conn, client)
        payload = bytes(WS_ECHO)
        while True:
            message = client.create_general(payload, identity_key=WS_SERVER.identity_key)
            if not await conn.send(ws_frame(message.to_bytes())):
                return
