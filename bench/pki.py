"""PKI: enrollments per second end to end over HTTPS, against bare HTTPS requests to a
trivial aiohttp handler on the same server setup.

- enrollments_per_s: POST /v1/enroll to a real CA (``CertificateAuthority.init`` in a
  temporary directory on disk, SQLite with WAL and ``synchronous=FULL``) served by
  :class:`trustmesh.api.ca_server.CaServer` on 127.0.0.1, 16 concurrent clients. Each
  enrollment spends its own token and gets a node certificate signed, committed to the
  store and returned. Goal: ratio >= 0.5.
- crl_fetches_per_s: GET /v1/crl (DER, a CRL listing 1000 revoked certificates, 48 KiB)
  over keep-alive connections, 16 concurrent clients. No goal.

Anchor: the same server setup with a trivial handler. A second ``web.AppRunner``
(``access_log=None``, as CaServer's) behind a second :class:`trustmesh.io.https.HttpsSite`
that serves with the CA server's own :class:`~trustmesh.tls.TlsContext` (the very
certificate and key the CA issued its API, ``client_auth="request"``), serving
``/v1/echo``: it reads the request body and answers ``{"ok": true, "size": N}``. The
enrollment anchor POSTs bodies of the enrollment's shape and size (a token and a P-256
CSR in PEM); the CRL anchor GETs the same handler.

Connection policy, the same for a metric and its anchor:

- enrollments and their anchor: a fresh TLS connection per request (aiohttp connectors
  with ``force_close=True``, which also sends ``Connection: close`` so the server closes
  its side as soon as it has answered). Enrollment is a new node's first and only
  contact with the CA, so every enrollment pays a full TLS 1.3 handshake; the stdlib
  ``ssl`` clients never resume a session, and the counts prove every request opened its
  own connection.
- CRL fetches and their anchor: keep-alive, one connection from each client to each
  server, opened by a warm-up right before the CRL rounds and reused by every measured
  request (a node polling the CRL). Each fetch is a full 200 with the whole CRL: no
  If-None-Match, so no 304s.

Everything runs in one process on one event loop (the servers and the 16 aiohttp
clients, whose stdlib ``ssl`` contexts trust the CA's ca.crt and present no client
certificate). Before any timing: the CA, both servers, the client sessions, one warm-up
request per client and kind (the keep-alive ones right before the CRL rounds), and, for
every enrollment, its token (``ca.create_token``) and its P-256 key and CSR (a node makes
its key before it enrolls, so neither is part of the CA's work); only the HTTPS requests
are timed. Every response is checked (200 and a
PEM certificate for ``node_id``; the echoed size; the CRL's exact bytes) and counted, and
a round fails loudly on any miss. A round is a fixed count of requests (CLIENTS x its
requests per client) with a timeout; anchor and subject rounds alternate, anchor first,
and the ratio is the median of per-round ratios.

``python -m bench pki --store postgres`` measures something else: CA replicas, each a
``trustmesh ca serve`` process, sharing one PostgreSQL database, against one such process
on SQLite (bench/pki_replicas.py says how).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.harness import Result, compare_rates
from trustmesh.api.ca_client import make_csr as node_csr
from trustmesh.api.ca_server import CaServer
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.io.https import HttpsSite
from trustmesh.io.limits import ResourcePolicy
from trustmesh.pki.ca import ENROLL_TOKEN_PREFIX, CertificateAuthority
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.tls.context import TlsContext

HOST = "127.0.0.1"
PASSPHRASE = b"bench"
CLIENTS = 16
ENROLLMENTS_PER_CLIENT = 8  # an enrollment round: CLIENTS x ENROLLMENTS_PER_CLIENT requests
CRL_FETCHES_PER_CLIENT = 48  # a CRL round: CLIENTS x CRL_FETCHES_PER_CLIENT requests
ROUNDS = 9
ROUND_TIMEOUT = 30.0  # seconds; a round that takes longer is a failure, not a figure
KEEPALIVE_TIMEOUT = 60.0  # seconds a keep-alive client keeps an idle connection
CRL_REVOKED = 1000  # revoked certificates the served CRL lists
REVOKED_NODE = "bench-revoked"
ECHO_PATH = "/v1/echo"
JSON_HEADERS = {"Content-Type": "application/json"}
# Never triggers: every bench client shares 127.0.0.1, so one bucket takes all requests.
GENEROUS_LIMIT = 1e9

# The same for the listeners: every client connects from 127.0.0.1 (docs/limits.md).
LOAD_POLICY = ResourcePolicy.for_load(4096)

STORES = ("sqlite", "postgres")  # --store: this bench, or bench/pki_replicas.py


# --- requests made before the timing ------------------------------------------------------


def make_csr(node_id: str) -> str:
    """A fresh P-256 key's CSR naming ``node_id``: what ``trustmesh enroll`` sends."""
    return node_csr(PrivateKey.generate(KeyKind.P256), node_id)


def enroll_body(token: str, node_id: str, csr_pem: str) -> bytes:
    return json.dumps({"token": token, "csr": csr_pem, "node_id": node_id}).encode()


@dataclass(frozen=True)
class Enrollment:
    """One enrollment, prepared before the timing: its token, already in the CA's store,
    and the request body with a fresh key's CSR."""

    node_id: str
    token: str
    body: bytes


# --- clients ------------------------------------------------------------------------------


class Clients:
    """``count`` aiohttp client sessions, each with its own connector and a stdlib ``ssl``
    context that trusts ``ca_file``; ``fresh`` gives every request its own connection,
    otherwise each session keeps one alive. Counts the connections they open and reuse."""

    def __init__(self, ca_file: Path, count: int, *, fresh: bool) -> None:
        self.ssl = ssl.create_default_context(cafile=str(ca_file))
        self.fresh = fresh
        self.opened = 0
        self.reused = 0
        self.requests = 0
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._on_create)
        trace.on_connection_reuseconn.append(self._on_reuse)
        self.sessions = [
            aiohttp.ClientSession(connector=self._connector(), trace_configs=[trace])
            for _ in range(count)
        ]

    def _connector(self) -> aiohttp.TCPConnector:
        if self.fresh:
            return aiohttp.TCPConnector(ssl=self.ssl, force_close=True, limit=1)
        # Idle connections live through the other side's rounds (aiohttp's server keeps
        # them 75 s by default).
        return aiohttp.TCPConnector(ssl=self.ssl, limit=1, keepalive_timeout=KEEPALIVE_TIMEOUT)

    async def _on_create(self, *_: Any) -> None:
        self.opened += 1

    async def _on_reuse(self, *_: Any) -> None:
        self.reused += 1

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()

    async def run(
        self,
        requests: list[list[Callable[[aiohttp.ClientSession], Awaitable[None]]]],
    ) -> float:
        """Run ``requests[i]`` one after another on session ``i``, all sessions at once;
        return the requests per second (all of them or the round fails)."""
        count = sum(len(r) for r in requests)
        start = time.perf_counter()
        async with asyncio.timeout(ROUND_TIMEOUT):
            await asyncio.gather(
                *(self._serial(s, r) for s, r in zip(self.sessions, requests, strict=True))
            )
        elapsed = time.perf_counter() - start
        self.requests += count
        return count / elapsed

    @staticmethod
    async def _serial(
        session: aiohttp.ClientSession,
        requests: list[Callable[[aiohttp.ClientSession], Awaitable[None]]],
    ) -> None:
        for request in requests:
            await request(session)


class BenchFailure(RuntimeError):
    """A response that was not what the benchmark asked for."""


def enroll_request(
    url: str, enrollment: Enrollment, on_enrolled: Callable[[str, str], None]
) -> Callable[[aiohttp.ClientSession], Awaitable[None]]:
    """POST ``enrollment`` to ``url`` (a CA's /v1/enroll); the answer must be a 200 with
    a PEM certificate for its node_id, which goes to ``on_enrolled(node_id, pem)``."""

    async def request(session: aiohttp.ClientSession) -> None:
        async with session.post(url, data=enrollment.body, headers=JSON_HEADERS) as resp:
            raw = await resp.read()
            status = resp.status
        answer = json.loads(raw) if status == 200 else {}
        if answer.get("node_id") != enrollment.node_id:
            raise BenchFailure(f"enrollment of {enrollment.node_id} answered {status}: {raw!r}")
        certificate = answer.get("certificate")
        if not isinstance(certificate, str) or not certificate.startswith(
            "-----BEGIN CERTIFICATE-----"
        ):
            raise BenchFailure(f"enrollment of {enrollment.node_id} returned no certificate")
        on_enrolled(enrollment.node_id, certificate)

    return request


# --- the rig ------------------------------------------------------------------------------


class PkiRig:
    """A CA served by CaServer, the anchor's trivial handler on the same HTTPS setup, and
    the client sessions for both connection policies."""

    def __init__(self, workdir: Path, *, clients: int = CLIENTS, revoked: int = CRL_REVOKED):
        self.workdir = workdir
        self.clients_count = clients
        self.revoked_count = revoked
        self.ca = CertificateAuthority.init(workdir / "ca", PASSPHRASE)
        self.registrar = Registrar(self.ca, EnrollmentPolicy(), MeshSettings())
        self.server = CaServer(
            self.registrar,
            PASSPHRASE,
            HOST,
            0,
            limiter=RateLimiter(GENEROUS_LIMIT, int(GENEROUS_LIMIT)),
            # Every client connects from 127.0.0.1: lift the per-address caps and rate.
            policy=LOAD_POLICY,
        )
        self.anchor_runner: web.AppRunner | None = None
        self.anchor_site: HttpsSite | None = None
        self.anchor_served = 0  # requests the echo handler answered, over trustmesh TLS
        self.fresh: Clients | None = None
        self.keepalive: Clients | None = None
        self.enrollments: list[Enrollment] = []  # every one prepared
        self.enrolled: list[str] = []  # node_ids whose enrollment returned a certificate
        self.crl_der = b""
        self.crl_fetches = 0
        self.keepalive_opened = 0  # connections the keep-alive clients had opened by then
        self._next_node = 0
        self._csr_pool: list[str] = []

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._revoke_many(self.revoked_count)
        await self.server.start()
        directory = self.ca.directory
        app = web.Application()
        app.router.add_route("*", ECHO_PATH, self._echo)
        self.anchor_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.anchor_runner.setup()
        self.anchor_site = HttpsSite(
            self.anchor_runner, HOST, 0, self.server.tls_context, policy=LOAD_POLICY
        )
        await self.anchor_site.start()
        ca_file = directory / "ca.crt"
        self.fresh = Clients(ca_file, self.clients_count, fresh=True)
        self.keepalive = Clients(ca_file, self.clients_count, fresh=False)
        self._csr_pool = [make_csr(f"bench-anchor-{i:05d}") for i in range(self.clients_count)]
        # One request per client on each server: warms them up.
        await self.enroll_round(1)
        await self.echo_round(1)

    async def open_keepalive(self) -> None:
        """Fetch and check the CRL, then open the keep-alive connections (one from each
        client to each server) that the CRL rounds and their anchor reuse: right before
        those rounds, so that none idles out in between."""
        assert self.keepalive is not None
        # The CRL's bytes from here are what every later fetch must return.
        self.crl_der = await self._fetch_crl_checked()
        await self.crl_round(1)
        await self.ping_round(1)
        self.keepalive_opened = self.keepalive.opened

    async def stop(self) -> None:
        for clients in (self.fresh, self.keepalive):
            if clients is not None:
                await clients.close()
        await self.server.stop()
        if self.anchor_runner is not None:
            await self.anchor_runner.cleanup()
        self.ca.close()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def anchor_url(self) -> str:
        assert self.anchor_site is not None
        return f"https://{HOST}:{self.anchor_site.port}"

    # --- rounds ---------------------------------------------------------------------------

    async def enroll_round(self, per_client: int) -> float:
        """Enrollments per second, ``per_client`` from every client, each on a fresh
        connection with its own token and CSR (prepared here, before the timing)."""
        assert self.fresh is not None
        plan = [[self._prepare_enrollment() for _ in range(per_client)] for _ in self.sessions]
        requests = [[self._enroll_request(e) for e in client] for client in plan]
        return await self.fresh.run(requests)

    async def echo_round(self, per_client: int) -> float:
        """The enrollment anchor: the same count of POSTs of the same size to the echo
        handler, each on a fresh connection."""
        assert self.fresh is not None
        requests = [
            [self._echo_request(self._anchor_body(i)) for _ in range(per_client)]
            for i in range(len(self.sessions))
        ]
        return await self.fresh.run(requests)

    async def crl_round(self, per_client: int) -> float:
        """CRL fetches per second over the clients' keep-alive connections."""
        assert self.keepalive is not None
        return await self.keepalive.run([[self._crl_request] * per_client for _ in self.sessions])

    async def ping_round(self, per_client: int) -> float:
        """The CRL anchor: GETs of the echo handler over keep-alive connections."""
        assert self.keepalive is not None
        get = self._echo_request(None)
        return await self.keepalive.run([[get] * per_client for _ in self.sessions])

    @property
    def sessions(self) -> list[aiohttp.ClientSession]:
        assert self.fresh is not None
        return self.fresh.sessions

    # --- requests -------------------------------------------------------------------------

    def _prepare_enrollment(self) -> Enrollment:
        node_id = f"bench-node-{self._next_node:06d}"
        self._next_node += 1
        token = self.ca.create_token(node_id)
        enrollment = Enrollment(node_id, token, enroll_body(token, node_id, make_csr(node_id)))
        self.enrollments.append(enrollment)
        return enrollment

    def _anchor_body(self, client: int) -> bytes:
        # The enrollment's shape and size: a token of the same format and a P-256 CSR.
        token = ENROLL_TOKEN_PREFIX + secrets.token_urlsafe(32)
        node_id = f"bench-node-{client:06d}"
        return enroll_body(token, node_id, self._csr_pool[client])

    def _enroll_request(
        self, enrollment: Enrollment
    ) -> Callable[[aiohttp.ClientSession], Awaitable[None]]:
        return enroll_request(
            self.url + "/v1/enroll", enrollment, lambda node_id, _: self.enrolled.append(node_id)
        )

    def _echo_request(
        self, body: bytes | None
    ) -> Callable[[aiohttp.ClientSession], Awaitable[None]]:
        url = self.anchor_url + ECHO_PATH
        size = len(body) if body is not None else 0

        async def request(session: aiohttp.ClientSession) -> None:
            if body is None:
                response = session.get(url)
            else:
                response = session.post(url, data=body, headers=JSON_HEADERS)
            async with response as resp:
                raw = await resp.read()
                status = resp.status
            if status != 200 or json.loads(raw) != {"ok": True, "size": size}:
                raise BenchFailure(f"the echo handler answered {status}: {raw!r}")

        return request

    async def _crl_request(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.url + "/v1/crl") as resp:
            raw = await resp.read()
            status = resp.status
        if status != 200 or raw != self.crl_der:
            raise BenchFailure(f"GET /v1/crl answered {status} with {len(raw)} other bytes")
        self.crl_fetches += 1

    async def _fetch_crl_checked(self) -> bytes:
        """The served CRL, checked once: DER, signed by the issuing CA, listing every
        revoked certificate."""
        assert self.keepalive is not None
        async with self.keepalive.sessions[0].get(self.url + "/v1/crl") as resp:
            raw = await resp.read()
            if resp.status != 200 or resp.content_type != "application/pkix-crl":
                raise BenchFailure(f"GET /v1/crl answered {resp.status} {resp.content_type}")
        crl = x509.load_der_x509_crl(raw)
        if len(crl) != self.revoked_count:
            raise BenchFailure(f"the CRL lists {len(crl)} certificates, not {self.revoked_count}")
        if not crl.is_signature_valid(self.ca.issuing_cert.public_key()):  # type: ignore[arg-type]
            raise BenchFailure("the CRL's signature does not verify")
        return raw

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        transport = request.transport
        if transport is None or not isinstance(transport.get_extra_info("sslcontext"), TlsContext):
            raise BenchFailure("the echo handler was reached without trustmesh TLS")
        self.anchor_served += 1
        return web.json_response({"ok": True, "size": len(body)})

    # --- set-up ---------------------------------------------------------------------------

    def _revoke_many(self, count: int) -> None:
        """Issue ``count`` certificates to one node and revoke them all (one transaction),
        so the CRL lists ``count`` serials."""
        if not count:
            return
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, REVOKED_NODE)]))
            .sign(key, hashes.SHA256())
        )
        now = datetime.now(UTC)
        for _ in range(count):
            self.ca.issue(csr, REVOKED_NODE, now=now)
        self.ca.revoke(node_id=REVOKED_NODE, reason="keyCompromise", now=now)


# --- the run ------------------------------------------------------------------------------


def run(
    enrollments_per_client: int = ENROLLMENTS_PER_CLIENT,
    crl_fetches_per_client: int = CRL_FETCHES_PER_CLIENT,
    rounds: int = ROUNDS,
    clients: int = CLIENTS,
    revoked: int = CRL_REVOKED,
    *,
    quick: bool = False,
    store: str = "sqlite",
) -> list[Result]:
    """``store="sqlite"``: this module's bench. ``store="postgres"``: CA replicas on
    PostgreSQL against one on SQLite, each a ``ca serve`` process (bench/pki_replicas.py).
    ``quick``: a small run of either."""
    if store not in STORES:
        raise ValueError(f"store {store!r} is not one of {', '.join(STORES)}")
    if store == "postgres":
        from bench import pki_replicas

        return pki_replicas.run(quick=quick)
    if quick:
        enrollments_per_client, crl_fetches_per_client, rounds, clients, revoked = 2, 4, 1, 4, 10
    with tempfile.TemporaryDirectory() as tmp, asyncio.Runner() as runner:

        def call(coro: Callable[[], Coroutine[Any, Any, float]]) -> Callable[[], float]:
            return lambda: runner.run(coro())

        rig = PkiRig(Path(tmp), clients=clients, revoked=revoked)
        try:
            runner.run(rig.start())
            enrolled_before = len(rig.enrolled)
            enroll = compare_rates(
                call(lambda: rig.enroll_round(enrollments_per_client)),
                call(lambda: rig.echo_round(enrollments_per_client)),
                rounds=rounds,
            )
            runner.run(rig.open_keepalive())
            crl = compare_rates(
                call(lambda: rig.crl_round(crl_fetches_per_client)),
                call(lambda: rig.ping_round(crl_fetches_per_client)),
                rounds=rounds,
            )
            _check(rig, enrolled_before + rounds * clients * enrollments_per_client)
        finally:
            runner.run(rig.stop())
    return [
        Result.of(
            "enrollments_per_s",
            enroll,
            "enroll/s",
            f"POST {ECHO_PATH}, trivial handler, same HttpsSite ({clients} clients, new conns)",
        ),
        Result.of(
            "crl_fetches_per_s",
            crl,
            "fetch/s",
            f"GET {ECHO_PATH}, trivial handler, same HttpsSite ({clients} clients, keep-alive)",
        ),
    ]


def info() -> dict[str, object] | None:
    """With ``--store postgres``: the set-up and where the CPU went (the SQLite bench
    reports no more than its figures)."""
    from bench import pki_replicas

    return pki_replicas.last_info()


def _check(rig: PkiRig, enrollments: int) -> None:
    """The whole run's counts: every enrollment landed in the store, every fresh-policy
    request had its own connection, keep-alive requests opened no new ones."""
    assert rig.fresh is not None
    assert rig.keepalive is not None
    if len(rig.enrolled) != enrollments:
        raise BenchFailure(f"{len(rig.enrolled)} enrollments succeeded, not {enrollments}")
    stored = {c.node_id for c in rig.ca.store.all() if c.role == "node"} - {REVOKED_NODE}
    if stored != set(rig.enrolled):
        raise BenchFailure("the CA's store does not hold exactly the enrolled certificates")
    if rig.fresh.opened != rig.fresh.requests or rig.fresh.reused:
        raise BenchFailure(
            f"{rig.fresh.requests} one-shot requests opened {rig.fresh.opened} connections"
            f" and reused {rig.fresh.reused}"
        )
    # One connection from each keep-alive client to each server, none after the warm-up.
    if not rig.keepalive_opened == rig.keepalive.opened == 2 * len(rig.keepalive.sessions):
        raise BenchFailure(
            f"keep-alive clients opened {rig.keepalive_opened} connections in the warm-up"
            f" and {rig.keepalive.opened} in all"
        )
