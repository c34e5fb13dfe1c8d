"""The mesh dashboard: a read-only web page of what one node knows (docs/dashboard.md).

The node serves it on its API, behind the API's own authentication (mTLS, or the local
read-only socket), with :func:`add_dashboard_routes`:

- ``GET /dashboard/``: the page, and its script and style sheet (plain HTML, CSS and
  JavaScript from the package, no CDN; the graph is SVG drawn by the script).
- ``GET /dashboard/state.json``: the node's view of the mesh (:func:`node_state`): the
  nodes it knows (itself, its peers, the nodes of its address book, the nodes it cut
  off) and its links; each node's certificate expiry, link state and gossip score; the
  recent anomalies with their coverage among its links; the revocations and the CRL.
- ``GET /dashboard/events``: the same state, live, as Server-Sent Events: one ``state``
  event when a client connects and one each time the state changes.

A node knows its own links, not the links between other nodes: the graph draws every
node it knows, and the links it holds. A browser holds no mesh certificate:
``trustmesh node dashboard`` (:class:`DashboardProxy`) serves the page on 127.0.0.1 and
forwards to the node with the node's own credential, as ``kubectl proxy`` does.

Whatever the clients do, the node's work is bounded: the state is taken at most once
per ``interval`` (``state.json`` answers the copy taken last, if it is fresher than
that), one task takes it for every event stream, each stream holds only the number of
the last state it sent (no queue: a slow client skips the states it missed, and one
that stops reading is closed by the listener's ``write_stall_timeout``), and at most
``max_streams`` streams are open at once on each of the node's listeners (then 503 with
``Retry-After``): the mTLS API's and the local socket's are counted apart, so remote
clients holding every stream of the API cannot lock the local operator out, nor the
other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from cryptography import x509

from trustmesh.api.errors import ApiError, Handler, json_errors
from trustmesh.clock import Clock
from trustmesh.io.https import HttpServer, serve_app
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.listener import unix_address
from trustmesh.mesh.engine import GossipEngine
from trustmesh.mesh.node import NodeCore
from trustmesh.mesh.store import MeshStore
from trustmesh.mesh.trust import TrustView
from trustmesh.node.api import (
    API_LISTENER,
    LISTENER_KEY,
    LOCAL_LISTENER,
    NODE_KEY,
    READ_ONLY_ROUTES,
)
from trustmesh.node.client import NodeApiError, api_url
from trustmesh.node.config import load_config
from trustmesh.node.runfile import API_SOCKET, RUN_FILE

PREFIX = "/dashboard"
STATIC_PACKAGE = "trustmesh.node"
STATIC_DIR = "dashboard_static"
ASSETS = {  # served name -> content type (nothing else is read from the package)
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
INTERVAL = 0.5  # seconds: the state is taken at most this often
REFRESH = 5.0  # seconds: and at least this often while a stream is open
HEARTBEAT = 15.0  # seconds: a comment line on an idle stream (proxies close silent ones)
MAX_STREAMS = 8  # event streams open at once, per listener (the API, the local socket)
MAX_NODES = 256  # nodes in the graph (its own, its peers, then the address book's)
ANOMALIES = 20  # the most recent anomalies shown
CRL_ENTRIES = 50  # the most recent revocations listed by serial
RETRY_MS = 3000  # how soon a browser reconnects a stream that broke
MAX_FORWARDED = 4 * 1024 * 1024  # bytes of one non-streaming answer the proxy relays
PROXY_TIMEOUT = 10.0

# The page runs only its own script and style, talks only to its own origin, and is
# never framed.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --- what the dashboard reads of a node ------------------------------------------------------


class _Certified(Protocol):
    @property
    def certificate(self) -> x509.Certificate: ...


class DashboardNode(Protocol):
    """What the dashboard reads of a node (``trustmesh.node.runtime.MeshNode``)."""

    node_id: str
    clock: Clock
    core: NodeCore[Any]
    engine: GossipEngine
    trust: TrustView
    store: MeshStore
    listeners: list[Callable[[str, Any], None]]

    @property
    def identity(self) -> _Certified: ...

    @property
    def listen_address(self) -> str: ...

    def flush(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


def node_state(
    node: DashboardNode, *, anomalies: int = ANOMALIES, max_nodes: int = MAX_NODES
) -> dict[str, Any]:
    """What ``node`` knows of the mesh now, as the dashboard shows it (JSON)."""
    now = node.clock.time_ms()
    core = node.core
    cert = node.identity.certificate
    me: dict[str, Any] = {
        "id": node.node_id,
        "state": "self",
        "address": node.listen_address,
        "serial": format(cert.serial_number, "x"),
        "not_after_ms": _ms(cert.not_valid_after_utc),
        "renewal_due_ms": core.renewal.due_ms,
        "revoked": core.self_revoked,
    }
    nodes: dict[str, dict[str, Any]] = {node.node_id: me}
    links = []
    for peer_id in sorted(core.links):
        info = core.peers.get(peer_id)
        links.append(
            {
                "source": node.node_id,
                "target": peer_id,
                "direction": info.direction if info is not None else None,
            }
        )
    for peer_id, info in sorted(core.peers.items()):
        if len(nodes) >= max_nodes:
            break
        entry: dict[str, Any] = {
            "id": peer_id,
            "state": "connected" if peer_id in core.links else "disconnected",
            "address": info.address,
            "direction": info.direction,
            "last_seen_ms": info.last_seen,
            "serial": format(info.serial, "x") if info.serial is not None else None,
            "score": round(node.engine.score(peer_id, now), 2),
            "graylisted_until_ms": node.engine.graylisted_until(peer_id, now),
        }
        peer_cert = _peer_certificate(core.links.get(peer_id))
        if peer_cert is not None:
            entry["not_after_ms"] = _ms(peer_cert.not_valid_after_utc)
        nodes[peer_id] = entry
    records = core.book.records()
    for record in records:
        if len(nodes) >= max_nodes:
            break
        facts = _certificate_facts(record.chain[0]) if record.chain else None
        entry = nodes.setdefault(
            record.node_id, {"id": record.node_id, "state": "known", "address": None}
        )
        entry["record_expires_ms"] = record.expires
        if entry["address"] is None and record.addresses:
            entry["address"] = record.addresses[0]
        if facts is not None:
            for key, value in zip(("serial", "not_after_ms"), facts, strict=True):
                if entry.get(key) is None:
                    entry[key] = value
    for revoked in sorted(core.revoked_nodes):
        if revoked in nodes:
            nodes[revoked]["state"] = "revoked"
        elif len(nodes) < max_nodes:
            nodes[revoked] = {"id": revoked, "state": "revoked", "address": None}
    known = len(set(core.peers) | {r.node_id for r in records} | core.revoked_nodes)
    health = node.health()
    return {
        "node_id": node.node_id,
        "status": health.get("status", "ok"),
        "nodes": list(nodes.values()),
        "nodes_left_out": max(0, known + 1 - len(nodes)),
        "links": links,
        "link_counts": _link_counts(node),
        "anomalies": _anomalies(node, anomalies),
        "revocations": _revocations(node),
        "crl": _crl(node.trust),
    }


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _peer_certificate(link: object) -> x509.Certificate | None:
    """The certificate a linked peer presented (on its TLS session), if the link says."""
    tls = getattr(getattr(getattr(link, "driver", None), "core", None), "established", None)
    chain = getattr(tls, "peer_chain", None)
    return chain[0] if chain and isinstance(chain[0], x509.Certificate) else None


@lru_cache(maxsize=1024)
def _certificate_facts(der: bytes) -> tuple[str, int] | None:
    """(serial in hex, notAfter in Unix ms) of a peer record's certificate."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return format(cert.serial_number, "x"), _ms(cert.not_valid_after_utc)


def _link_counts(node: DashboardNode) -> dict[str, int]:
    states = getattr(node, "link_states", None)  # open links by state, on a MeshNode
    if callable(states):
        counts = states()
        if isinstance(counts, dict):
            return {str(k): int(v) for k, v in counts.items()}
    return {"up": len(node.core.links)}


def _anomalies(node: DashboardNode, limit: int) -> list[dict[str, Any]]:
    """The newest anomalies first, each with its coverage among this node's links."""
    node.flush()  # what arrived is shown once committed: commit what is pending
    linked = len(node.core.links)
    rows = []
    for indicator in reversed(node.store.indicators(limit=limit)):
        held, told = node.engine.spread_of(indicator.message_id)
        row = indicator.to_json()
        del row["meta"]  # free-form and up to a message's size: not for every state
        row["coverage"] = {"links": linked, "held": held, "sent": told}
        rows.append(row)
    return rows


def _revocations(node: DashboardNode) -> dict[str, Any]:
    trust = node.trust
    entries = _crl_entries(trust.crl_der) if trust.crl_der is not None else ()
    return {
        "nodes": sorted(node.core.revoked_nodes),
        "serials": len(trust.revoked),
        "recent": [{"serial": serial, "revoked_ms": when} for serial, when in entries],
    }


def _crl(trust: TrustView) -> dict[str, Any] | None:
    if trust.crl_der is None:
        return None
    facts = _crl_facts(trust.crl_der)
    return {
        "number": trust.crl_number,
        "this_update_ms": facts[0] if facts else None,
        "next_update_ms": facts[1] if facts else None,
    }


@lru_cache(maxsize=2)
def _crl_facts(der: bytes) -> tuple[int, int | None] | None:
    """(thisUpdate, nextUpdate) of a CRL, Unix ms (read once per CRL)."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        return None
    next_update = crl.next_update_utc
    return _ms(crl.last_update_utc), _ms(next_update) if next_update is not None else None


@lru_cache(maxsize=2)
def _crl_entries(der: bytes) -> tuple[tuple[str, int], ...]:
    """The CRL's most recent ``CRL_ENTRIES`` revocations: (serial in hex, Unix ms)."""
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        return ()
    entries = sorted(
        ((format(e.serial_number, "x"), _ms(e.revocation_date_utc)) for e in crl),
        key=lambda item: -item[1],
    )
    return tuple(entries[:CRL_ENTRIES])


# --- the live state ------------------------------------------------------------------------------


class Dashboard:
    """The state of one node, taken at most once per ``interval`` seconds and handed to
    every client: ``state.json`` answers and event streams (at most ``max_streams`` per
    listener)."""

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        *,
        clock_ms: Callable[[], int],
        interval: float = INTERVAL,
        refresh: float = REFRESH,
        heartbeat: float = HEARTBEAT,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        if interval <= 0 or refresh < interval or max_streams < 1:
            raise ValueError("need 0 < interval <= refresh and max_streams >= 1")
        self._snapshot = snapshot
        self._clock_ms = clock_ms
        self.interval = interval
        self.refresh = refresh
        self.heartbeat = heartbeat
        self.max_streams = max_streams  # per listener
        self.open_streams: dict[str, int] = {}  # by listener (API_LISTENER, LOCAL_LISTENER)
        self.version = 0  # bumped each time the state changes
        self.taken = 0  # states taken, for tests and curious operators
        self._state = ""  # the last state, JSON without its time
        self._body = b"{}"  # ... with it: what state.json answers
        self._taken_at = -math.inf  # time.monotonic() of the last take
        self._changed = asyncio.Event()  # replaced (after being set) on every change
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = False  # the node's servers are stopping: streams end

    def poke(self) -> None:
        """Something happened at the node: take the state again soon (within
        ``interval``) if a stream is open."""
        self._poked.set()

    def current(self) -> bytes:
        """The state as JSON (with ``now_ms``, when it was taken), taken anew only if
        the last copy is older than ``interval``."""
        if time.monotonic() - self._taken_at >= self.interval:
            self._take()
        return self._body

    def _take(self) -> None:
        state = self._snapshot()
        self._taken_at = time.monotonic()
        self.taken += 1
        text = json.dumps(state, separators=(",", ":"), sort_keys=True)
        now = self._clock_ms()
        self._body = json.dumps({**state, "now_ms": now}, separators=(",", ":")).encode()
        if text != self._state:
            self._state = text
            self.version += 1
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def wait_changed(self, seen: int, within: float) -> bool:
        """Wait until the state's version is past ``seen``; False if ``within`` seconds pass."""
        if self.version != seen:
            return True
        changed = self._changed
        try:
            async with asyncio.timeout(within):
                await changed.wait()
        except TimeoutError:
            return False
        return True

    @property
    def streams(self) -> int:
        """Event streams open, on every listener."""
        return sum(self.open_streams.values())

    def open_stream(self, listener: str = API_LISTENER) -> None:
        """Count a new event stream on ``listener`` (raises a 503 when ``max_streams``
        are open there) and start the task that takes the state while any is."""
        if self.closed:
            raise ApiError(503, "the node is stopping", code="stopping")
        held = self.open_streams.get(listener, 0)
        if held >= self.max_streams:
            where = "the local socket" if listener == LOCAL_LISTENER else "the API"
            raise ApiError(
                503,
                f"{self.max_streams} dashboard streams are open already on {where};"
                " try again later",
                code="busy",
                headers={"Retry-After": str(max(1, round(self.refresh)))},
            )
        self.open_streams[listener] = held + 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def close_stream(self, listener: str = API_LISTENER) -> None:
        self.open_streams[listener] -= 1
        if self.streams == 0 and self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        """End every stream and stop taking the state (the node's servers are stopping:
        their shutdown need not wait for streams that would never end)."""
        self.closed = True
        self._changed.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        """Take the state after each poke (or every ``refresh`` without one), never
        twice within ``interval``."""
        while True:
            self._poked.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh):
                    await self._poked.wait()
            wait = self.interval - (time.monotonic() - self._taken_at)
            if wait > 0:
                await asyncio.sleep(wait)  # the rate limit, not a wait for a condition
            self._take()


def node_dashboard(node: DashboardNode, **settings: Any) -> Dashboard:
    """The dashboard of ``node`` (a node keeps it as its ``dashboard`` attribute, where
    :func:`mount_dashboard` finds it), woken by each of its events."""
    dashboard = Dashboard(lambda: node_state(node), clock_ms=node.clock.time_ms, **settings)
    node.listeners.append(lambda event, fields: dashboard.poke())
    return dashboard


# --- the routes -----------------------------------------------------------------------------------

DASHBOARD_KEY = web.AppKey("dashboard", Dashboard)
_ASSETS_KEY = web.AppKey("dashboard_assets", dict)


def mount_dashboard(app: web.Application) -> None:
    """``READ_ONLY_ROUTES``' hook: ``/dashboard/`` on each app that serves the node's
    read-only routes (its mTLS API and its local socket), one :class:`Dashboard` for
    both, if the node has one (``trustmesh.node.runtime.MeshNode`` does); each app's
    streams are counted under its ``LISTENER_KEY``."""
    dashboard = getattr(app[NODE_KEY], "dashboard", None)
    if isinstance(dashboard, Dashboard):
        add_dashboard_routes(app, dashboard)


if mount_dashboard not in READ_ONLY_ROUTES:
    READ_ONLY_ROUTES.append(mount_dashboard)


def add_dashboard_routes(app: web.Application, dashboard: Dashboard) -> None:
    """Serve ``dashboard`` under ``/dashboard/`` in ``app`` (whose middlewares decide who
    may read it); stop its task when ``app`` shuts down."""
    app[DASHBOARD_KEY] = dashboard
    app[_ASSETS_KEY] = load_assets()
    app.router.add_get(PREFIX, _redirect)
    app.router.add_get(PREFIX + "/", _index)
    app.router.add_get(PREFIX + "/state.json", _state)
    app.router.add_get(PREFIX + "/events", _events)
    app.router.add_get(PREFIX + "/{name}", _asset)

    async def stop(app: web.Application) -> None:
        await dashboard.close()

    app.on_shutdown.append(stop)


def load_assets() -> dict[str, bytes]:
    """The page's files from the package (small: read once)."""
    folder = resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR)
    return {name: folder.joinpath(name).read_bytes() for name in ASSETS}


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(PREFIX + "/")


async def _index(request: web.Request) -> web.Response:
    return _file(request, "index.html")


async def _asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS or name == "index.html":
        raise ApiError(404, "no such dashboard file")
    return _file(request, name)


def _proxied_path(tail: str) -> str | None:
    """The upstream path of a proxied request's tail under /dashboard/, or None when it
    is not one of the dashboard's own (no query string is forwarded: none is used)."""
    if tail in ("", "state.json", "events") or (tail in ASSETS and tail != "index.html"):
        return f"{PREFIX}/{tail}"
    return None


def _file(request: web.Request, name: str) -> web.Response:
    body = request.app[_ASSETS_KEY][name]
    return web.Response(body=body, headers={**HEADERS, "Content-Type": ASSETS[name]})


async def _state(request: web.Request) -> web.Response:
    body = request.app[DASHBOARD_KEY].current()
    return web.Response(
        body=body, headers={**HEADERS, "Content-Type": "application/json; charset=utf-8"}
    )


async def _events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: ``event: state`` with the state as JSON, when a client comes
    and whenever it changes; a comment line every ``heartbeat`` seconds otherwise."""
    headers = {
        **HEADERS,
        "Content-Type": "text/event-stream; charset=utf-8",
        "X-Accel-Buffering": "no",
    }
    if request.method == "HEAD":  # the headers only: no stream to hold open
        return web.Response(headers=headers)
    dashboard = request.app[DASHBOARD_KEY]
    listener = request.app.get(LISTENER_KEY, API_LISTENER)
    dashboard.open_stream(listener)
    response = web.StreamResponse(headers=headers)
    try:
        # A client that went away (ConnectionError) ends its stream, nothing more.
        with contextlib.suppress(ConnectionError):
            await _stream_states(response, request, dashboard)
    finally:
        dashboard.close_stream(listener)
    return response


async def _stream_states(
    response: web.StreamResponse, request: web.Request, dashboard: Dashboard
) -> None:
    """Each new state as an SSE event, a heartbeat comment when nothing changes."""
    await response.prepare(request)
    await response.write(f"retry: {RETRY_MS}\n\n".encode())
    seen = -1
    while not dashboard.closed:
        if seen != dashboard.version:
            body = dashboard.current()
            seen = dashboard.version
            await response.write(b"event: state\ndata: " + body + b"\n\n")
        elif not await dashboard.wait_changed(seen, dashboard.heartbeat):
            await response.write(b": still here\n\n")


# --- trustmesh node dashboard: the page on 127.0.0.1, forwarded to the node --------------------


class DashboardProxy:
    """A plain-HTTP server on ``host`` (loopback) that serves the dashboard of the node
    in ``directory``, as ``kubectl proxy`` does: each ``GET /dashboard/...`` goes to the
    node's read-only socket (``api.sock`` in its directory) while the node serves it,
    else to its HTTPS API with the node's own certificate and key (``passphrase``
    unlocks an encrypted key; without the key loaded, only the socket is used). Nothing
    but the dashboard's GETs is forwarded, and only for requests whose ``Host`` is this
    server's (a page of another origin cannot reach it through DNS rebinding)."""

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        passphrase: bytes | None = None,
        mtls: bool = True,
        max_streams: int = MAX_STREAMS,
        timeout: float = PROXY_TIMEOUT,
    ) -> None:
        self.directory = directory
        self.host = host
        self.port = port
        self.config = load_config(directory)
        self.socket = directory / API_SOCKET
        self.timeout = timeout
        self._ssl = self._client_context(passphrase) if mtls else None
        self._streams = asyncio.Semaphore(max_streams)
        self._exits = contextlib.AsyncExitStack()
        self._local: aiohttp.ClientSession | None = None
        self._remote: aiohttp.ClientSession | None = None
        self._server: HttpServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{PREFIX}/"

    async def start(self) -> str:
        """Listen (the node need not run yet); return the page's URL."""
        async with contextlib.AsyncExitStack() as exits:
            # A socket path too long for an address is reached through a descriptor of
            # its directory, held while the proxy runs.
            address = exits.enter_context(unix_address(self.socket))
            self._local = await exits.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=address))
            )
            if self._ssl is not None:
                self._remote = await exits.enter_async_context(aiohttp.ClientSession())
            app = web.Application(middlewares=[json_errors({}), self._check_host])
            app.router.add_get("/", _redirect)
            app.router.add_get(PREFIX, _redirect)
            app.router.add_get(PREFIX + "/{tail:.*}", self._forward)  # allowlisted below
            app.on_shutdown.append(self._close_sessions)  # open streams end at once
            policy = ResourcePolicy(max_connections=64, max_per_source=64)
            self._server = await serve_app(
                app,
                self.host,
                self.port,
                context=None,
                policy=policy,
                name="dashboard proxy",
                shutdown_timeout=1.0,
            )
            self._exits = exits.pop_all()
        self.port = self._server.port
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
        await self._exits.aclose()

    async def __aenter__(self) -> DashboardProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _close_sessions(self, app: web.Application) -> None:
        for session in (self._local, self._remote):
            if session is not None:
                await session.close()

    def _client_context(self, passphrase: bytes | None) -> ssl.SSLContext:
        d = self.directory
        try:
            context = ssl.create_default_context(cafile=str(d / "ca.crt"))
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(str(d / "node.crt"), str(d / "node.key"), password=passphrase)
        except (OSError, ssl.SSLError) as exc:
            raise NodeApiError(f"cannot load {d}'s certificate and key: {exc}") from None
        return context

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.host not in {f"{self.host}:{self.port}", f"localhost:{self.port}"}:
            raise ApiError(421, f"this proxy answers only as {self.host}:{self.port}")
        return await handler(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        # Only the dashboard's own paths, matched exactly: the raw path may hold "..",
        # which the client would collapse into any route of the node's API.
        path = _proxied_path(request.match_info.get("tail", ""))
        if path is None:
            raise ApiError(404, "the proxy forwards the dashboard's own paths only")
        if path != PREFIX + "/events":
            return await self._relay(request, path, streaming=False)
        if self._streams.locked():
            raise ApiError(503, "too many dashboard streams", code="busy")
        async with self._streams:
            return await self._relay(request, path, streaming=True)

    def _upstream(self) -> tuple[aiohttp.ClientSession, str, dict[str, Any]]:
        """The session, base URL and request options that reach the node now."""
        if self.socket.exists() or self._ssl is None:
            assert self._local is not None
            return self._local, "http://localhost", {}
        assert self._remote is not None
        base = api_url(self.directory, self.config)
        return self._remote, base, {"ssl": self._ssl, "server_hostname": self.config.node_id}

    async def _relay(
        self, request: web.Request, path: str, *, streaming: bool
    ) -> web.StreamResponse:
        session, base, options = self._upstream()
        timeout = aiohttp.ClientTimeout(
            total=None if streaming else self.timeout, sock_connect=self.timeout
        )
        try:
            async with session.request(
                request.method,  # GET, or HEAD
                base + path,  # an allowlisted constant: never the client's raw path
                headers={"Accept": request.headers.get("Accept", "*/*")},
                timeout=timeout,
                allow_redirects=False,
                **options,
            ) as upstream:
                headers = _forwarded_headers(upstream.headers.items())
                if not streaming or upstream.status != 200:
                    body = await upstream.content.read(MAX_FORWARDED + 1)
                    if len(body) > MAX_FORWARDED:
                        raise ApiError(502, "the node's answer is too large", code="bad_gateway")
                    return web.Response(status=upstream.status, body=body, headers=headers)
                response = web.StreamResponse(status=200, headers=headers)
                await response.prepare(request)
                with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                    # Until either side goes away: the browser reconnects if it is there.
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                return response
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "os_error", None) or exc
            why = f"cannot reach node {self.config.node_id} ({reason})"
            if not (self.directory / RUN_FILE).exists():
                why = f"node {self.config.node_id} is not running (no {RUN_FILE})"
            raise ApiError(
                502,
                f"{why}; start `trustmesh node run --dir {self.directory}`",
                code="node_unreachable",
            ) from None


_KEPT_HEADERS = frozenset(
    h.lower()
    for h in (
        "Content-Type",
        "Cache-Control",
        "Content-Security-Policy",
        "X-Content-Type-Options",
        "Referrer-Policy",
        "Retry-After",
        "Location",
        "X-Accel-Buffering",
    )
)


def _forwarded_headers(items: Iterable[tuple[str, str]]) -> Mapping[str, str]:
    return {name: value for name, value in items if name.lower() in _KEPT_HEADERS}
