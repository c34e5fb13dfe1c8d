"""``trustmesh brc103 socket`` against ``trustmesh brc103 serve`` (BRC-103 over Socket.IO,
same port as BRC-104), and its exit codes: 0 only for an authenticated answer, 1 for a
plain Socket.IO event or no answer, 2 for usage errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import socketio  # type: ignore[import-untyped]
from aiohttp import web
from clitools import TRUSTMESH, clean_env

WAIT = 10.0


async def trustmesh(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        TRUSTMESH,
        *args,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WAIT + 5):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@asynccontextmanager
async def served(*args: str) -> AsyncIterator[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        TRUSTMESH,
        "brc103",
        "serve",
        "--port",
        "0",
        *args,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None,  # inherited: pytest shows it with a failing test
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), WAIT)
        assert line, "serve ended before listening"
        yield json.loads(line)
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), WAIT)
        except TimeoutError:
            process.kill()
            await process.wait()


async def test_socket_gets_an_authenticated_echo_from_serve(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("b2" * 32)
    key.chmod(0o600)
    async with served() as info:
        url = info["listening"]
        code, out, err = await trustmesh(
            "brc103", "socket", url, "--event", "hi", "--data", '{"a":[1,"ü"]}', "--key", str(key)
        )
        # BRC-104 still answers on the same port.
        fetched = await trustmesh("brc103", "fetch", url + "/hello")
    assert code == 0, err
    [line] = out.splitlines()
    result = json.loads(line)
    client_id = result["data"]["from"]
    assert result == {
        "eventName": "echo",
        "data": {"eventName": "hi", "data": {"a": [1, "ü"]}, "from": client_id},
        "authenticated": True,
        "identityKey": info["identityKey"],
    }
    assert len(client_id) == 66
    assert fetched[0] == 0 and "hello" in json.loads(fetched[1])


async def test_socket_exits_1_for_a_plain_event() -> None:
    """A server that answers with an ordinary Socket.IO event, signed by no one."""
    sio = socketio.AsyncServer(async_mode="aiohttp")

    async def on_connect(sid: str, _environ: Any, _auth: Any = None) -> None:
        await sio.emit("echo", {"forged": True}, to=sid)

    sio.on("connect", on_connect)
    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        code, out, err = await trustmesh("brc103", "socket", url, "--event", "hi", "--timeout", "5")
    finally:
        await runner.cleanup()
    assert code == 1
    assert json.loads(out) == {
        "eventName": "echo",
        "data": {"forged": True},
        "authenticated": False,
        "identityKey": None,
    }
    assert err.strip() == "trustmesh: error: the first event (echo) was not authenticated"


async def test_socket_exits_1_with_one_line_when_nothing_listens() -> None:
    code, out, err = await trustmesh(
        "brc103", "socket", "http://127.0.0.1:1", "--event", "hi", "--timeout", "3"
    )
    assert (code, out) == (1, "")
    [line] = err.splitlines()
    assert line.startswith("trustmesh: error: cannot connect to http://127.0.0.1:1")


async def test_socket_usage_errors_exit_2() -> None:
    for args in (
        ["http://127.0.0.1:1"],  # no --event
        ["http://127.0.0.1:1/path", "--event", "x"],
        ["ftp://127.0.0.1:1", "--event", "x"],
        ["http://127.0.0.1:1", "--event", "x", "--data", "{"],
    ):
        code, out, _err = await trustmesh("brc103", "socket", *args)
        assert (code, out) == (2, ""), args
