"""Plain HTTP on a Unix socket (``serve_unix_app``, ``Listener.listen_unix``): the socket
file is 0600 from the moment anyone can connect, it goes when the server stops, a file
left by a dead process is replaced, a live server's is refused, and its connections are
held to the listener's resource policy like any other."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from trustmesh.io.https import HttpServer, serve_unix_app
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.listener import LOCAL_SOURCE, MAX_UNIX_PATH, unix_address


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"hello": request.remote})


def app() -> web.Application:
    application = web.Application()
    application.router.add_get("/hello", hello)
    return application


async def get(path: Path, route: str = "/hello") -> tuple[int, bytes]:
    with unix_address(path) as address:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=address)) as session,
            session.get(f"http://localhost{route}") as response,
        ):
            return response.status, await response.read()


async def test_the_socket_is_0600_serves_and_goes_away_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    old = os.umask(0)  # whatever the umask, the file is 0600
    try:
        server = await serve_unix_app(app(), path)
    finally:
        os.umask(old)
    try:
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert server.listener.path == path
        assert server.site.name == f"http+unix://{path}"
        assert await get(path) == (200, b'{"hello": ""}')
    finally:
        await server.stop()
    assert not path.exists()


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a process that died: its file stays, no one listens
    dead.close()
    assert path.exists()
    server = await serve_unix_app(app(), path)
    try:
        assert (await get(path))[0] == 200
        with pytest.raises(OSError, match="another running process serves it") as live:
            await serve_unix_app(app(), path)
        assert live.value.errno == errno.EADDRINUSE
        assert (await get(path))[0] == 200  # the refused one took nothing away
    finally:
        await server.stop()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="no socket") as in_the_way:
        await serve_unix_app(app(), path)
    assert in_the_way.value.errno == errno.EADDRINUSE
    assert path.read_text() == "not a socket"


async def test_stop_leaves_a_newer_servers_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    first = await serve_unix_app(app(), path)
    path.unlink()  # say, an operator cleaning up; then another server takes the name
    second = await serve_unix_app(app(), path)
    try:
        await first.stop()
        assert (await get(path))[0] == 200
    finally:
        await second.stop()
    assert not path.exists()


async def test_a_path_too_long_for_a_socket_address_still_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "api.sock"
    assert len(os.fsencode(path)) > MAX_UNIX_PATH
    with socket.socket(socket.AF_UNIX) as plain, pytest.raises(OSError):
        plain.bind(str(path))  # the path itself is too long for bind()
    server = await serve_unix_app(app(), path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert (await get(path))[0] == 200
    finally:
        await server.stop()
    assert not path.exists()


async def test_local_clients_are_held_to_the_policy(tmp_path: Path) -> None:
    """Every client of the socket counts under one source: the policy's per-source cap
    holds for them all, and the limit counters say so."""
    path = tmp_path / "api.sock"
    policy = ResourcePolicy(max_per_source=2, max_unauthenticated_per_source=2)
    server: HttpServer = await serve_unix_app(app(), path, policy=policy)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(2):
            held.append(await asyncio.open_unix_connection(str(path)))
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await reader.read() == b""  # refused: reset at once
        writer.close()
        counts = server.listener.stats.snapshot()
        assert counts == {"refused.per_source": 1}
        assert server.listener.table.per_source(LOCAL_SOURCE) == 2
    finally:
        for _, held_writer in held:
            held_writer.close()
        await server.stop()
