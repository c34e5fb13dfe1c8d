"""What the CA's and the node's metrics share: the exposition, the listeners' limit
counters, and the plain-HTTP metrics port.

:func:`metrics_response` answers ``GET /metrics`` with a registry's samples, in the
Prometheus text format or, when the scraper asks for it, OpenMetrics.

:class:`MetricsServer` is ``--metrics HOST:PORT``: plain HTTP, for a scraper on the
same host or network (the API ports need a client certificate, which a local
Prometheus may not hold). It serves ``/metrics`` and nothing else, under a
:class:`~trustmesh.io.limits.ResourcePolicy` like every trustmesh listener, and binds
only where it is told.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trustmesh.api.errors import json_errors
from trustmesh.io.https import HttpServer, serve_app
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.listener import Listener

log = logging.getLogger("trustmesh.metrics")

METRICS_PATH = "/metrics"
# The metrics port answers one scraper (or a few) with small pages: a tight policy.
METRICS_POLICY = ResourcePolicy(
    max_connections=64,
    max_per_source=16,
    max_unauthenticated=32,
    max_unauthenticated_per_source=8,
    request_rate=10.0,
    request_burst=20,
)

Listeners = Callable[[], Mapping[str, Listener]]
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
Refresh = Callable[[], Awaitable[None]]
REFRESH: web.AppKey[Refresh] = web.AppKey("metrics_refresh")


def metrics_response(request: web.Request, registry: CollectorRegistry) -> web.Response:
    """The samples of ``registry``, in the format the scraper's ``Accept`` asks for (the
    Prometheus text format unless it asks for OpenMetrics)."""
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(registry), headers={"Content-Type": content_type})


def seconds_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


class ListenerCollector(Collector):
    """The connections each listener holds and the limits they hit (docs/limits.md), as
    ``<prefix>_connections{listener,state}`` and ``<prefix>_limit_hits_total{listener,
    limit}``; ``listeners()`` names the listeners running at scrape time."""

    def __init__(self, prefix: str, listeners: Listeners) -> None:
        self._prefix = prefix
        self._listeners = listeners

    def collect(self) -> Iterable[Metric]:
        connections = GaugeMetricFamily(
            f"{self._prefix}_connections",
            "Connections a listener holds: authenticated (a TLS peer proven, an HTTP request"
            " read) or unauthenticated (still in their handshake).",
            labels=["listener", "state"],
        )
        hits = CounterMetricFamily(
            f"{self._prefix}_limit_hits",
            "How often a resource limit refused or dropped a connection (docs/limits.md).",
            labels=["listener", "limit"],
        )
        for name, listener in sorted(self._listeners().items()):
            table = listener.table
            connections.add_metric([name, "authenticated"], table.total - table.unauthenticated)
            connections.add_metric([name, "unauthenticated"], table.unauthenticated)
            for limit, count in sorted(listener.stats.snapshot().items()):
                hits.add_metric([name, limit], count)
        return [connections, hits]


def metrics_app(registry: CollectorRegistry, refresh: Refresh | None = None) -> web.Application:
    """An app with ``GET /metrics`` alone (any other path: a JSON 404); ``refresh`` is
    awaited before each scrape (what a collector reads, brought up to date off the loop)."""
    app = web.Application(middlewares=[json_errors({})])
    app[REGISTRY] = registry
    if refresh is not None:
        app[REFRESH] = refresh
    app.router.add_get(METRICS_PATH, _metrics)
    return app


async def _metrics(request: web.Request) -> web.Response:
    if REFRESH in request.app:
        await request.app[REFRESH]()
    return metrics_response(request, request.app[REGISTRY])


class MetricsServer:
    """``registry`` on ``http://host:port/metrics`` until :meth:`stop`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        policy: ResourcePolicy = METRICS_POLICY,
        name: str = "metrics",
        refresh: Refresh | None = None,
    ) -> None:
        self.registry = registry
        self._refresh = refresh
        self.host = host
        self._port = port
        self.policy = policy
        self.name = name
        self._http: HttpServer | None = None

    @property
    def port(self) -> int:
        return self._http.port if self._http is not None else self._port

    @property
    def listener(self) -> Listener | None:
        return self._http.listener if self._http is not None else None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{METRICS_PATH}"

    async def start(self) -> None:
        self._http = await serve_app(
            metrics_app(self.registry, self._refresh),
            self.host,
            self._port,
            context=None,
            policy=self.policy,
            name=self.name,
            shutdown_timeout=1.0,
        )
        log.info("metrics on %s", self.url)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.stop()
