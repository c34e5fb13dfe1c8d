"""Serving the CA's API over HTTPS, with a TLS certificate the CA issues itself.

At start the CA issues its API a certificate for the names clients use (by default the
host it serves; an IP SAN for an address), so a client that trusts ``ca.crt`` verifies
the server with nothing else. The certificate lives 7 days and is renewed at two thirds
of that while serving: new connections get the new one. Its files live in a private
temporary directory of this server, so several servers on one CA never share them.

With ``metrics=(host, port)`` it also serves ``GET /metrics`` on that plain-HTTP port,
for a local scraper (the API's own ``/metrics`` wants an admin; docs/metrics.md).

The server *requests* client certificates (for ``/v1/rotate`` and admin calls) and the
handlers verify them, so a missing or foreign certificate gets a JSON 401 instead of a
failed handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from trustmesh.api.ca import METRICS, ca_app, refresh_crl
from trustmesh.api.ratelimit import DEFAULT_BURST, DEFAULT_RATE, RateLimiter
from trustmesh.clock import Clock
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.io.https import HttpServer, HttpsSite, serve_app
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.listener import Listener
from trustmesh.keystore.filestore import save_key_file
from trustmesh.metrics.ca import CaMetrics
from trustmesh.metrics.exposition import MetricsServer
from trustmesh.pki.ca import SERVER_VALIDITY
from trustmesh.pki.enroll import Registrar
from trustmesh.pki.errors import PkiError
from trustmesh.tls.context import TlsConfig, TlsContext

log = logging.getLogger("trustmesh.api.ca")

DEFAULT_PORT = 8443
WARN_EVERY = 24 * 3600.0  # seconds between repeated CA-expiry warnings in the log
RENEW_EVERY = SERVER_VALIDITY.total_seconds() * 2 / 3  # the API's own certificate
RENEW_RETRY = 60.0  # seconds before trying again when a renewal failed


class CaServer:
    """The CA API on ``host:port`` until :meth:`stop`. It reads the time from ``clock``
    (by default the registrar's, which is the CA's): the API's handlers, its default
    rate limit and its own TLS certificate."""

    def __init__(
        self,
        registrar: Registrar,
        passphrase: bytes | None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        limiter: RateLimiter | None = None,
        clock: Clock | None = None,
        names: tuple[str, ...] = (),
        policy: ResourcePolicy | None = None,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        if not names and host in ("0.0.0.0", "::", ""):  # noqa: S104 (a check, not a bind)
            raise PkiError(
                f"serving on {host or 'all addresses'}: give the names clients use (--san)"
            )
        self.registrar = registrar
        self.host = host
        self.names = names or (host,)
        self._port = port
        self._passphrase = passphrase
        # One clock for the API, its rate limit and the certificates it issues itself:
        # the registrar's (the CA's) unless given another.
        self.clock = registrar.clock if clock is None else clock
        self._limiter = limiter or RateLimiter(
            DEFAULT_RATE, DEFAULT_BURST, clock=self.clock.monotonic
        )
        self.policy = policy or ResourcePolicy()
        self._http: HttpServer | None = None
        self._site: HttpsSite | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._files: tempfile.TemporaryDirectory[str] | None = None
        self._metrics_address = metrics
        self._metrics: CaMetrics | None = None
        self.metrics_server: MetricsServer | None = None

    @property
    def port(self) -> int:
        return self._site.port if self._site else self._port

    @property
    def listener(self) -> Listener:
        """The listening socket, its connection table and its limit counters."""
        if self._site is None:
            raise RuntimeError("the CA server is not started")
        return self._site.listener

    @property
    def tls_context(self) -> TlsContext:
        """The context new connections get (its certificate is the latest issued)."""
        if self._site is None or self._site.context is None:
            raise RuntimeError("the CA server is not started")
        return self._site.context

    @property
    def metrics(self) -> CaMetrics:
        """The API's metrics (served at its ``/metrics`` and on the metrics port)."""
        if self._metrics is None:
            raise RuntimeError("the CA server is not started")
        return self._metrics

    @property
    def url(self) -> str:
        """The URL clients use: the first of the certificate's names."""
        host = self.names[0]
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self.port}"

    async def start(self) -> None:
        for warning in self.registrar.ca.expiry_warnings(now=self.clock.now()):
            log.warning("CA EXPIRY: %s", warning)
        app = ca_app(self.registrar, limiter=self._limiter, clock=self.clock)
        self._metrics = app[METRICS]
        # Signed before the first scrape, so the metrics show a CRL from the start.
        await refresh_crl(app)
        self._http = await serve_app(
            app,
            self.host,
            self._port,
            context=self._tls_context(),
            policy=self.policy,
            name="CA API",
        )
        self._site = self._http.site
        self._metrics.listeners["api"] = self._site.listener
        if self._metrics_address is not None:
            host, port = self._metrics_address
            self.metrics_server = MetricsServer(
                self._metrics.registry, host, port, refresh=lambda: refresh_crl(app)
            )
            try:
                await self.metrics_server.start()
            except BaseException:
                await self.stop()  # the API too: a server runs whole or not at all
                raise
            if self.metrics_server.listener is not None:
                self._metrics.listeners["metrics"] = self.metrics_server.listener
        self._tasks = [
            asyncio.create_task(self._renew_certificate()),
            asyncio.create_task(self._warn_expiry()),
        ]
        log.info("CA API listening on %s", self.url)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The metrics port first: a scrape needs the API's worker threads, which the
        # API's cleanup stops.
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self._http is not None:
            await self._http.stop()
        if self._files is not None:
            self._files.cleanup()

    async def __aenter__(self) -> CaServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _tls_context(self) -> TlsContext:
        """Issue the API a fresh certificate and build the context that serves it."""
        ca = self.registrar.ca
        key = PrivateKey.generate(KeyKind.P256)
        public = key.to_cryptography().public_key()
        cert = ca.issue_server(list(self.names), public, now=self.clock.now())
        if self._metrics is not None:
            self._metrics.server_not_after = cert.not_valid_after_utc
        if self._files is None:
            self._files = tempfile.TemporaryDirectory(prefix="trustmesh-ca-api-")
        directory = Path(self._files.name)
        chain = cert.public_bytes(serialization.Encoding.PEM) + ca.issuing_cert.public_bytes(
            serialization.Encoding.PEM
        )
        (directory / "server.crt").write_bytes(chain)
        save_key_file(key, directory / "server.key", self._passphrase, overwrite=True)
        config = TlsConfig(
            cert_file=directory / "server.crt",
            key_file=directory / "server.key",
            ca_file=ca.directory / "ca.crt",
            key_passphrase=self._passphrase,
            client_auth="request",
        )
        return TlsContext(config, server=True)

    async def _renew_certificate(self) -> None:
        delay = RENEW_EVERY
        while True:
            await asyncio.sleep(delay)
            delay = RENEW_EVERY if await self.renew_certificate() else RENEW_RETRY

    async def renew_certificate(self) -> bool:
        """Issue the API a new certificate and serve it to new connections; False (and
        the old one kept) when that fails, e.g. while the database is away. Off the
        loop: it signs and writes to the store."""
        if self._site is None:
            raise RuntimeError("the CA server is not started")
        try:
            context = await asyncio.to_thread(self._tls_context)
        except Exception:
            log.exception(
                "could not renew the CA API's TLS certificate; trying again in %g s", RENEW_RETRY
            )
            return False
        self._site.context = context
        log.info("renewed the CA API's TLS certificate")
        return True

    async def _warn_expiry(self) -> None:
        while True:
            await asyncio.sleep(WARN_EVERY)
            for warning in self.registrar.ca.expiry_warnings(now=self.clock.now()):
                log.warning("CA EXPIRY: %s", warning)
