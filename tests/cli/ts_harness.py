"""Drives the TypeScript reference of BRC-103/BRC-104 (``tests/interop/brc103_js``) from tests.

Not a test module (no ``test_`` prefix); tests import it as ``ts_harness`` because the pytest
configuration puts ``tests/cli`` on the import path. The Node scripts are documented in their
own headers: ``server.mjs`` (express 5 + @bsv/auth-express-middleware 2.0.5), ``fetch.mjs``
(AuthFetch of @bsv/sdk 2.1.0, one request), ``certs.mjs`` (BRC-52 certificate operations).

Missing ``node`` or a missing ``npm ci`` is a broken setup, so the helpers fail the test (never
skip): ``scripts/dev test`` installs both.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

import coincurve
import pytest

JS_DIR = Path(__file__).resolve().parent.parent / "interop" / "brc103_js"
# What package.json pins; all three must be installed for any script to run.
REQUIRED_PACKAGES = ("@bsv/sdk", "@bsv/auth-express-middleware", "express")

# fetch.mjs's own timeout; the Python-side timeouts add a margin for Node's start-up (~0.3 s).
FETCH_TIMEOUT_MS = 15_000
PROCESS_MARGIN_S = 10.0
# fetch.mjs exits with 3 when its own timeout fires (AuthFetch hangs instead of failing when a
# response does not verify, e.g. every empty-bodied response of the express server).
FETCH_TIMEOUT_EXIT = 3


class TsScriptError(RuntimeError):
    """A Node script exited non-zero; ``returncode`` and ``stderr`` say why."""

    def __init__(self, script: str, returncode: int, stderr: str) -> None:
        super().__init__(f"{script} exited with {returncode}:\n{stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


class TsServer(NamedTuple):
    """A running ``server.mjs``: its base URL (no trailing slash) and identity key."""

    url: str
    identity_key: str
    process: subprocess.Popen[bytes]


def node_modules_dir() -> Path:
    """``tests/interop/brc103_js/node_modules``; fails the test if the packages are missing."""
    modules = JS_DIR / "node_modules"
    missing = [p for p in REQUIRED_PACKAGES if not (modules / p / "package.json").is_file()]
    if missing:
        pytest.fail(
            f"npm packages {', '.join(missing)} are missing in {modules}; "
            f"scripts/dev test installs them (npm ci --prefix {JS_DIR})"
        )
    return modules


def require_node() -> str:
    """The ``node`` executable, after checking the npm packages; fails the test otherwise."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (Node.js >= 20) is missing; scripts/dev test installs it")
    node_modules_dir()
    return node


def identity_key(private_key_hex: str) -> str:
    """The compressed public key (66 hex digits) of a secp256k1 private key."""
    key = coincurve.PrivateKey(bytes.fromhex(private_key_hex))
    return key.public_key.format(compressed=True).hex()


def _script_env(private_key_hex: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRC103_")}
    if private_key_hex is not None:
        env["BRC103_KEY"] = private_key_hex
    env.update(extra or {})
    return env


@contextmanager
def start_ts_server(
    private_key_hex: str,
    env: Mapping[str, str] | None = None,
    *,
    request_certificates: Mapping[str, Any] | None = None,
    certificates: list[dict[str, Any]] | None = None,
    timeout: float = 15.0,
) -> Iterator[TsServer]:
    """Runs ``server.mjs`` until the block ends; yields ``(url, identity_key, process)``.

    ``request_certificates`` ({"certifiers": [...], "types": {...}}) makes the server request
    certificates from every client; ``certificates`` (MasterCertificate JSON objects whose
    subject is the server) are what it presents when a client requests some. ``env`` adds
    further variables (e.g. ``{"BRC103_LOG": "debug"}``: the middleware's log, on the server's
    stderr, which pytest captures and shows for a failing test).
    """
    node = require_node()
    extra = {"BRC103_EXIT_ON_STDIN_EOF": "1", **(env or {})}
    if request_certificates is not None:
        extra["BRC103_REQUEST_CERTS"] = json.dumps(request_certificates)
    if certificates is not None:
        extra["BRC103_CERTS"] = json.dumps(certificates)
    # stderr is inherited: pytest captures it and shows it with the failing test.
    process = subprocess.Popen(
        [node, str(JS_DIR / "server.mjs")],
        cwd=JS_DIR,
        env=_script_env(private_key_hex, extra),
        stdin=subprocess.PIPE,  # the server exits when this closes (even if we are killed)
        stdout=subprocess.PIPE,
    )
    try:
        line = _first_line(process, timeout)
        if not line:
            process.wait(timeout=5)
            pytest.fail(
                f"server.mjs exited ({process.returncode}) before listening; "
                "its error is in the captured stderr"
            )
        ready = json.loads(line)
        yield TsServer(ready["listening"], ready["identityKey"], process)
    finally:
        _stop(process)


def _first_line(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The first stdout line (b"" at EOF), read by a thread so that a timeout applies."""
    assert process.stdout is not None
    stdout = process.stdout
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"server.mjs printed nothing within {timeout} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def ts_request(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: str | bytes | None = None,
) -> dict[str, Any]:
    """One entry of :func:`ts_fetch_session`.

    A str body is sent as its UTF-8 bytes. Bytes are handed to AuthFetch as a Uint8Array,
    which AuthFetch 2.1.0 sends as ``JSON.stringify(array)`` = '{"0":..,"1":..}' (the TS
    client cannot send arbitrary bytes). A body needs a content-type header; AuthFetch accepts
    only content-type, authorization and x-bsv-* (not x-bsv-auth*) request headers.
    """
    request: dict[str, Any] = {"url": url, "method": method, "headers": dict(headers or {})}
    if isinstance(body, bytes):
        request["bodyHex"] = body.hex()
    elif body is not None:
        request["body"] = body
    return request


def _fetch_command(timeout_ms: int, request_certificates: Mapping[str, Any] | None) -> list[str]:
    args = [require_node(), str(JS_DIR / "fetch.mjs"), "--batch", "--timeout-ms", str(timeout_ms)]
    if request_certificates is not None:
        args += ["--request-certs", json.dumps(request_certificates)]
    return args


def _fetch_env(private_key_hex: str, certificates: list[dict[str, Any]] | None) -> dict[str, str]:
    extra = {} if certificates is None else {"BRC103_CERTS": json.dumps(certificates)}
    return _script_env(private_key_hex, extra)


def _results(script: str, returncode: int, stdout: bytes, stderr: bytes) -> Any:
    if returncode != 0:
        raise TsScriptError(script, returncode, stderr.decode(errors="replace"))
    return json.loads(stdout)


def ts_fetch_session(
    requests: Sequence[Mapping[str, Any]],
    *,
    private_key_hex: str,
    timeout_ms: int = FETCH_TIMEOUT_MS,
    request_certificates: Mapping[str, Any] | None = None,
    certificates: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Requests (see :func:`ts_request`) sent in order by ONE TS AuthFetch client.

    One handshake per origin, then its session is reused. Returns one result per request:
    ``{"status", "headers", "body", "bodyHex", "certificatesReceived"}`` (see fetch.mjs).
    Raises :class:`TsScriptError` on failure (``returncode == FETCH_TIMEOUT_EXIT`` when the
    whole batch did not finish within ``timeout_ms``: AuthFetch hangs rather than fails when a
    response does not verify). ``request_certificates`` is requested from servers in the
    handshake; ``certificates`` (MasterCertificate JSON objects whose subject is this client)
    answer servers' requests. Blocks: from an asyncio test whose server runs in the same loop
    use :func:`ts_fetch_session_async`.
    """
    done = subprocess.run(
        _fetch_command(timeout_ms, request_certificates),
        cwd=JS_DIR,
        env=_fetch_env(private_key_hex, certificates),
        input=json.dumps(list(requests)).encode(),
        capture_output=True,
        timeout=timeout_ms / 1000 + PROCESS_MARGIN_S,
        check=False,
    )
    results: list[dict[str, Any]] = _results("fetch.mjs", done.returncode, done.stdout, done.stderr)
    return results


async def ts_fetch_session_async(
    requests: Sequence[Mapping[str, Any]],
    *,
    private_key_hex: str,
    timeout_ms: int = FETCH_TIMEOUT_MS,
    request_certificates: Mapping[str, Any] | None = None,
    certificates: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """:func:`ts_fetch_session` without blocking the event loop."""
    process = await asyncio.create_subprocess_exec(
        *_fetch_command(timeout_ms, request_certificates),
        cwd=JS_DIR,
        env=_fetch_env(private_key_hex, certificates),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_ms / 1000 + PROCESS_MARGIN_S):
            stdout, stderr = await process.communicate(json.dumps(list(requests)).encode())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    results: list[dict[str, Any]] = _results("fetch.mjs", process.returncode, stdout, stderr)
    return results


def ts_fetch(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: str | bytes | None = None,
    *,
    private_key_hex: str,
    timeout_ms: int = FETCH_TIMEOUT_MS,
    request_certificates: Mapping[str, Any] | None = None,
    certificates: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One request (fresh client, fresh handshake); see :func:`ts_fetch_session`."""
    return ts_fetch_session(
        [ts_request(url, method, headers, body)],
        private_key_hex=private_key_hex,
        timeout_ms=timeout_ms,
        request_certificates=request_certificates,
        certificates=certificates,
    )[0]


async def ts_fetch_async(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: str | bytes | None = None,
    *,
    private_key_hex: str,
    timeout_ms: int = FETCH_TIMEOUT_MS,
    request_certificates: Mapping[str, Any] | None = None,
    certificates: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """:func:`ts_fetch` without blocking the event loop (for servers in the test's loop)."""
    results = await ts_fetch_session_async(
        [ts_request(url, method, headers, body)],
        private_key_hex=private_key_hex,
        timeout_ms=timeout_ms,
        request_certificates=request_certificates,
        certificates=certificates,
    )
    return results[0]


def ts_certs(command: Mapping[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """Runs one ``certs.mjs`` command (``op`` = issue, reveal, verify, decrypt or binary).

    See the header of certs.mjs for each command's fields and result. Each call starts Node
    (~0.4 s); for many commands use :func:`ts_certs_worker`.
    """
    done = subprocess.run(
        [require_node(), str(JS_DIR / "certs.mjs")],
        cwd=JS_DIR,
        env=_script_env(None, None),
        input=json.dumps(command).encode(),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    result: dict[str, Any] = _results("certs.mjs", done.returncode, done.stdout, done.stderr)
    return result


class TsCerts:
    """A running ``certs.mjs --lines``: call it like :func:`ts_certs`."""

    def __init__(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._timeout = timeout
        self._lines: queue.Queue[bytes] = queue.Queue()
        stdout = process.stdout
        # One reader for the worker's lifetime; it ends at EOF (b"" is queued then).
        threading.Thread(target=self._read, args=(stdout,), daemon=True).start()

    def _read(self, stdout: IO[bytes]) -> None:
        for line in iter(stdout.readline, b""):
            self._lines.put(line)
        self._lines.put(b"")

    def __call__(self, command: Mapping[str, Any]) -> dict[str, Any]:
        self._stdin.write(json.dumps(command).encode() + b"\n")
        self._stdin.flush()
        try:
            line = self._lines.get(timeout=self._timeout)
        except queue.Empty:
            pytest.fail(f"certs.mjs did not answer within {self._timeout} s: {command!r}")
        if not line:
            raise TsScriptError("certs.mjs --lines", self._process.wait(), "worker ended early")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise TsScriptError("certs.mjs --lines", 1, str(answer["error"]))
        result: dict[str, Any] = answer["result"]
        return result


@contextmanager
def ts_certs_worker(timeout: float = 15.0) -> Iterator[TsCerts]:
    """A ``certs.mjs --lines`` worker for the block (one Node start-up for many commands)."""
    process = subprocess.Popen(
        [require_node(), str(JS_DIR / "certs.mjs"), "--lines"],
        cwd=JS_DIR,
        env=_script_env(None, None),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        yield TsCerts(process, timeout)
    finally:
        _stop(process)
