"""Talking to a running node's API from its own directory, with its own certificate.

The API presents the node's certificate, whose name is the node_id, so the client
checks the server against the mesh root *and* that name, whatever address it dials.
A running node writes ``run.json`` (its real addresses, when it listens on port 0).

A GET of a read-only route (``trustmesh.node.api.READ_ONLY_PATHS``: peers, anomalies,
health ...) goes to the node's local socket ``D/api.sock`` when it is there: plain HTTP,
no certificate and so no key passphrase (the socket's 0600 mode is the credential).
Without it (a node stopped, or an older one), the client falls back to mTLS.
"""

from __future__ import annotations

import contextlib
import errno
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from trustmesh.io.listener import unix_address
from trustmesh.keystore.filestore import passphrase_from_env_or_tty
from trustmesh.keystore.pkcs8 import is_encrypted
from trustmesh.mesh.errors import MeshError
from trustmesh.mesh.link import join_address, split_address
from trustmesh.node.config import NodeConfig, load_config
from trustmesh.node.runfile import API_SOCKET, RUN_FILE, running_pid

DEFAULT_TIMEOUT = 10.0
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


class NodeApiError(MeshError):
    """The node's API refused a request (``status`` and its JSON ``error`` code) or
    could not be reached (``status`` 0)."""

    def __init__(self, message: str, *, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def node_passphrase(directory: Path) -> bytes | None:
    """The key's passphrase ($TRUSTMESH_PASSPHRASE or a prompt), if node.key is encrypted."""
    key_file = directory / "node.key"
    if key_file.exists() and is_encrypted(key_file.read_bytes()):
        return passphrase_from_env_or_tty(key_file, confirm=False)
    return None


def api_url(directory: Path, config: NodeConfig) -> str:
    """Where the node's API listens: from run.json while it runs, else the config."""
    address = config.api
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        address = str(json.loads((directory / RUN_FILE).read_text())["api"])
    host, port = split_address(address, any_port=True)
    host = WILDCARDS.get(host, host)
    return f"https://{join_address(host, port)}"


Passphrase = bytes | None | Callable[[Path], bytes | None]


class NodeClient:
    """Requests to the node of ``directory``. ``passphrase``: node.key's, or a function
    of the directory that gives it (:func:`node_passphrase`), called only when a request
    needs mTLS. ``local``: send read-only GETs to the node's local socket when it is
    there (:attr:`socket`; None: always mTLS)."""

    def __init__(
        self,
        directory: Path,
        *,
        passphrase: Passphrase = None,
        timeout: float = DEFAULT_TIMEOUT,
        local: bool = True,
    ) -> None:
        self.directory = directory
        self.config = load_config(directory)
        self.url = api_url(directory, self.config)
        self.timeout = timeout
        self.socket: Path | None = directory / API_SOCKET if local else None
        self._passphrase = passphrase
        self._context: ssl.SSLContext | None = None
        if not callable(passphrase):
            self._context = self._load_context(passphrase)

    @property
    def _ssl(self) -> ssl.SSLContext:
        """The mTLS client context (node.crt and node.key), loaded when first needed."""
        if self._context is None:
            passphrase = self._passphrase
            if callable(passphrase):
                if running_pid(self.directory) is None:  # do not ask for nothing
                    raise NodeApiError(self._not_running())
                passphrase = passphrase(self.directory)
            self._context = self._load_context(passphrase)
        return self._context

    def _load_context(self, passphrase: bytes | None) -> ssl.SSLContext:
        directory = self.directory
        try:
            context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(
                str(directory / "node.crt"), str(directory / "node.key"), password=passphrase
            )
        except (OSError, ssl.SSLError) as exc:
            raise NodeApiError(f"cannot load {directory}'s certificate and key: {exc}") from None
        return context

    def _not_running(self) -> str:
        # No run.json, or one left by a node that died (kill -9, a crash): either way no
        # process serves the API, and a passphrase would not change that.
        return (
            f"cannot reach the node's API at {self.url}: {self.config.node_id} is not"
            f" running (no live process in {self.directory / RUN_FILE};"
            " start `trustmesh node run`)"
        )

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        from trustmesh.node.api import READ_ONLY_PATHS

        if self.socket is not None and path in READ_ONLY_PATHS and self.socket.exists():
            # A socket left by a node that died: over mTLS, which says so.
            with contextlib.suppress(_NoSocket):
                return await self._local_get(self.socket, path, params)
        return await self._request("GET", path, params=params)

    async def _local_get(self, socket: Path, path: str, params: dict[str, str]) -> dict[str, Any]:
        """GET ``path`` on the local socket (raises _NoSocket when no one serves it)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            with unix_address(socket) as address:
                async with (
                    aiohttp.ClientSession(
                        connector=aiohttp.UnixConnector(path=address), timeout=timeout
                    ) as session,
                    session.get(f"http://localhost{path}", params=params) as response,
                ):
                    text = await response.read()
                    status = response.status
        except aiohttp.ClientConnectorError as exc:
            if getattr(exc, "errno", None) == errno.EACCES:
                # Not ours to read (a service user's socket): say so, rather than fall
                # back to mTLS and fail on a passphrase or a key we cannot read either.
                raise NodeApiError(
                    f"permission denied on {socket}: run as the node's user (or root)"
                ) from None
            raise _NoSocket from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "os_error", None) or exc
            raise NodeApiError(f"cannot reach the node's API at {socket}: {reason}") from None
        return _answer(path, status, text)

    async def post(self, path: str, body: bytes) -> dict[str, Any]:
        return await self._request("POST", path, body=body)

    async def delete(self, path: str) -> dict[str, Any]:
        return await self._request("DELETE", path)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        context = self._ssl
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(
                    method,
                    self.url + path,
                    data=body,
                    params=params,
                    headers=headers,
                    ssl=context,
                    server_hostname=self.config.node_id,
                ) as response,
            ):
                text = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if running_pid(self.directory) is None:
                raise NodeApiError(self._not_running()) from None
            reason = getattr(exc, "os_error", None) or exc
            raise NodeApiError(f"cannot reach the node's API at {self.url}: {reason}") from None
        return _answer(path, status, text)


class _NoSocket(Exception):
    """No process serves the local socket (a file left by a node that died)."""


def _answer(path: str, status: int, text: bytes) -> dict[str, Any]:
    """The JSON object of an answer, or the NodeApiError it says."""
    try:
        data = json.loads(text)
    except ValueError:
        raise NodeApiError(f"{path}: the answer is not JSON", status=status) from None
    if status >= 400:
        message = data.get("message", "") if isinstance(data, dict) else ""
        code = data.get("error") if isinstance(data, dict) else None
        raise NodeApiError(f"{path}: {status} {code}: {message}", status=status, code=code)
    if not isinstance(data, dict):
        raise NodeApiError(f"{path}: the answer is not a JSON object", status=status)
    return data
