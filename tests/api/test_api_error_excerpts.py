"""Errors of every trustmesh HTTP API (``trustmesh.api.errors``) quote at most a short
excerpt of what the client sent: 64 KiB of garbage in, less than 1 KiB out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from trustmesh.api.errors import (
    MAX_EXCERPT,
    MAX_MESSAGE,
    ApiError,
    error_response,
    excerpt,
    json_body,
    json_errors,
)
from trustmesh.errors import ProtocolError

GARBAGE = bytes(range(256)) * 256  # 64 KiB


class BadThingError(ProtocolError):
    pass


async def echoing(request: web.Request) -> web.Response:
    """A handler whose error quotes the whole body, as a careless parser might."""
    raw = await request.read()
    raise BadThingError(f"cannot parse {raw!r}")


async def echoing_api_error(request: web.Request) -> web.Response:
    raw = await request.read()
    raise ApiError(400, f"cannot parse {raw.decode('latin-1')}")


async def form(request: web.Request) -> web.Response:
    return web.json_response(await json_body(request))


@pytest.fixture
async def origin() -> AsyncIterator[str]:
    app = web.Application(middlewares=[json_errors({BadThingError: (400, "bad_thing")})])
    app.router.add_post("/protocol", echoing)
    app.router.add_post("/api", echoing_api_error)
    app.router.add_post("/form", form)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def post(origin: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(origin + path, data=body, headers={"Content-Type": content_type}) as response,
    ):
        return response.status, await response.read()


async def test_64_kib_of_garbage_gets_a_small_json_error(origin: str) -> None:
    repeated = b"%01" * 30_000  # one field name given twice, 90 KB each time
    cases = [
        ("/protocol", GARBAGE, "application/octet-stream", "bad_thing"),
        ("/api", GARBAGE, "application/octet-stream", "bad_request"),
        ("/form", repeated + b"=1&" + repeated + b"=2", "application/x-www-form-urlencoded", ""),
    ]
    for path, body, content_type, code in cases:
        assert len(body) >= 64 * 1024
        status, reply = await post(origin, path, body, content_type)
        assert status == 400, reply
        assert len(reply) < 1024, (path, reply)
        data = json.loads(reply)
        assert len(data["message"]) <= MAX_MESSAGE
        if code:
            assert data["error"] == code


def test_excerpt_cuts_escapes_and_marks_the_cut() -> None:
    assert excerpt("short and plain") == "short and plain"
    cut = excerpt("x" * 1000)
    assert len(cut) == MAX_EXCERPT and cut.endswith("\u2026")
    assert excerpt("a\x00b\nc\u00e9") == "a\\x00b\\nc\\xe9"
    assert excerpt(b"\xff\x00" * 1000, 12) == "\\xff\\x00\\xf\u2026"
    assert len(excerpt(b"\xff" * 10, 12)) == 12
    assert excerpt(ValueError("boom")) == "boom"


def test_error_response_bounds_any_message() -> None:
    response = error_response(ApiError(400, "\u00e9" * 100_000))
    assert isinstance(response.body, bytes)
    assert len(response.body) < 1024
