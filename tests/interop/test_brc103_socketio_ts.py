"""BRC-103 over Socket.IO against the reference socket SDKs, both directions, with
certificates requested in both directions.

- The reference client, ``@bsv/authsocket-client`` 2.0.2 (socket.io-client 4.8.4, over
  @bsv/sdk 2.1.0; ``brc103_js/socket_client.mjs``), against our server: in this process
  (:class:`~trustmesh.io.brc103_socketio.SocketIoServer`, over Engine.IO polling with the
  upgrade to WebSocket that socket.io-client does by default, and over WebSocket only) and
  as ``trustmesh brc103 serve``.
- Our client (:func:`~trustmesh.io.brc103_socketio.connect`, and ``trustmesh brc103
  socket``) against a reference server.

The reference server package, ``@bsv/authsocket``, is not in the npm registry this
project installs from (``npm view @bsv/authsocket`` answers 404). ``socket_server.mjs``
therefore rebuilds its small wrapper from the same parts: a socket.io 4.8.4 ``Server``,
one @bsv/sdk 2.1.0 ``Peer`` per connection whose transport emits and receives the event
``authMessage``, and events carried as ``JSON.stringify({eventName, data})`` in general
messages, exactly as AuthSocketServer/SocketServerTransport 2.0.1 do (their source was
read for it). The client side is the published package itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from clitools import TRUSTMESH, clean_env
from ts_harness import JS_DIR, identity_key, require_node

from trustmesh.brc103.certificates import MasterCertificate
from trustmesh.brc103.messages import RequestedCertificates
from trustmesh.brc103.peer import CertificatesReceived, PeerConfig
from trustmesh.brc103.wallet import Wallet
from trustmesh.io.brc103 import AsyncPeer
from trustmesh.io.brc103_socketio import SocketIoServer, connect, echo_events

SERVER_KEY = "a1" * 32
CLIENT_KEY = "b2" * 32
CERTIFIER_KEY = "c3" * 32
SERVER_ID = identity_key(SERVER_KEY)
CLIENT_ID = identity_key(CLIENT_KEY)
CERTIFIER_ID = identity_key(CERTIFIER_KEY)
CERT_TYPE = base64.b64encode(b"trustmesh socket.io interop t 01").decode()
WAIT = 10.0  # any one exchange; each takes well under a second
CLIENT_FIELDS = {"name": "Alice", "role": "admin"}
SERVER_FIELDS = {"service": "echo", "site": "lab"}
# Each side asks the other for one field of a certificate by our certifier.
ASK_CLIENT = {"certifiers": [CERTIFIER_ID], "types": {CERT_TYPE: ["name"]}}
ASK_SERVER = {"certifiers": [CERTIFIER_ID], "types": {CERT_TYPE: ["service"]}}
DATA = {"text": "héllo / ünïcode", "list": [1, None, True], "n": -3}


def wallet(key: str) -> Wallet:
    return Wallet.from_hex(key)


def master(subject: str, fields: dict[str, str]) -> MasterCertificate:
    return MasterCertificate.issue(wallet(CERTIFIER_KEY), subject, CERT_TYPE, fields)


CLIENT_CERT = master(CLIENT_ID, CLIENT_FIELDS)
SERVER_CERT = master(SERVER_ID, SERVER_FIELDS)


def config(ask: dict[str, Any], own: MasterCertificate) -> PeerConfig:
    return PeerConfig(
        requested_certificates=RequestedCertificates.from_json(ask), certificates=[own]
    )


SOCKET_PACKAGES = ("@bsv/authsocket-client", "socket.io", "socket.io-client")


def node() -> str:
    """``node``, after checking that the Socket.IO packages are installed (a missing
    ``npm ci`` is a broken setup: the test fails, it is not skipped)."""
    executable = require_node()
    modules = JS_DIR / "node_modules"
    missing = [p for p in SOCKET_PACKAGES if not (modules / p / "package.json").is_file()]
    if missing:
        pytest.fail(
            f"npm packages {', '.join(missing)} are missing in {modules}; "
            f"scripts/dev test installs them (npm ci --prefix {JS_DIR})"
        )
    return executable


async def run_node(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a Node script to its end (within WAIT); its stdout, or a failure with stderr."""
    process = await asyncio.create_subprocess_exec(
        node(),
        str(JS_DIR / script),
        *args,
        cwd=JS_DIR,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WAIT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"{script} exited {process.returncode}: {stderr.decode()}"
    return stdout.decode()


@asynccontextmanager
async def first_line_process(*command: str, env: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
    """Start a server process, yield its first stdout line (JSON), stop it at the end."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=JS_DIR,
        env=env,
        stdin=subprocess.PIPE,  # the Node servers exit when it closes
        stdout=subprocess.PIPE,
        stderr=None,  # inherited: pytest shows it with a failing test
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), WAIT)
        assert line, f"{command[1]} ended before listening"
        yield json.loads(line)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), WAIT)
        except TimeoutError:
            process.kill()
            await process.wait()


def summary(certificates: list[Any]) -> list[tuple[str, str, dict[str, str]]]:
    return [(c["certifier"], c["subject"], c["fields"]) for c in certificates]


# --- the reference client against our server -------------------------------------------


@asynccontextmanager
async def our_server() -> AsyncIterator[tuple[str, list[CertificatesReceived]]]:
    """Our Socket.IO server (echo), asking clients for ASK_CLIENT and holding SERVER_CERT;
    yields its URL and the certificates its peers received."""
    received: list[CertificatesReceived] = []

    async def on_peer(peer: AsyncPeer) -> None:
        peer.on_certificates(received.append)
        await echo_events(peer)

    server = SocketIoServer(wallet(SERVER_KEY), on_peer, config(ASK_CLIENT, SERVER_CERT))
    app = web.Application()
    server.install(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", received
    finally:
        await runner.cleanup()


def reference_client_args(url: str, *extra: str) -> list[str]:
    return [
        "--key",
        CLIENT_KEY,
        "--event",
        "greet",
        "--data",
        json.dumps(DATA),
        "--request-certs",
        json.dumps(ASK_SERVER),
        *extra,
        url,
    ]


CLIENT_ENV = {"BRC103_CERTS": json.dumps([CLIENT_CERT.to_json()])}


def check_reference_client_result(output: str) -> None:
    result = json.loads(output)
    assert result["eventName"] == "echo"
    assert result["data"] == {"eventName": "greet", "data": DATA, "from": CLIENT_ID}
    assert result["serverIdentityKey"] == SERVER_ID
    # The reference client asked for "service" and could decrypt exactly that field.
    assert summary(result["certificatesReceived"]) == [
        (CERTIFIER_ID, SERVER_ID, {"service": "echo"})
    ]


@pytest.mark.parametrize("transports", [None, "websocket"], ids=["polling+upgrade", "websocket"])
async def test_reference_client_against_our_server(transports: str | None) -> None:
    extra = [] if transports is None else ["--transports", transports]
    async with our_server() as (url, received):
        output = await run_node(
            "socket_client.mjs", *reference_client_args(url, *extra), env=CLIENT_ENV
        )
    check_reference_client_result(output)
    # And our server got the client's certificate, with the field it asked for.
    [event] = received
    assert event.identity_key == CLIENT_ID
    [shown] = event.certificates
    assert (shown.certificate.certifier, shown.decrypted_fields) == (
        CERTIFIER_ID,
        {"name": "Alice"},
    )


async def test_reference_client_against_trustmesh_serve(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_text(SERVER_KEY)
    key.chmod(0o600)
    certificate = tmp_path / "server-cert.json"
    certificate.write_text(json.dumps(SERVER_CERT.to_json()))
    command = [
        TRUSTMESH,
        "brc103",
        "serve",
        "--port",
        "0",
        "--key",
        str(key),
        "--certificate",
        str(certificate),
        "--request-certificates",
        json.dumps(ASK_CLIENT),
    ]
    async with first_line_process(*command, env=clean_env()) as info:
        assert info["identityKey"] == SERVER_ID
        # The server holds the client's event until its certificate validates: the echo
        # coming back proves it did.
        output = await run_node(
            "socket_client.mjs", *reference_client_args(info["listening"]), env=CLIENT_ENV
        )
    check_reference_client_result(output)


# --- our client against the reference server -------------------------------------------


@asynccontextmanager
async def reference_server() -> AsyncIterator[str]:
    env = {
        **os.environ,
        "BRC103_KEY": SERVER_KEY,
        "BRC103_REQUEST_CERTS": json.dumps(ASK_CLIENT),
        "BRC103_CERTS": json.dumps([SERVER_CERT.to_json()]),
        "BRC103_EXIT_ON_STDIN_EOF": "1",
    }
    async with first_line_process(node(), str(JS_DIR / "socket_server.mjs"), env=env) as info:
        assert info["identityKey"] == SERVER_ID
        yield str(info["listening"])


async def test_our_client_against_reference_server() -> None:
    received: list[CertificatesReceived] = []
    async with (
        reference_server() as url,
        connect(url, wallet(CLIENT_KEY), config(ASK_SERVER, CLIENT_CERT)) as client,
    ):
        client.peer.on_certificates(received.append)
        async with asyncio.timeout(WAIT):
            assert await client.emit("greet", DATA) == SERVER_ID
            echo = await client.next_event()
            await client.emit("certs")
            certs = await client.next_event()
    assert echo == ("echo", {"eventName": "greet", "data": DATA, "from": CLIENT_ID}, SERVER_ID)
    # The reference server asked for "name" and decrypted exactly that.
    name, data, sender = certs
    assert (name, sender) == ("certs", SERVER_ID)
    assert summary(data["certificates"]) == [(CERTIFIER_ID, CLIENT_ID, {"name": "Alice"})]
    [event] = received
    [shown] = event.certificates
    assert (event.identity_key, shown.decrypted_fields) == (SERVER_ID, {"service": "echo"})


async def test_trustmesh_socket_against_reference_server(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text(CLIENT_KEY)
    key.chmod(0o600)
    certificate = tmp_path / "client-cert.json"
    certificate.write_text(json.dumps(CLIENT_CERT.to_json()))
    async with reference_server() as url:
        process = await asyncio.create_subprocess_exec(
            TRUSTMESH,
            "brc103",
            "socket",
            url,
            "--event",
            "greet",
            "--data",
            json.dumps(DATA),
            "--key",
            str(key),
            "--certificate",
            str(certificate),
            "--request-certificates",
            json.dumps(ASK_SERVER),
            "--timeout",
            str(WAIT),
            "-v",
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
    assert process.returncode == 0, stderr.decode()
    [line] = stdout.decode().splitlines()
    assert json.loads(line) == {
        "eventName": "echo",
        "data": {"eventName": "greet", "data": DATA, "from": CLIENT_ID},
        "authenticated": True,
        "identityKey": SERVER_ID,
    }
    said = stderr.decode()
    assert f"authenticated: event echo from {SERVER_ID}" in said
    assert '"service": "echo"' in said
