"""The mesh CA's metrics (docs/metrics.md), all named ``trustmesh_ca_*``.

The API counts its requests (route, status, latency) and the outcome of every
enrollment and rotation as they happen; the CRL, the certificates' expiry and the
listeners' counters are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trustmesh.clock import Clock
from trustmesh.io.listener import Listener
from trustmesh.metrics.exposition import ListenerCollector, seconds_between
from trustmesh.pki.ca import CertificateAuthority

PREFIX = "trustmesh_ca"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a request no route matched (a 404)
# Outcomes shown at 0 before the first of each; an error code not listed appears when
# it first happens (each is one of the API's own codes, never a client's text).
ENROLL_OUTCOMES = (
    "issued",
    "retried",
    "invalid_token",
    "invalid_csr",
    "policy_denied",
    "attestation_failed",
    "bad_request",
    "rate_limited",
)
ROTATE_OUTCOMES = (
    "issued",
    "retried",
    "unauthenticated",
    "invalid_csr",
    "policy_denied",
    "attestation_failed",
    "superseded",
    "serial_mismatch",
    "bad_request",
    "rate_limited",
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CrlView(Protocol):
    """What the metrics read of the CRL the API serves (``api.ca.CrlSnapshot``)."""

    @property
    def this_update(self) -> datetime: ...

    @property
    def next_update(self) -> datetime: ...

    @property
    def revoked(self) -> int: ...


class CaMetrics:
    """The registry of one CA API's metrics: serve :attr:`registry` at ``/metrics``.

    ``crl()`` gives the CRL signed last (None before the first; it never waits for the
    store, so a scrape never blocks on the database); the server sets :attr:`listeners`
    and :attr:`server_not_after` once it runs."""

    def __init__(
        self, ca: CertificateAuthority, clock: Clock, crl: Callable[[], CrlView | None]
    ) -> None:
        self.ca = ca
        self.clock = clock
        self.crl = crl
        self.listeners: dict[str, Listener] = {}
        self.server_not_after: datetime | None = None  # the API's own TLS certificate
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by method, route (the matched route pattern) and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Seconds from a request's head to its answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.enrollments = Counter(
            f"{PREFIX}_enrollments",
            "Enrollments by outcome: issued, retried (the certificate issued before, to a"
            " client whose answer was lost), or the error code that refused it.",
            ["outcome"],
            registry=self.registry,
        )
        self.rotations = Counter(
            f"{PREFIX}_rotations",
            "Rotations (renewals) by outcome: issued, retried, or the error code that refused it.",
            ["outcome"],
            registry=self.registry,
        )
        self.database_up = Gauge(
            f"{PREFIX}_database_up",
            "1 when the CA's database answered the last scrape's CRL check within 5 s, else 0.",
            registry=self.registry,
        )
        self.database_up.set(1)
        for outcome in ENROLL_OUTCOMES:
            self.enrollments.labels(outcome)
        for outcome in ROTATE_OUTCOMES:
            self.rotations.labels(outcome)
        self.registry.register(_CaCollector(self))
        self.registry.register(ListenerCollector(PREFIX, lambda: self.listeners))

    def request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """One request answered (``route`` None: no route matched)."""
        shown = route if route is not None else UNMATCHED
        self.requests.labels(method if method in METHODS else "other", shown, str(status)).inc()
        self.latency.labels(shown).observe(max(0.0, seconds))


class _CaCollector(Collector):
    def __init__(self, metrics: CaMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics
        now = metrics.clock.now()
        crl = metrics.crl()
        if crl is not None:
            yield from _crl_gauges(crl, now)
        expiry = GaugeMetricFamily(
            f"{PREFIX}_certificate_expiry_seconds",
            "Seconds until a CA certificate expires (notAfter): the root, the issuing CA,"
            " and the API server's own TLS certificate (renewed while serving).",
            labels=["certificate"],
        )
        ca = metrics.ca
        expiry.add_metric(["root"], seconds_between(now, ca.root_cert.not_valid_after_utc))
        expiry.add_metric(["issuing"], seconds_between(now, ca.issuing_cert.not_valid_after_utc))
        if metrics.server_not_after is not None:
            expiry.add_metric(["server"], seconds_between(now, metrics.server_not_after))
        yield expiry


def _crl_gauges(crl: CrlView, now: datetime) -> Iterable[Metric]:
    yield GaugeMetricFamily(
        f"{PREFIX}_crl_age_seconds",
        "Seconds since the thisUpdate of the CRL served (it is signed again after every"
        " revocation and when half its validity has passed).",
        value=seconds_between(crl.this_update, now),
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_crl_next_update_seconds",
        "Seconds until the nextUpdate of the CRL served.",
        value=seconds_between(now, crl.next_update),
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_crl_revoked_serials",
        "Serials the CRL served revokes.",
        value=crl.revoked,
    )
