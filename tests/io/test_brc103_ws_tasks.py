"""The BRC-103 WebSocket server runs at most ``max_tasks`` tasks per connection.

A client sends 3,000 general messages to a server whose async listener blocks: the
server's peer never has more than its cap of listeners running (it stops reading the
socket instead), and once the listener is let go every message is delivered, in order,
none dropped. Before the cap, each message made one more live task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from trustmesh.brc103.messages import AuthMessage, parse_message_bytes
from trustmesh.brc103.peer import GeneralMessageReceived, HandshakeCompleted, Peer
from trustmesh.brc103.wallet import Wallet
from trustmesh.io.brc103 import MAX_TASKS, AsyncPeer, MemoryTransport
from trustmesh.io.brc103_ws import websocket_handler
from trustmesh.io.limits import ResourcePolicy

WAIT = 20.0  # upper bound on any one wait; each takes far less
WATCH = 1.0  # how long the server is watched for reading past its cap
SERVER = Wallet.from_hex("e3" * 32)
CLIENT = Wallet.from_hex("e4" * 32)
MESSAGES = 3000


class BlockedListener:
    """An async listener that holds every message until ``gate`` opens, counting how many
    it holds at once."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = 0
        self.most = 0
        self.delivered: list[bytes] = []
        self.all_delivered = asyncio.Event()
        self.at_cap = asyncio.Event()
        self.over_cap = asyncio.Event()
        self.peers: list[AsyncPeer] = []
        self.peer_most = 0  # the peer's own count of tasks in flight, at its highest
        self.cap = MAX_TASKS

    async def on_peer(self, peer: AsyncPeer) -> None:
        self.peers.append(peer)
        peer.on_general_message(self.listener)
        await asyncio.Event().wait()

    async def listener(self, event: GeneralMessageReceived) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        for peer in self.peers:
            self.peer_most = max(self.peer_most, peer.tasks_in_flight)
        if self.running >= self.cap:
            self.at_cap.set()
        if self.running > self.cap:
            self.over_cap.set()
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        self.delivered.append(event.payload)
        if len(self.delivered) == MESSAGES:
            self.all_delivered.set()


@asynccontextmanager
async def ws_server(listener: BlockedListener) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/ws", websocket_handler(SERVER, listener.on_peer))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/ws"
    finally:
        await runner.cleanup()


def text(message: AuthMessage) -> str:
    return message.to_bytes().decode("utf-8")


def test_the_default_cap_is_the_resource_policys() -> None:
    assert ResourcePolicy().max_tasks == MAX_TASKS


async def test_a_blocked_listener_holds_at_most_max_tasks_and_loses_nothing() -> None:
    listener = BlockedListener()
    client = Peer(CLIENT)
    async with (
        ws_server(listener) as url,
        aiohttp.ClientSession() as http,
        http.ws_connect(url) as ws,
    ):
        await ws.send_str(text(client.initiate(0)))
        async with asyncio.timeout(WAIT):
            frame = await ws.receive()
        assert frame.type is WSMsgType.TEXT
        events = client.receive(parse_message_bytes(frame.data.encode("utf-8")), 1)
        assert [type(e) for e in events] == [HandshakeCompleted]
        payloads = [b"%d" % i for i in range(MESSAGES)]
        messages = [
            text(client.create_general(p, identity_key=SERVER.identity_key)) for p in payloads
        ]

        async def send_all() -> None:
            for message in messages:
                await ws.send_str(message)

        sender = asyncio.create_task(send_all())
        try:
            async with asyncio.timeout(WAIT):
                await listener.at_cap.wait()
            # The server must hold at the cap while the listener blocks, not read on.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(WATCH):
                    await listener.over_cap.wait()
            assert listener.most <= MAX_TASKS
            (peer,) = listener.peers
            assert peer.tasks_in_flight <= MAX_TASKS
            assert len(listener.delivered) == 0
            # Once the listener is let go, every message arrives, in order.
            listener.gate.set()
            async with asyncio.timeout(WAIT):
                await sender
                await listener.all_delivered.wait()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        assert listener.delivered == payloads
        assert listener.most <= MAX_TASKS
        assert listener.peer_most <= MAX_TASKS
        assert not peer.errors


# --- the cap itself, in memory -------------------------------------------------------------


async def settle(condition: Callable[[], bool]) -> bool:
    """Let the loop run (memory transports deliver on later iterations) until
    ``condition`` holds; whether it did."""
    for _ in range(200):
        if condition():
            return True
        await asyncio.sleep(0)
    return condition()


async def test_work_past_the_cap_waits_its_turn_in_order() -> None:
    a, b = MemoryTransport.pair()
    client = AsyncPeer(Peer(CLIENT), a)
    server = AsyncPeer(Peer(SERVER), b, max_tasks=2)
    listener = BlockedListener()
    listener.cap = 2
    listener.peers.append(server)
    server.on_general_message(listener.listener)
    try:
        for index in range(10):
            await client.send_general(b"%d" % index, identity_key=SERVER.identity_key)
        assert await settle(lambda: server.tasks_in_flight == 10 and listener.running == 2)
        await asyncio.sleep(0)
        assert listener.running == 2
        assert not server.has_room()
        room = asyncio.create_task(server.wait_for_room())
        await asyncio.sleep(0)
        assert not room.done()
        listener.gate.set()
        async with asyncio.timeout(WAIT):
            await room
            assert await settle(lambda: len(listener.delivered) == 10)
        assert listener.delivered == [b"%d" % i for i in range(10)]
        assert listener.most == 2
        assert listener.peer_most <= 10
        assert server.tasks_in_flight == 0
        assert server.has_room()
    finally:
        await client.close()
        await server.close()


async def test_close_drops_queued_work_quietly() -> None:
    a, b = MemoryTransport.pair()
    client = AsyncPeer(Peer(CLIENT), a)
    server = AsyncPeer(Peer(SERVER), b, max_tasks=1)
    listener = BlockedListener()
    server.on_general_message(listener.listener)
    for index in range(5):
        await client.send_general(b"%d" % index, identity_key=SERVER.identity_key)
    assert await settle(lambda: server.tasks_in_flight == 5)
    await server.close()  # a never-started coroutine would warn, and warnings fail tests
    await client.close()
    assert server.tasks_in_flight == 0
    assert listener.delivered == []


def test_max_tasks_below_one_is_refused() -> None:
    a, _ = MemoryTransport.pair()
    with pytest.raises(ValueError, match="max_tasks"):
        AsyncPeer(Peer(CLIENT), a, max_tasks=0)
