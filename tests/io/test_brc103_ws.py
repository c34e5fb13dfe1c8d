"""BRC-103 over WebSocket: real aiohttp server and client on loopback."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import WSCloseCode, web

from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.messages import RequestedCertificates
from trustmesh.brc103.peer import CertificatesReceived, PeerConfig
from trustmesh.brc103.wallet import Wallet
from trustmesh.io.brc103 import AsyncPeer
from trustmesh.io.brc103_ws import connect, websocket_handler

OnPeer = Callable[[AsyncPeer], Coroutine[Any, Any, None]]


async def _echo(peer: AsyncPeer) -> None:
    async def answer(event: Any) -> None:
        await peer.send_general(b"echo:" + event.payload, identity_key=event.identity_key)

    peer.on_general_message(answer)
    await asyncio.Event().wait()


async def _start(
    wallet: Wallet, on_peer: OnPeer, config: PeerConfig | None = None
) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/ws", websocket_handler(wallet, on_peer, config))
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/ws"


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[Wallet, str]]:
    wallet = Wallet.generate()
    runner, url = await _start(wallet, _echo)
    try:
        yield wallet, url
    finally:
        await runner.cleanup()


async def test_handshake_and_messages_both_ways(echo_server: tuple[Wallet, str]) -> None:
    server, url = echo_server
    async with connect(url, Wallet.generate()) as peer:
        assert await peer.send_general(b"one") == server.identity_key
        await peer.send_general(b"two", identity_key=server.identity_key)
        async with asyncio.timeout(5):
            first, second = await peer.receive(), await peer.receive()
    assert (first.payload, second.payload) == (b"echo:one", b"echo:two")
    assert first.identity_key == server.identity_key


async def test_two_clients_get_their_own_sessions(echo_server: tuple[Wallet, str]) -> None:
    _, url = echo_server
    async with connect(url, Wallet.generate()) as a, connect(url, Wallet.generate()) as b:
        await asyncio.gather(a.send_general(b"from a"), b.send_general(b"from b"))
        async with asyncio.timeout(5):
            got_a, got_b = await a.receive(), await b.receive()
    assert (got_a.payload, got_b.payload) == (b"echo:from a", b"echo:from b")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00binary", WSCloseCode.UNSUPPORTED_DATA),
        ("not json", WSCloseCode.INVALID_TEXT),
        ('{"version": "0.2", "messageType": "general"}', WSCloseCode.INVALID_TEXT),
    ],
)
async def test_unframeable_input_closes_the_socket(
    echo_server: tuple[Wallet, str], frame: bytes | str, code: int
) -> None:
    _, url = echo_server
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        if isinstance(frame, bytes):
            await ws.send_bytes(frame)
        else:
            await ws.send_str(frame)
        async with asyncio.timeout(5):
            message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == code


async def test_certificates_over_websocket() -> None:
    certifier, client, server = Wallet.generate(), Wallet.generate(), Wallet.generate()
    cert_type = base64.b64encode(os.urandom(32)).decode()
    master = MasterCertificate.issue(
        certifier, client.identity_key, cert_type, {"name": "Alice", "age": "30"}
    )
    requested = RequestedCertificates((certifier.identity_key,), {cert_type: ("age",)})
    seen: asyncio.Queue[CertificatesReceived] = asyncio.Queue()

    async def on_peer(peer: AsyncPeer) -> None:
        peer.on_certificates(seen.put_nowait)
        await _echo(peer)

    runner, url = await _start(server, on_peer, PeerConfig(requested_certificates=requested))
    try:
        async with connect(url, client, PeerConfig(certificates=[master])) as peer:
            await peer.send_general(b"hello")  # held by the server until the cert validates
            async with asyncio.timeout(5):
                reply = await peer.receive()
                received = await seen.get()
        assert reply.payload == b"echo:hello"
        assert received.identity_key == client.identity_key
        assert [c.decrypted_fields for c in received.certificates] == [{"age": "30"}]
    finally:
        await runner.cleanup()
