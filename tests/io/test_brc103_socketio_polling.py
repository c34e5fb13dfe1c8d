"""BRC-103 over Socket.IO, spoken by hand over Engine.IO's polling transport and its
upgrade to WebSocket: what a client may make the server queue (UPGRADE and CONNECT
packets, a poll body's packets after a drop) and hold open (upgrade WebSockets) is
bounded; and the python-socketio / python-engineio internals the server relies on are
still there."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import engineio  # type: ignore[import-untyped]
import pytest
import socketio  # type: ignore[import-untyped]
from aiohttp import web
from engineio import async_socket
from engineio.async_drivers import aiohttp as eio_aiohttp  # type: ignore[import-untyped]

from trustmesh.brc103.messages import parse_message
from trustmesh.brc103.peer import Peer
from trustmesh.brc103.wallet import Wallet
from trustmesh.io import brc103_socketio
from trustmesh.io.brc103_socketio import (
    SocketIoServer,
    StrictPacket,
    _Body,
    echo_events,
    encode_event,
)
from trustmesh.io.limits import ResourcePolicy

SERVER = Wallet.from_hex("a1" * 32)
CLIENT = Wallet.from_hex("b2" * 32)
WAIT = 10.0
OPEN = "?EIO=4&transport=polling"


@asynccontextmanager
async def serving(
    policy: ResourcePolicy | None = None, **kwargs: Any
) -> AsyncIterator[tuple[str, SocketIoServer, aiohttp.ClientSession]]:
    """Our server on loopback, its Socket.IO URL, and an HTTP client for it."""
    server = SocketIoServer(SERVER, echo_events, policy=policy, **kwargs)
    app = web.Application()
    server.install(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/socket.io/"
        timeout = aiohttp.ClientTimeout(total=WAIT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            yield url, server, http
    finally:
        await runner.cleanup()


async def settled(server: SocketIoServer) -> None:
    """Wait for the drops the server has started."""
    async with asyncio.timeout(WAIT):
        while server._dropping:
            await asyncio.gather(*server._dropping, return_exceptions=True)


async def open_polling(url: str, http: aiohttp.ClientSession) -> tuple[str, str]:
    """A polling session (not yet Socket.IO-connected): its sid and its query."""
    async with http.get(url + OPEN) as response:
        assert response.status == 200
        sid = json.loads((await response.text())[1:])["sid"]
    return sid, f"{OPEN}&sid={sid}"


async def post(http: aiohttp.ClientSession, url: str, body: str) -> int:
    async with http.post(url, data=body.encode()) as response:
        await response.read()
        return response.status


async def poll(http: aiohttp.ClientSession, url: str) -> list[str]:
    async with http.get(url) as response:
        assert response.status == 200
        return (await response.text()).split("\x1e")


def auth_packet(message: Any) -> str:
    return "42" + json.dumps(["authMessage", message.to_json()], separators=(",", ":"))


async def proven_polling(url: str, http: aiohttp.ClientSession) -> tuple[str, str]:
    """A polling session that has connected and proven its identity (a handshake, then
    one event, whose echo it has read)."""
    sid, query = await open_polling(url, http)
    assert await post(http, url + query, "40") == 200
    assert (await poll(http, url + query))[0].startswith("40{")
    client = Peer(CLIENT)
    assert await post(http, url + query, auth_packet(client.initiate(0))) == 200
    for packet in await poll(http, url + query):
        if packet.startswith("42"):
            client.receive(parse_message(StrictPacket(encoded_packet=packet[1:]).data[1]), 0)
    general = client.create_general(encode_event("x", 1), identity_key=SERVER.identity_key)
    assert await post(http, url + query, auth_packet(general)) == 200
    assert any(p.startswith("42") for p in await poll(http, url + query))  # the echo
    return sid, query


async def closed(ws: aiohttp.ClientWebSocketResponse) -> bool:
    async with asyncio.timeout(WAIT):
        while True:
            message = await ws.receive()
            if message.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                return True


# --- what a polling client may make the server queue -------------------------------------


async def test_upgrade_packets_outside_an_upgrade_drop_a_polling_session() -> None:
    """Each UPGRADE ("5") queued a NOOP: 16 a POST, never read, grew the queue without
    bound."""
    async with serving() as (url, server, http):
        sid, query = await open_polling(url, http)
        await post(http, url + query, "\x1e".join(["5"] * 16))
        await settled(server)
        assert (server.sessions, server.refused) == (0, 1)
        assert sid not in server.sio.eio.sockets


async def test_an_upgrade_packet_over_websocket_drops_the_session() -> None:
    async with serving() as (url, server, http):
        async with http.ws_connect(url + "?EIO=4&transport=websocket") as ws:
            assert (await ws.receive_str()).startswith("0{")
            await ws.send_str("5")
            assert await closed(ws)
        await settled(server)
        assert (server.sessions, server.refused) == (0, 1)


@pytest.mark.parametrize("packet", ["40", "40/x,"])
async def test_repeated_connects_in_a_poll_body_drop_the_session(packet: str) -> None:
    """Each CONNECT queued its answer (a CONNECT_ERROR after the first)."""
    async with serving() as (url, server, http):
        sid, query = await open_polling(url, http)
        await post(http, url + query, "\x1e".join([packet] * 16))
        await settled(server)
        assert (server.sessions, server.refused) == (0, 1)
        assert sid not in server.sio.eio.sockets
        assert not server._connections


async def test_a_polling_client_that_leaves_its_queue_full_is_dropped_at_its_next_post(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that never polls: once its queue holds more than MAX_QUEUED_PACKETS, its
    next POST drops it (here the CONNECT's answer is one too many)."""
    monkeypatch.setattr(brc103_socketio, "MAX_QUEUED_PACKETS", 0)
    async with serving() as (url, server, http):
        sid, query = await open_polling(url, http)
        await post(http, url + query, "40")
        await settled(server)
        assert (server.sessions, server.refused) == (0, 1)
        assert sid not in server.sio.eio.sockets


async def test_packets_after_a_drop_leave_no_socketio_state() -> None:
    """A CONNECT after the packet that dropped the session (in the same poll body) ran
    python-socketio's pre_connect for a session we no longer had: its entries stayed."""
    async with serving() as (url, server, http):
        for _ in range(100):
            _sid, query = await open_polling(url, http)
            await post(http, url + query, "40")
            await post(http, url + query, "4hello\x1e40\x1e40")
        await settled(server)
        manager = server.sio.manager
        assert (server.sessions, len(server.sio.eio.sockets), len(server._connections)) == (0, 0, 0)
        assert server.refused == 100
        assert not any(rooms for rooms in manager.rooms.values()), manager.rooms
        assert not any(manager.pending_connect.values()), manager.pending_connect
        assert not manager.eio_to_sid
        assert not server.sio.environ


# --- upgrades from polling to WebSocket ------------------------------------------------------


def upgrade_url(url: str, sid: str) -> str:
    return f"{url}?EIO=4&transport=websocket&sid={sid}"


async def test_a_session_gets_one_upgrade_and_it_counts_only_once_upgraded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bug: every upgrade request on a proven session was marked authenticated at
    once (no deadline, no eviction), each overwrote the last, and only the last was
    closed. Now: one upgrade per session, authenticated once Engine.IO has switched."""
    marked: list[web.BaseRequest] = []
    upgraded = asyncio.Event()

    def mark(request: web.BaseRequest) -> None:
        marked.append(request)
        upgraded.set()

    monkeypatch.setattr(brc103_socketio, "mark_authenticated", mark)
    async with serving() as (url, server, http), AsyncExitStack() as stack:
        sid, _query = await proven_polling(url, http)
        ws = await stack.enter_async_context(http.ws_connect(upgrade_url(url, sid)))
        assert marked == []  # not before the upgrade completes
        for _ in range(3):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await stack.enter_async_context(http.ws_connect(upgrade_url(url, sid)))
            assert refused.value.status == 400
        async with asyncio.timeout(WAIT):
            await ws.send_str("2probe")
            assert await ws.receive_str() == "3probe"
            await ws.send_str("5")
            await upgraded.wait()
        session = server._sessions[sid]
        assert marked == [session.websocket] and session.upgrade is session.websocket
        assert session.upgrade_deadline is None
        # The upgraded session still works: a second CONNECT over it drops it.
        await ws.send_str("40")
        assert await closed(ws)
        await settled(server)
        assert server.sessions == 0


async def test_an_upgrade_that_does_not_complete_in_time_is_closed() -> None:
    async with serving() as (url, server, http):
        sid, _query = await proven_polling(url, http)
        # A short deadline from now on (the handshake above had the default).
        server.policy = dataclasses.replace(server.policy, handshake_timeout=0.2)
        try:
            async with http.ws_connect(upgrade_url(url, sid)) as ws:  # never sends the probe
                assert await closed(ws)
        except aiohttp.ClientError:
            pass  # closed before its 101 reached us (a loaded machine): as good
        await settled(server)
        assert server.sessions == 0
        assert sid not in server.sio.eio.sockets


async def test_dropping_a_session_closes_its_upgrade_websocket() -> None:
    async with serving() as (url, server, http):
        sid, query = await proven_polling(url, http)
        async with http.ws_connect(upgrade_url(url, sid)) as ws:  # never sends the probe
            await post(http, url + query, "1")  # Engine.IO CLOSE: the session ends
            assert await closed(ws)
        await settled(server)
        assert server.sessions == 0


# --- what we rely on in python-socketio and python-engineio ----------------------------------


def test_the_private_hooks_and_internals_we_use_are_still_there() -> None:
    """trustmesh.io.brc103_socketio overrides three private methods of python-socketio's
    server and reads Engine.IO's internals (pyproject pins both to a minor version)."""
    for name, parameters in (
        ("_handle_eio_connect", ["eio_sid", "environ"]),
        ("_handle_eio_message", ["eio_sid", "data"]),
        ("_handle_eio_disconnect", ["eio_sid", "reason"]),
    ):
        method = getattr(socketio.AsyncServer, name)
        assert inspect.iscoroutinefunction(method), name
        assert list(inspect.signature(method).parameters)[1:] == parameters, name
    assert socketio.AsyncServer._engineio_server_class is not None
    # Engine.IO: the server's sockets and driver table, each socket's queue, receive and
    # upgrade flags, the aiohttp WebSocket wrapper's environ and wait, packet types.
    server = socketio.AsyncServer(async_mode="aiohttp")
    eio = server.eio
    assert isinstance(eio, engineio.AsyncServer)
    assert isinstance(eio.sockets, dict)
    assert eio._async["websocket"] is eio_aiohttp.WebSocket
    socket = async_socket.AsyncSocket(eio, "sid")
    assert isinstance(socket.queue, asyncio.Queue)
    assert (socket.upgrading, socket.upgraded, socket.closed) == (False, False, False)
    assert inspect.iscoroutinefunction(socket.receive)
    # Engine.IO's disconnect, which we replace, is what it calls when a request fails.
    assert list(inspect.signature(engineio.AsyncServer.disconnect).parameters) == ["self", "sid"]
    assert "await self.disconnect(sid)" in inspect.getsource(engineio.AsyncServer.handle_request)
    assert "CONTENT_LENGTH" in inspect.getsource(async_socket.AsyncSocket.handle_post_request)
    assert inspect.iscoroutinefunction(socket.close)
    assert "environ" in inspect.getsource(eio_aiohttp.WebSocket.__call__)
    assert inspect.iscoroutinefunction(eio_aiohttp.WebSocket.wait)
    assert engineio.packet.UPGRADE == 5
    assert isinstance(server.manager, socketio.AsyncManager)
    for name in ("rooms", "pending_connect", "eio_to_sid"):
        assert hasattr(server.manager, name), name
    assert hasattr(server, "environ")


async def test_a_read_body_honours_its_size() -> None:
    body = _Body(b"abcdef")
    assert await body.read(2) == b"ab"
    assert await body.read(0) == b""
    assert await body.read(10) == b"cdef"
    assert await body.read() == b""
    assert await _Body(b"xyz").read() == b"xyz"


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_a_chunked_poll_body_is_read_and_bounded_as_any_other() -> None:
    """A POST without Content-Length: Engine.IO reads Content-Length bytes, so the body
    we hand it says its own length (the bug: the size was ignored, and a chunked body
    skipped Engine.IO's maxHttpBufferSize check)."""
    async with serving(max_message=64) as (url, server, http):
        _sid, query = await open_polling(url, http)
        async with http.post(url + query, data=chunks(b"4", b"0")) as response:
            assert response.status == 200
        assert (await poll(http, url + query))[0].startswith("40{")  # connected
        async with http.post(url + query, data=chunks(b"4", b"2" * 100)) as response:
            assert response.status == 400  # more than max_message: refused, dropped
        await settled(server)
        assert server.sessions == 0


@pytest.mark.parametrize("body", ["2", "6", "4" + "2" * 100])
async def test_a_poll_body_engineio_refuses_is_answered_at_once(body: str) -> None:
    """Engine.IO closes a session whose POST it refuses (an unknown packet, too large)
    and waited for the client to read the CLOSE packet: a client that never polls held
    that POST open for ever. Now it gets its 400 at once, and the session is gone."""
    async with serving(max_message=64) as (url, server, http):
        sid, query = await open_polling(url, http)
        assert await post(http, url + query, body) == 400
        await settled(server)
        assert server.sessions == 0
        assert sid not in server.sio.eio.sockets
