"""BRC-103 over Socket.IO (``trustmesh.io.brc103_socketio``): our server and client on
loopback, and what the server does with hostile input (spoken as raw Engine.IO over a
WebSocket): each bad connection is dropped, and an honest client still gets through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from trustmesh.brc103.peer import Peer
from trustmesh.brc103.wallet import Wallet
from trustmesh.io import brc103_socketio
from trustmesh.io.brc103_socketio import SocketIoServer, connect, echo_events
from trustmesh.io.limits import ResourcePolicy

SERVER = Wallet.from_hex("a1" * 32)
CLIENT = Wallet.from_hex("b2" * 32)
WAIT = 10.0


@asynccontextmanager
async def serving(
    policy: ResourcePolicy | None = None, **kwargs: Any
) -> AsyncIterator[tuple[str, SocketIoServer]]:
    server = SocketIoServer(SERVER, echo_events, policy=policy, **kwargs)
    app = web.Application()
    server.install(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", server
    finally:
        await runner.cleanup()


async def test_our_client_and_server_echo_an_event() -> None:
    async with serving() as (url, _server), connect(url, CLIENT) as client:
        key = await asyncio.wait_for(client.emit("hello", {"a": [1, "ü"]}), WAIT)
        assert key == SERVER.identity_key
        name, data, sender = await asyncio.wait_for(client.next_event(), WAIT)
    assert (name, sender) == ("echo", SERVER.identity_key)
    assert data == {"eventName": "hello", "data": {"a": [1, "ü"]}, "from": CLIENT.identity_key}


async def echo_works(url: str) -> None:
    async with connect(url, Wallet.generate()) as client:
        async with asyncio.timeout(WAIT):
            await client.emit("ping", 1)
            name, data, _sender = await client.next_event()
    assert (name, data["data"]) == ("echo", 1)


def small_buffers(address: Any) -> socket.socket:
    """A client socket with a small receive buffer: one that stops reading fills fast."""
    family, kind, proto, _name, _address = address
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


@asynccontextmanager
async def raw_socket(
    url: str, *, small: bool = False, source: str | None = None
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A Socket.IO connection spoken by hand: Engine.IO open, then CONNECT to "/"
    (from ``source``, another loopback address, if given)."""
    connector = aiohttp.TCPConnector(
        socket_factory=small_buffers if small else None,
        local_addr=(source, 0) if source else None,
    )
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket") as ws,
    ):
        async with asyncio.timeout(WAIT):
            opened = await ws.receive_str()
            assert opened.startswith("0{"), opened
            await ws.send_str("40")
            connected = await ws.receive_str()
            assert connected.startswith("40{"), connected
        yield ws


async def closed(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """Whether the server ends the connection (within WAIT), whatever it sends first."""
    async with asyncio.timeout(WAIT):
        while True:
            message = await ws.receive()
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return True
            if message.type is aiohttp.WSMsgType.ERROR:
                return True


def initial_request() -> str:
    message = Peer(Wallet.generate()).initiate(0)
    return "42" + json.dumps(["authMessage", message.to_json()], separators=(",", ":"))


HOSTILE = {
    "not_an_object": '42["authMessage","hello"]',
    "bad_identity_key": '42["authMessage",{"version":"0.1","messageType":"initialRequest",'
    '"identityKey":"zz","initialNonce":"' + "A" * 64 + '"}]',
    "wrong_version": '42["authMessage",{"version":"9","messageType":"general"}]',
    "duplicate_keys": '42["authMessage",{"version":"0.1","version":"0.1"}]',
    "two_arguments": '42["authMessage",{},{}]',
    "no_argument": '42["authMessage"]',
    "deep_nesting": "42" + "[" * 40 + "]" * 40,
    "nan": '42["authMessage",NaN]',
    "binary_event": '451-["authMessage",{"_placeholder":true,"num":0}]',
    "not_socketio": "4hello",
    "unknown_type": "49[]",
    "not_json": '42["authMessage",{',
}


@pytest.mark.parametrize("packet", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_malformed_packet_drops_that_connection_only(packet: str) -> None:
    async with serving() as (url, server), raw_socket(url) as bystander:
        async with raw_socket(url) as ws:
            await ws.send_str(packet)
            assert await closed(ws)
        assert server.refused == 1
        await echo_works(url)
        assert not bystander.closed


async def test_a_binary_message_drops_the_connection() -> None:
    async with serving() as (url, server), raw_socket(url) as ws:
        await ws.send_bytes(b"\x04binary")
        assert await closed(ws)
        assert server.refused == 1


async def test_too_many_handshakes_drop_the_connection() -> None:
    async with serving() as (url, _server), raw_socket(url) as ws:
        for _ in range(12):  # the burst is 10
            await ws.send_str(initial_request())
        assert await closed(ws)
        await echo_works(url)


@pytest.mark.parametrize("packet", ["40", "40/x,"])
async def test_a_second_connect_on_one_session_drops_it(packet: str) -> None:
    """Each CONNECT would queue an answer (CONNECT_ERROR): a second one drops the session."""
    async with serving() as (url, server), raw_socket(url) as ws:
        await ws.send_str(packet)
        assert await closed(ws)
        assert (server.sessions, server.refused, len(server._connections)) == (0, 1, 0)
        await echo_works(url)


async def test_a_socketio_disconnect_ends_the_session() -> None:
    async with serving() as (url, server), raw_socket(url) as ws:
        await ws.send_str("41")
        assert await closed(ws)
        assert (server.sessions, server.refused) == (0, 0)


async def test_a_session_that_does_not_authenticate_in_time_is_dropped() -> None:
    policy = ResourcePolicy(handshake_timeout=0.5)
    async with serving(policy) as (url, server), raw_socket(url) as ws:
        assert await closed(ws)
        assert server.sessions == 0


async def test_a_source_at_its_cap_pushes_out_only_its_own_half_open_sessions() -> None:
    policy = ResourcePolicy(max_unauthenticated_per_source=2)
    async with serving(policy) as (url, server), raw_socket(url) as first, raw_socket(url):
        async with raw_socket(url):
            assert await closed(first)
            assert server.sessions == 2
        # Over polling too.
        async with aiohttp.ClientSession() as http:
            response = await http.get(f"{url}/socket.io/?EIO=4&transport=polling")
            assert response.status == 200
    # With only proven sessions of its own, a source at its cap is refused (401).
    policy = ResourcePolicy(max_connections=1, max_per_source=1)
    async with serving(policy) as (url, server), connect(url, CLIENT) as client:
        async with asyncio.timeout(WAIT):
            await client.emit("one")
            await client.next_event()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with raw_socket(url):
                pass
        assert refused.value.status == 401
        async with aiohttp.ClientSession() as http:
            response = await http.get(f"{url}/socket.io/?EIO=4&transport=polling")
            assert response.status == 401


async def test_an_authenticated_session_is_not_dropped_at_the_deadline() -> None:
    policy = ResourcePolicy(handshake_timeout=2.0)
    async with serving(policy) as (url, server), connect(url, CLIENT) as client:
        async with asyncio.timeout(WAIT):
            await client.emit("one")
            await client.next_event()
        session = next(iter(server._sessions.values()))
        assert session.proven and session.deadline is None


async def test_the_server_bypasses_other_middlewares() -> None:
    """Socket.IO authenticates inside: a middleware that refuses everything else (as the
    BRC-104 one does) never sees its requests."""

    @web.middleware
    async def refuse(request: web.Request, handler: Any) -> web.StreamResponse:
        return web.Response(status=401)

    server = SocketIoServer(SERVER, echo_events)
    app = web.Application(middlewares=[refuse])
    server.install(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        await echo_works(url)
        async with aiohttp.ClientSession() as http:
            assert (await http.get(url + "/other")).status == 401
    finally:
        await runner.cleanup()


async def test_a_client_that_does_not_read_is_not_queued_for_and_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client with a session sends large events and never reads the echoes: the server
    stops reading it while its replies wait (few packets queued, ever), then drops it
    after write_stall_timeout."""
    from trustmesh.brc103.messages import parse_message
    from trustmesh.io.brc103 import AsyncPeer
    from trustmesh.io.brc103_socketio import StrictPacket, encode_event

    handled = 0
    most_queued = 0
    dropped = asyncio.Event()

    async def counting(peer: AsyncPeer) -> None:
        def count(_event: object) -> None:
            nonlocal handled, most_queued
            handled += 1
            for engine_socket in server.sio.eio.sockets.values():
                most_queued = max(most_queued, engine_socket.queue.qsize())

        peer.on_general_message(count)
        try:
            await echo_events(peer)
        finally:
            dropped.set()

    monkeypatch.setattr(brc103_socketio, "MAX_QUEUED_PACKETS", 4)  # the sooner full
    policy = ResourcePolicy(write_stall_timeout=1.0)
    server = SocketIoServer(SERVER, counting, policy=policy)
    app = web.Application()
    server.install(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with raw_socket(url, small=True) as ws:
            client = Peer(CLIENT)
            await ws.send_str("42" + json.dumps(["authMessage", client.initiate(0).to_json()]))
            async with asyncio.timeout(WAIT):
                reply = StrictPacket(encoded_packet=await ws.receive_str())
            client.receive(parse_message(reply.data[1]), 0)
            big = encode_event("big", "x" * 16384)

            async def flood() -> None:
                for _ in range(200):
                    message = client.create_general(big, identity_key=SERVER.identity_key)
                    await ws.send_str("42" + json.dumps(["authMessage", message.to_json()]))

            sender = asyncio.ensure_future(flood())
            try:
                async with asyncio.timeout(WAIT):
                    await dropped.wait()
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender
    finally:
        await runner.cleanup()
    assert 0 < handled < 200
    assert most_queued <= 4 + 1


async def test_at_the_cap_a_half_open_session_makes_room_never_a_proven_one() -> None:
    policy = ResourcePolicy(max_connections=2, max_per_source=2)
    async with serving(policy) as (url, server), connect(url, CLIENT) as client:
        async with asyncio.timeout(WAIT):
            await client.emit("one")
            await client.next_event()
        async with raw_socket(url) as first:
            async with raw_socket(url):  # the table is full: the half-open one goes
                assert await closed(first)
                assert server.sessions == 2
            # The proven session is still served.
            async with asyncio.timeout(WAIT):
                await client.emit("two")
                assert (await client.next_event())[1]["eventName"] == "two"


async def test_a_full_table_evicts_from_the_source_holding_the_most_half_open() -> None:
    policy = ResourcePolicy(max_connections=3, max_per_source=3)
    async with (
        serving(policy) as (url, server),
        raw_socket(url) as a1,
        raw_socket(url) as a2,
        raw_socket(url, source="127.0.0.2") as b1,
        # A newcomer from a third source: the flooding source (two) loses its oldest.
        raw_socket(url, source="127.0.0.3"),
    ):
        assert await closed(a1)
        assert not a2.closed and not b1.closed
        assert server.sessions == 3
