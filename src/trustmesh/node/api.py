"""The node's HTTPS API (zero-trust-mesh.md section 7.4), for holders of a mesh
certificate (mTLS):

- ``GET /v1/mesh/peers``: the peer table (node_id, status, last_seen, ..., and each
  peer's gossip ``score`` and ``graylisted_until``).
- ``POST /v1/mesh/gossip``: a signed gossip message; 202 once verified and committed to
  the node's store (group commit: the answer waits for the batch that holds it).
- ``GET /v1/mesh/anomalies``: the indicators received (``?limit=``, ``?since=`` ms, and
  ``?hash=`` for one anomaly's).
- ``GET /v1/mesh/health``: links, certificate, CRL and gossip counters.
- ``GET /metrics``: the node's Prometheus metrics (docs/metrics.md).

A request without a client certificate, or with one that does not chain to the mesh CA,
gets 401; a revoked certificate gets 403.

The read-only GET routes (:func:`read_only_routes`: peers, anomalies, health, the OpenAPI
document, metrics, and any route registered in :data:`READ_ONLY_ROUTES`, such as the
dashboard's) are also served without TLS by :func:`local_app` on the node's Unix socket
``D/api.sock`` (mode 0600: the file's permission is the credential), so that the
``trustmesh node`` read-only commands need no key passphrase. Any other method there is
a 405. ``POST /v1/mesh/gossip`` is rate limited per
client certificate and per client address (an IPv6 one per /64), each at the node
policy's ``request_rate`` a second (bursts of ``request_burst``): beyond either, 429 with
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import CollectorRegistry

from trustmesh.api.errors import ApiError, Handler, json_errors
from trustmesh.bundle.errors import (
    BundleError,
    BundleTooLargeError,
    MalformedBundleError,
    UnknownCriticalBlockError,
)
from trustmesh.bundle.store import SourceQuotaError, StoreFullError
from trustmesh.clock import SYSTEM_CLOCK, Clock
from trustmesh.errors import OversizeError, ProtocolError
from trustmesh.io.https import peer_chain
from trustmesh.io.limits import ResourcePolicy, source_of
from trustmesh.mesh.bundle_codec import MAX_PAYLOAD
from trustmesh.mesh.dtn import DuplicateBundleError
from trustmesh.mesh.errors import (
    BadSignature,
    ExpiredMessage,
    MalformedMessage,
    RateLimited,
    RevokedOrigin,
    UntrustedOrigin,
)
from trustmesh.mesh.gossip import HEX, MAX_MESSAGE
from trustmesh.mesh.trust import CrlRejected
from trustmesh.metrics.exposition import METRICS_PATH, metrics_response
from trustmesh.node.bundle_api import BundleService, add_bundle_routes
from trustmesh.ratelimit import RateLimiter

if TYPE_CHECKING:
    from trustmesh.mesh.engine import GossipEngine, Received
    from trustmesh.mesh.node import PeerInfo
    from trustmesh.mesh.store import MeshStore
    from trustmesh.mesh.trust import TrustView


class NodeView(Protocol):
    """What the API reads of a node (``trustmesh.node.runtime.MeshNode``)."""

    node_id: str
    config: Any
    trust: TrustView
    engine: GossipEngine
    store: MeshStore

    @property
    def peers(self) -> dict[str, PeerInfo]: ...

    def accept_raw(self, raw: bytes) -> Received: ...

    def flush(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


MAX_LIMIT = 10_000


class GossipLimits:
    """The rate limits of ``POST /v1/mesh/gossip``: one bucket per client certificate
    (its SHA-256 fingerprint) and one per client address."""

    def __init__(self, policy: ResourcePolicy, clock: Callable[[], float] = time.monotonic):
        rate, burst = policy.request_rate, policy.request_burst
        self.per_certificate = RateLimiter(rate, burst, clock=clock)
        self.per_address = RateLimiter(rate, burst, clock=clock)

    def check(self, request: web.Request, certificate: x509.Certificate) -> None:
        """Take a token from both buckets, or raise a 429 (a refused request takes none
        from the certificate's bucket)."""
        wait = self.per_address.check(source_of(request.remote or "unknown"))
        who = "this address"
        if wait is None:
            wait = self.per_certificate.check(certificate.fingerprint(hashes.SHA256()).hex())
            who = "this client certificate"
        if wait is not None:
            raise ApiError(
                429,
                f"too many gossip messages from {who}; slow down",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )


class GroupCommit:
    """202 means durable: a gossip answer waits until the store batch that holds its
    message has committed. Every answer that waits in one turn of the event loop shares
    one commit, made as soon as that turn's callbacks have run (not at the next periodic
    flush), so a burst of requests costs one commit, not one each."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush
        self._waiting: list[asyncio.Future[None]] = []
        self._scheduled = False
        self.commits = 0

    def wait(self) -> asyncio.Future[None]:
        """A future that the next commit resolves (or fails with the commit's error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append(future)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._commit)
        return future

    def _commit(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, []
        try:
            self._flush()
        except Exception as exc:  # each waiter answers 500, none 202
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        self.commits += 1
        for future in waiting:
            if not future.done():  # a waiter whose client went away is cancelled
                future.set_result(None)


NODE_KEY: web.AppKey[NodeView] = web.AppKey("node")
CLOCK_KEY: web.AppKey[Clock] = web.AppKey("clock")
LIMITS_KEY: web.AppKey[GossipLimits] = web.AppKey("gossip_limits", GossipLimits)
COMMIT_KEY: web.AppKey[GroupCommit] = web.AppKey("group_commit", GroupCommit)
METRICS_KEY = web.AppKey("metrics", CollectorRegistry)
# Which of the node's listeners an app serves: API_LISTENER (mTLS) or LOCAL_LISTENER (the
# Unix socket), so that what is counted per listener (dashboard streams) is kept apart.
LISTENER_KEY: web.AppKey[str] = web.AppKey("listener", str)
API_LISTENER, LOCAL_LISTENER = "api", "local"  # as limit_counts names them

ERRORS: dict[type[ProtocolError], tuple[int, str]] = {
    MalformedMessage: (400, "malformed"),
    OversizeError: (413, "too_large"),
    BadSignature: (400, "bad_signature"),
    ExpiredMessage: (400, "expired"),
    CrlRejected: (400, "bad_crl"),
    UntrustedOrigin: (403, "untrusted_origin"),
    RevokedOrigin: (403, "revoked"),
    RateLimited: (429, "rate_limited"),
    BundleError: (400, "bad_bundle"),
    MalformedBundleError: (400, "malformed"),
    UnknownCriticalBlockError: (400, "unknown_critical_block"),
    BundleTooLargeError: (413, "too_large"),
    SourceQuotaError: (429, "source_quota"),
    StoreFullError: (507, "store_full"),
    DuplicateBundleError: (409, "duplicate"),
}
# A JSON bundle request carries its payload in base64.
MAX_BODY = max(MAX_MESSAGE, MAX_PAYLOAD * 4 // 3) + 8192


ReadOnlyRoutes = Callable[[web.Application], None]

READ_ONLY_ROUTES: list[ReadOnlyRoutes] = []
"""More read-only routes: each function is called with every app that serves the node's
read-only routes (the mTLS API, :func:`node_app`, and the local socket, :func:`local_app`),
after the node's own are added, and adds GET routes only (the local app refuses every
other method anyway). Its handlers find the node in ``request.app[NODE_KEY]``, the clock
in ``request.app[CLOCK_KEY]``, the metrics registry in ``request.app[METRICS_KEY]`` and
which listener serves the app in ``request.app[LISTENER_KEY]``.
The dashboard appends its function here to mount ``/dashboard/``."""


# The node's own read-only routes (GET): what the local socket serves besides those of
# READ_ONLY_ROUTES, and what NodeClient asks it for.
READ_ONLY_PATHS = (
    "/v1/mesh/peers",
    "/v1/mesh/anomalies",
    "/v1/mesh/health",
    "/v1/openapi.json",
    METRICS_PATH,
)


def read_only_routes(app: web.Application) -> None:
    """Add the read-only GET routes to ``app`` (whose ``NODE_KEY``, ``CLOCK_KEY`` and
    ``METRICS_KEY`` are set): the node's own (:data:`READ_ONLY_PATHS`), then each of
    :data:`READ_ONLY_ROUTES`."""
    handlers: dict[str, Handler] = {
        "/v1/mesh/peers": _peers,
        "/v1/mesh/anomalies": _anomalies,
        "/v1/mesh/health": _health,
        "/v1/openapi.json": _openapi,
        METRICS_PATH: _metrics,
    }
    for path in READ_ONLY_PATHS:
        app.router.add_get(path, handlers[path])
    for add_routes in READ_ONLY_ROUTES:
        add_routes(app)


LOCAL_MAX_BODY = 4096  # the local socket takes no request body


def local_app(
    node: NodeView,
    *,
    clock: Clock = SYSTEM_CLOCK,
    metrics: CollectorRegistry | None = None,
) -> web.Application:
    """The read-only API of ``node`` for its local Unix socket: the routes of
    :func:`read_only_routes`, with no client-certificate check (whoever may open the
    0600 socket file is the node's operator). A method other than GET or HEAD is a 405,
    whatever the path."""
    app = web.Application(
        middlewares=[json_errors(ERRORS), _read_only], client_max_size=LOCAL_MAX_BODY
    )
    app[NODE_KEY] = node
    app[CLOCK_KEY] = clock
    app[METRICS_KEY] = metrics if metrics is not None else CollectorRegistry()
    app[LISTENER_KEY] = LOCAL_LISTENER
    read_only_routes(app)
    return app


@web.middleware
async def _read_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        raise ApiError(
            405,
            "the node's local socket is read-only: writes go to its HTTPS API, with the"
            " node's certificate",
            headers={"Allow": "GET, HEAD"},
        )
    return await handler(request)


def node_app(
    node: NodeView,
    *,
    policy: ResourcePolicy | None = None,
    clock: Clock = SYSTEM_CLOCK,
    bundles: BundleService | None = None,
    metrics: CollectorRegistry | None = None,
) -> web.Application:
    """The API of ``node``; its rate limits come from ``policy`` (default: the node's
    own, ``node.config.policy``); certificates are checked and limits run on ``clock``.
    With ``bundles``, the ``/v1/bundles`` routes too. ``GET /metrics`` serves
    ``metrics`` (none given: an empty registry), behind the same client-certificate
    check as every route."""
    app = web.Application(
        middlewares=[json_errors(ERRORS), _authenticate], client_max_size=MAX_BODY
    )
    app[NODE_KEY] = node
    app[CLOCK_KEY] = clock
    app[LIMITS_KEY] = GossipLimits(policy or _policy_of(node), clock.monotonic)
    app[COMMIT_KEY] = GroupCommit(lambda: node.flush())
    app[METRICS_KEY] = metrics if metrics is not None else CollectorRegistry()
    app[LISTENER_KEY] = API_LISTENER
    read_only_routes(app)
    app.router.add_post("/v1/mesh/gossip", _gossip)
    if bundles is not None:
        add_bundle_routes(app, bundles)
    return app


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    chain = peer_chain(request)
    if not chain:
        raise ApiError(401, "this API needs a client certificate from the mesh CA")
    try:
        node.trust.identity_of(chain, now_ms=request.app[CLOCK_KEY].time_ms())
    except RevokedOrigin as exc:
        raise ApiError(403, str(exc), code="revoked") from None
    except UntrustedOrigin as exc:
        raise ApiError(401, f"the client certificate is not accepted: {exc}") from None
    return await handler(request)


async def _peers(request: web.Request) -> web.Response:
    """The peer table, each row with the peer's gossip ``score`` (0 until it misbehaves,
    mesh-link.md section 6.2) and ``graylisted_until`` (Unix ms, or null)."""
    node = request.app[NODE_KEY]
    now = request.app[CLOCK_KEY].time_ms()
    rows = []
    for peer in sorted(node.peers.values(), key=lambda p: p.node_id):
        row = peer.to_json()
        row["score"] = round(node.engine.score(peer.node_id, now), 3)
        row["graylisted_until"] = node.engine.graylisted_until(peer.node_id, now)
        rows.append(row)
    return web.json_response({"node_id": node.node_id, "peers": rows})


def _policy_of(node: NodeView) -> ResourcePolicy:
    policy = getattr(node.config, "policy", None)
    return policy if isinstance(policy, ResourcePolicy) else ResourcePolicy()


async def _gossip(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    request.app[LIMITS_KEY].check(request, peer_chain(request)[0])
    raw = await request.read()
    if not raw:
        raise ApiError(400, "the body must be a signed gossip message (JSON)")
    received = node.accept_raw(raw)
    # Its seen id and indicator (or, for a duplicate, the copy seen before) are in the
    # store's pending batch, or already committed: answer once that batch is.
    await request.app[COMMIT_KEY].wait()
    return web.json_response(
        {
            "message_id": received.message_id,
            "status": "accepted" if received.new else "duplicate",
            "forwarded_to": len(received.forward_to),
        },
        status=202,
    )


async def _anomalies(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    limit = _int_query(request, "limit", 1000, 1, MAX_LIMIT)
    since = _int_query(request, "since", -1, -1, 1 << 53)
    digest = request.query.get("hash")
    if digest is not None and not HEX.fullmatch(digest):
        raise ApiError(400, "hash must be an even number (16 to 128) of lowercase hex digits")
    node.flush()
    indicators = node.store.indicators(limit=limit, since=since, hash=digest)
    return web.json_response(
        {"node_id": node.node_id, "anomalies": [i.to_json() for i in indicators]}
    )


async def _health(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE_KEY].health())


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _metrics(request: web.Request) -> web.Response:
    return metrics_response(request, request.app[METRICS_KEY])


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of this API (trustmesh/api/node_openapi.json)."""
    text = resources.files("trustmesh.api").joinpath("node_openapi.json").read_text()
    document: dict[str, Any] = json.loads(text)
    return document


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in {low}..{high}")
    return value
