"""The Python reference client (bsv-sdk's AuthFetch) against our BRC-104 server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from bsv.auth.clients.auth_fetch import AuthFetch as ReferenceAuthFetch
from bsv.auth.clients.auth_fetch import SimplifiedFetchRequestOptions

from bench.anchors.bsv_peer import ReferenceWallet, _private_key, silence_bsv_debug_output
from trustmesh.api.brc104 import Brc104Server
from trustmesh.api.brc104_demo import demo_app
from trustmesh.brc103.wallet import Wallet

CLIENT_KEY = "bca172ee62ab679fb941dc855721f98edba343dbfc7b766cd34690369a595f9e"
CLIENT_ID = Wallet.from_hex(CLIENT_KEY).identity_key


@pytest.fixture
async def server_url() -> AsyncIterator[str]:
    runner = web.AppRunner(demo_app(Brc104Server(Wallet.generate())), shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _client() -> Any:
    silence_bsv_debug_output()
    return ReferenceAuthFetch(ReferenceWallet(_private_key(CLIENT_KEY)), None)


async def _fetch(client: Any, url: str, options: Any = None) -> Any:
    # The reference client blocks (threads and events): keep it off the server's loop.
    async with asyncio.timeout(40):
        return await asyncio.to_thread(client.fetch, url, options)


async def test_reference_client_gets_authenticated_answers(server_url: str) -> None:
    client = _client()
    hello = await _fetch(client, server_url + "/hello")
    assert hello.status_code == 200
    assert json.loads(hello.text) == {"hello": CLIENT_ID}
    options = SimplifiedFetchRequestOptions(
        "POST", {"content-type": "application/json"}, b'{"a": [1, 2]}'
    )
    echo = await _fetch(client, server_url + "/echo", options)
    assert (echo.status_code, echo.text) == (200, '{"a": [1, 2]}')


async def test_reference_client_url_without_a_path(server_url: str) -> None:
    # bsv-sdk signs a URL with no path as "no path" (-1) where everyone else signs "/":
    # the server accepts both, so the request is authenticated (a signed 404 here).
    response = await _fetch(_client(), server_url)
    assert response.status_code == 404
