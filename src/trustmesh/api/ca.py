"""The mesh CA's HTTP API (specs/zero-trust-mesh.md section 7.1 to 7.3).

- ``POST /v1/enroll``: a token and a CSR buy a node certificate.
- ``POST /v1/enroll/challenge``: a nonce for an attested enrollment or rotation.
- ``POST /v1/attestation/report``: a node reports a peer's failing quote (mTLS).
- ``POST /v1/rotate``: a node authenticated by its current certificate (mTLS) gets a
  new one; the old one stays valid until it expires.
- ``GET /v1/crl``: the signed CRL, DER or PEM, with ETag and Cache-Control.
- ``POST /v1/revoke``: an admin (bearer token or admin certificate) revokes.
- ``GET /v1/health``: the CA's state, including loud expiry warnings.
- ``GET /v1/openapi.json``: the OpenAPI 3.1 document of all of the above.
- ``GET /metrics``: Prometheus metrics (an admin, as for revoke; docs/metrics.md).

On a remote store (a replica on PostgreSQL), everything that reads or writes the store
(or signs) runs on a small pool of worker threads, never on the event loop, within a
deadline: a database that is slow, restarting or gone holds a worker, and the request
is answered ``503 store_unavailable`` with ``Retry-After`` instead of hanging;
``/v1/health`` says ``"database": "unavailable"`` with a 503. On SQLite the same calls
run on the loop: they are local and short, and a thread hop would cost more than the
call (bench pki: 0.44 of the anchor with the hop, 0.64 without). Every store call the
API makes may be sent again: enrollment and rotation retries are idempotent (a commit
whose answer was lost is found by the retry).

Every request is logged on ``trustmesh.api.ca.access`` (``ca serve`` writes it to
stderr as JSON lines): method, route pattern, status, client identity, remote address,
latency. A refused enrollment also goes into the audit log (``enroll-refused``).

Run it with :class:`trustmesh.api.ca_server.CaServer` (HTTPS on trustmesh TLS).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, TypeVar

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from trustmesh.api.errors import ApiError, Handler, excerpt, field, json_body, json_errors
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.api.store_workers import StoreWorkers
from trustmesh.clock import Clock
from trustmesh.errors import ProtocolError
from trustmesh.io.https import peer_chain
from trustmesh.metrics.ca import CaMetrics
from trustmesh.metrics.exposition import METRICS_PATH, metrics_response
from trustmesh.pki.attestation import Attestation
from trustmesh.pki.attestation_report import judge_report
from trustmesh.pki.ca import (
    CRL_VALIDITY,
    REASONS,
    CertificateAuthority,
    parse_serial,
    token_hash,
)
from trustmesh.pki.enroll import Issued, Registrar
from trustmesh.pki.errors import (
    AttestationFailed,
    CsrRejected,
    NotAuthenticated,
    PkiError,
    PolicyDenied,
    SerialMismatch,
    StoreUnavailable,
    Superseded,
    TokenRejected,
    UnknownAdminToken,
    UnknownCertificate,
)
from trustmesh.pki.store import IssuedCertificate, admin_token_id
from trustmesh.tpm.evidence import EvidenceError, QuoteEvidence

log = logging.getLogger("trustmesh.api.ca")
access_log = logging.getLogger("trustmesh.api.ca.access")

MAX_BODY = 64 * 1024  # a CSR with an attestation is a few KiB
CRL_MAX_AGE = 60  # seconds a client or proxy may reuse a CRL without asking again
# How long a request waits for a store call on a worker thread before its 503 (the
# pool's wait for a connection, 5 s, and the database's lock_timeout, 15 s); /v1/health
# waits less.
STORE_DEADLINE = 20.0  # seconds
HEALTH_DEADLINE = 5.0
RETRY_AFTER = "5"  # seconds a client should wait after a 503 store_unavailable
DER_CRL = "application/pkix-crl"
PEM_CRL = PEM_CHAIN = "application/x-pem-file"

ERRORS: dict[type[ProtocolError], tuple[int, str]] = {
    CsrRejected: (400, "invalid_csr"),
    TokenRejected: (400, "invalid_token"),
    AttestationFailed: (403, "attestation_failed"),
    PolicyDenied: (403, "policy_denied"),
    NotAuthenticated: (401, "unauthenticated"),
    UnknownCertificate: (404, "unknown_certificate"),
    UnknownAdminToken: (404, "not_found"),
    Superseded: (409, "superseded"),
    SerialMismatch: (400, "serial_mismatch"),
    StoreUnavailable: (503, "store_unavailable"),
    PkiError: (400, "bad_request"),
}

REGISTRAR = web.AppKey("registrar", Registrar)
LIMITER = web.AppKey("limiter", RateLimiter)
METRICS = web.AppKey("metrics", CaMetrics)
WORKERS = web.AppKey("workers", StoreWorkers)
# Who the request proved to be, once a handler checked it (the access log's identity).
IDENTITY = web.RequestKey("identity", str)
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class CrlSnapshot:
    der: bytes
    pem: bytes
    digest: str
    this_update: datetime
    next_update: datetime
    epoch: int
    revoked: int  # how many certificates it lists
    headers: dict[str, str]  # the caching headers, the same for every fetch of it


class CrlCache:
    """The current CRL, signed again after every revocation (any process's: the store's
    revocation epoch tells) and when half its validity has passed, so a served CRL
    always has hours left before its nextUpdate."""

    def __init__(self, ca: CertificateAuthority, *, refresh: timedelta = CRL_VALIDITY / 2):
        self._ca = ca
        self._refresh = refresh
        self._current: CrlSnapshot | None = None
        self._lock = threading.Lock()  # one signing at a time (worker threads ask)

    def current(self, now: datetime) -> CrlSnapshot:
        """The CRL to serve at ``now`` (reads the store: call it off the event loop)."""
        with self._lock:
            epoch = self._ca.store.revocation_epoch()
            cached = self._current
            if cached is None or cached.epoch != epoch or now >= cached.this_update + self._refresh:
                cached = self._current = self._sign(now, epoch)
            return cached

    def latest(self) -> CrlSnapshot | None:
        """The CRL signed last, without asking the store whether it is still current
        (the metrics read it at scrape time); None before the first."""
        return self._current

    def _sign(self, now: datetime, epoch: int) -> CrlSnapshot:
        crl = self._ca.crl(now=now)
        der = crl.public_bytes(serialization.Encoding.DER)
        next_update = crl.next_update_utc
        assert next_update is not None
        return CrlSnapshot(
            der=der,
            pem=crl.public_bytes(serialization.Encoding.PEM),
            digest=hashlib.sha256(der).hexdigest()[:32],
            this_update=crl.last_update_utc,
            next_update=next_update,
            epoch=epoch,
            revoked=len(crl),
            headers={
                "Cache-Control": f"public, max-age={CRL_MAX_AGE}, must-revalidate",
                "Last-Modified": _http_date(crl.last_update_utc),
                "Expires": _http_date(next_update),
                "Vary": "Accept",
            },
        )


CRLS = web.AppKey("crls", CrlCache)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")


def ca_app(
    registrar: Registrar,
    *,
    limiter: RateLimiter,
    clock: Clock | None = None,
) -> web.Application:
    """The CA API for ``registrar``; every handler reads the time from ``clock`` (by
    default the registrar's, which is the CA's unless it was given another)."""
    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=[access_logged, json_errors(ERRORS), retry_after_outage],
    )
    app[REGISTRAR] = registrar
    app[LIMITER] = limiter
    app[CRLS] = crls = CrlCache(registrar.ca)
    app[CLOCK] = registrar.clock if clock is None else clock
    app[METRICS] = CaMetrics(registrar.ca, app[CLOCK], crls.latest)
    app[WORKERS] = StoreWorkers()
    app.on_cleanup.append(_stop_workers)
    app.router.add_post("/v1/enroll", enroll)
    app.router.add_post("/v1/enroll/challenge", challenge)
    app.router.add_post("/v1/attestation/report", attestation_report)
    app.router.add_post("/v1/rotate", rotate)
    app.router.add_get("/v1/crl", crl)
    app.router.add_post("/v1/revoke", revoke)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get(METRICS_PATH, metrics)
    return app


# --- the access log -------------------------------------------------------------------------


@web.middleware
async def access_logged(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request on ``trustmesh.api.ca.access``, and its metrics. Outermost:
    it sees the status the error middleware chose."""
    clock = request.app[CLOCK]
    started = clock.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # what the error middleware leaves (a redirect)
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before its answer
        raise
    finally:
        seconds = clock.monotonic() - started
        route = _route(request)
        request.app[METRICS].request(request.method, route, status, seconds)
        access_log.info(
            "http.request",
            extra={
                "fields": {
                    "method": excerpt(request.method, 16),
                    "route": route,
                    "status": status,
                    "identity": _identity(request),
                    "remote": request.remote,
                    "latency_ms": round(seconds * 1000, 3),
                }
            },
        )


@web.middleware
async def retry_after_outage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A 503 ``store_unavailable`` tells the client when to try again."""
    try:
        return await handler(request)
    except StoreUnavailable as exc:
        raise ApiError(
            503, str(exc), code="store_unavailable", headers={"Retry-After": RETRY_AFTER}
        ) from None


def _route(request: web.Request) -> str | None:
    """The pattern of the route that matched (``/v1/enroll``), never the raw path."""
    resource = request.match_info.route.resource
    return None if resource is None else resource.canonical


def _identity(request: web.Request) -> str:
    """Who the client is: what a handler proved (``node:ID``, ``admin:NAME``,
    ``token:ID``, ``enroll:NODE_ID``), else what it presented without proof here
    (``token:ID`` of a bearer token, ``unverified:CN`` of a client certificate), else
    ``anonymous``. Never a token itself: a bearer token shows as its public id."""
    if IDENTITY in request:
        return request[IDENTITY]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return f"token:{admin_token_id(token_hash(token.strip()))}"
    chain = peer_chain(request)
    if chain:
        names = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common = str(names[0].value) if names else "-"
        return f"unverified:{excerpt(common, 64)}"
    return ANONYMOUS


async def _authenticated(request: web.Request, now: datetime) -> IssuedCertificate:
    """The client's current node certificate (mTLS), recorded as its identity."""
    chain = peer_chain(request)
    registrar = request.app[REGISTRAR]
    record = await _off_loop(request.app, lambda: registrar.authenticate(chain, now=now))
    request[IDENTITY] = f"node:{record.node_id}"
    return record


T = TypeVar("T")


async def _off_loop(
    app: web.Application, call: Callable[[], T], *, deadline: float = STORE_DEADLINE
) -> T:
    """``call()`` (it reads or writes the store, or signs): on the API's worker threads
    when it may block (a remote store, a key on a token), within ``deadline`` seconds
    (:class:`~trustmesh.api.store_workers.StoreWorkers`); else here and now."""
    if not app[REGISTRAR].ca.may_block:
        return call()
    return await app[WORKERS].run(call, deadline=deadline)


async def refresh_crl(app: web.Application) -> None:
    """Bring the CRL the metrics show up to date (before a scrape), off the loop; when
    the database does not answer, the metrics still answer, with the CRL signed last
    and ``trustmesh_ca_database_up`` at 0."""
    crls, now, metrics = app[CRLS], app[CLOCK].now(), app[METRICS]
    try:
        await _off_loop(app, lambda: crls.current(now), deadline=HEALTH_DEADLINE)
    except StoreUnavailable:
        metrics.database_up.set(0)
    else:
        metrics.database_up.set(1)


async def _stop_workers(app: web.Application) -> None:
    await asyncio.to_thread(app[WORKERS].shutdown)


# --- handlers ---------------------------------------------------------------------------


async def enroll(request: web.Request) -> web.Response:
    registrar = request.app[REGISTRAR]
    body: dict[str, object] | None = None
    try:
        _rate_limit(request)
        pem = _wants_pem(request, ("pem", "json"))  # a bad ?format fails before issuing
        body = await json_body(request)
        token = field(body, "token") or ""
        csr = field(body, "csr") or ""
        node_id = field(body, "node_id", required=False)
        attestation = _attestation(body)
        actor = _client(request)
        now = request.app[CLOCK].now()
        issued = await _off_loop(
            request.app,
            lambda: registrar.enroll(
                token, csr, node_id=node_id, attestation=attestation, actor=actor, now=now
            ),
        )
    except (ApiError, ProtocolError) as exc:
        await _enrollment_refused(request, body, exc)
        raise
    request.app[METRICS].enrollments.labels("retried" if issued.retried else "issued").inc()
    request[IDENTITY] = f"enroll:{issued.record.node_id}"
    log.info(
        "enrolled %s (serial %s%s)",
        issued.record.node_id,
        issued.record.serial_hex,
        ", a retry: the certificate already issued" if issued.retried else "",
    )
    return _certificate_answer(
        request,
        pem,
        issued,
        {**_certificate_fields(issued, registrar), "config": registrar.settings.to_json()},
    )


async def challenge(request: web.Request) -> web.Response:
    """A nonce for an attested enrollment (``token``) or rotation (mTLS)."""
    _rate_limit(request)
    registrar = request.app[REGISTRAR]
    now = request.app[CLOCK].now()
    body = await json_body(request)
    token = field(body, "token", required=False)
    if token:
        nonce, expires = await _off_loop(
            request.app, lambda: registrar.enrollment_challenge(token, now=now)
        )
    else:
        current = await _authenticated(request, now)
        nonce, expires = registrar.rotation_challenge(current, now=now)
    answer: dict[str, object] = {
        "nonce": base64.b64encode(nonce).decode(),
        "expires": expires.isoformat(),
    }
    answer.update(registrar.policy.attestation.challenge(nonce, body, now))
    return web.json_response(answer)


async def attestation_report(request: web.Request) -> web.Response:
    """A node's report of a peer's failing link quote; the CA checks the quote itself."""
    _rate_limit(request)
    registrar = request.app[REGISTRAR]
    now = request.app[CLOCK].now()
    reporter = await _authenticated(request, now)
    body = await json_body(request)
    serial = parse_serial(field(body, "serial") or "")
    try:
        evidence = QuoteEvidence.from_json(body.get("evidence"))
    except EvidenceError as exc:
        raise ApiError(400, f"evidence: {exc}") from None
    policy = registrar.tpm_policy()
    verdict = await _off_loop(
        request.app, lambda: judge_report(registrar.ca, reporter, serial, evidence, policy, now)
    )
    if verdict.revoked:
        log.warning(
            "revoked %x on a failing quote reported by %s: %s",
            serial,
            reporter.node_id,
            verdict.detail,
        )
    return web.json_response(verdict.to_json())


async def rotate(request: web.Request) -> web.Response:
    registrar = request.app[REGISTRAR]
    outcomes = request.app[METRICS].rotations
    try:
        _rate_limit(request)
        pem = _wants_pem(request, ("pem", "json"))
        # Cheap refusal first: a client without a current certificate is not read further.
        current = await _authenticated(request, request.app[CLOCK].now())
        body = await json_body(request)
        csr = field(body, "csr") or ""
        current_serial = field(body, "current_cert_serial", required=False)
        attestation = _attestation(body)
        actor = _client(request)
        # The body may have taken a while: the store checks the certificate again (revoked,
        # expired, superseded) at this time, in the transaction that issues.
        now = request.app[CLOCK].now()
        issued = await _off_loop(
            request.app,
            lambda: registrar.rotate(
                current,
                csr,
                current_serial=current_serial,
                attestation=attestation,
                actor=actor,
                now=now,
            ),
        )
    except (ApiError, ProtocolError) as exc:
        outcomes.labels(_error_code(exc)).inc()
        raise
    outcomes.labels("retried" if issued.retried else "issued").inc()
    log.info(
        "rotated %s: serial %s replaces %s%s",
        current.node_id,
        issued.record.serial_hex,
        current.serial_hex,
        " (a retry: the certificate already issued)" if issued.retried else "",
    )
    return _certificate_answer(
        request,
        pem,
        issued,
        {
            **_certificate_fields(issued, registrar),
            "valid_not_before": issued.record.not_before.isoformat(),
            "valid_not_after": issued.record.not_after.isoformat(),
            "previous_serial": current.serial_hex,
        },
    )


async def crl(request: web.Request) -> web.Response:
    """The CRL, cheap to poll: it is signed once per revocation (or half-validity), not
    per request, and a client that sends back its ETag in ``If-None-Match`` gets a 304
    with no body while the CRL is the same. The ETag is strong: a hash of the DER (which
    includes the CRL number), and the encoding."""
    pem = _wants_pem(request, ("pem", "der"))
    crls, now = request.app[CRLS], request.app[CLOCK].now()
    try:
        snapshot = await _off_loop(request.app, lambda: crls.current(now))
    except StoreUnavailable:
        # A CRL is a signed document valid until its nextUpdate: while the database is
        # away, the one signed last is still the best answer (a node keeps the newest
        # CRL it has seen, by number, whichever replica it came from).
        latest = crls.latest()
        if latest is None or now >= latest.next_update:
            raise
        log.warning("serving the CRL signed last: the CA database is unavailable")
        snapshot = latest
    etag = f'"{snapshot.digest}-{"pem" if pem else "der"}"'
    headers = {"ETag": etag, **snapshot.headers}
    wanted = _etags(request.headers.get("If-None-Match", ""))
    if etag in wanted or "*" in wanted:
        return web.Response(status=304, headers=headers)
    body, content_type = (snapshot.pem, PEM_CRL) if pem else (snapshot.der, DER_CRL)
    return web.Response(body=body, content_type=content_type, headers=headers)


async def revoke(request: web.Request) -> web.Response:
    _rate_limit(request)
    admin = await _admin(request)
    body = await json_body(request)
    serial_text = field(body, "serial", required=False)
    node_id = field(body, "node_id", required=False)
    reason = field(body, "reason", required=False) or "unspecified"
    if reason not in REASONS:
        raise ApiError(400, f"unknown reason {reason!r}; one of {', '.join(REASONS)}")
    if serial_text is None and node_id is None:
        raise ApiError(400, "give serial or node_id")
    ca = request.app[REGISTRAR].ca
    now = request.app[CLOCK].now()
    serial = None if serial_text is None else parse_serial(serial_text)

    def act() -> list[int]:
        if serial is None:
            return ca.revoke(node_id=node_id, reason=reason, now=now, actor=admin)
        record = ca.store.get(serial)
        if record is None:
            raise UnknownCertificate(f"no certificate with serial {serial:x}")
        if node_id is not None and record.node_id != node_id:
            raise ApiError(400, f"certificate {serial:x} belongs to {record.node_id!r}")
        return ca.revoke(serial=serial, reason=reason, now=now, actor=admin)

    revoked = await _off_loop(request.app, act)
    if revoked:
        log.warning("revoked %s (%s) by %s", ", ".join(f"{s:x}" for s in revoked), reason, admin)
    return web.Response(status=204)


async def health(request: web.Request) -> web.Response:
    """The CA's state. A 503 with ``"status": "unavailable"`` when its database does not
    answer within HEALTH_DEADLINE (a load balancer takes the replica out)."""
    ca = request.app[REGISTRAR].ca
    now = request.app[CLOCK].now()
    warnings = ca.expiry_warnings(now=now)
    crls = request.app[CRLS]
    fields: dict[str, object] = {
        "warnings": warnings,
        "root_not_after": ca.root_cert.not_valid_after_utc.isoformat(),
        "issuing_not_after": ca.issuing_cert.not_valid_after_utc.isoformat(),
        "store": ca.store.kind,
    }

    def read() -> CrlSnapshot:
        ca.store.ping()
        return crls.current(now)

    try:
        snapshot = await _off_loop(request.app, read, deadline=HEALTH_DEADLINE)
    except StoreUnavailable as exc:
        return web.json_response(
            {"status": "unavailable", "database": "unavailable", "error": str(exc), **fields},
            status=503,
            headers={"Retry-After": RETRY_AFTER},
        )
    return web.json_response(
        {
            "status": "warning" if warnings else "ok",
            "database": "ok",
            **fields,
            "crl_next_update": snapshot.next_update.isoformat(),
            "revoked": snapshot.revoked,
        }
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics, for an admin (a bearer token or an admin certificate, as for
    revoke): a CA's traffic and refusals are not for every node to read."""
    _rate_limit(request)
    await _admin(request)
    await refresh_crl(request.app)
    return metrics_response(request, request.app[METRICS].registry)


def openapi_document() -> dict[str, Any]:
    text = resources.files("trustmesh.api").joinpath("ca_openapi.json").read_text()
    document: dict[str, Any] = json.loads(text)
    return document


# --- helpers ----------------------------------------------------------------------------


def _rate_limit(request: web.Request) -> None:
    wait = request.app[LIMITER].check(_client(request))
    if wait is not None:
        seconds = max(1, int(wait + 0.999))
        raise ApiError(
            429,
            f"too many requests from this client; retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


def _error_code(exc: ApiError | ProtocolError) -> str:
    """The code the error middleware answers ``exc`` with (``invalid_token`` ...)."""
    if isinstance(exc, ApiError):
        return exc.code
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls][1]
    return "internal"


async def _enrollment_refused(
    request: web.Request, body: dict[str, object] | None, exc: ApiError | ProtocolError
) -> None:
    """Count a refused enrollment, and put it in the audit log (with the node its token
    is for) when the request named a token this CA issued: a stranger's garbage, or a
    flood (rate limited), is the metrics' and the access log's to show, never rows an
    anonymous client could add to the audit log without end."""
    code = _error_code(exc)
    request.app[METRICS].enrollments.labels(code).inc()
    client = _client(request)
    token = None if body is None else body.get("token")
    if code in ("rate_limited", "store_unavailable") or not isinstance(token, str) or not token:
        log.info("enrollment refused (%s) from %s, with no token of this CA", code, client)
        return
    store = request.app[REGISTRAR].ca.store
    message = exc.message if isinstance(exc, ApiError) else str(exc)
    now = request.app[CLOCK].now()

    def audit() -> str | None:
        known = store.token(token_hash(token))
        if known is None:
            return None
        detail = {
            "reason": code,
            "message": excerpt(message, 240),
            "node_id": known.node_id,
            "client": client,
        }
        store.audit_event(
            "enroll-refused", detail=detail, now=now, actor=client, node_id=known.node_id
        )
        return known.node_id

    try:
        node_id = await _off_loop(request.app, audit)
    except Exception:  # the refusal stands, whatever the audit log's trouble
        log.exception("could not audit a refused enrollment")
        return
    if node_id is None:
        log.info("enrollment refused (%s) from %s, with no token of this CA", code, client)
        return
    log.warning("enrollment refused (%s) for %s from %s", code, node_id, client)


def _attestation(body: dict[str, object]) -> Attestation | None:
    value = body.get("attestation")
    if isinstance(value, str):  # a form field carries the object as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise ApiError(400, "attestation is not a JSON object") from None
    return None if value is None else Attestation.from_json(value)


def _certificate_fields(issued: Issued, registrar: Registrar) -> dict[str, object]:
    record = issued.record
    result: dict[str, object] = {
        "certificate": record.pem,
        "ca_cert": registrar.ca.chain_pem,
        "serial": record.serial_hex,
        "node_id": record.node_id,
        "not_before": record.not_before.isoformat(),
        "not_after": record.not_after.isoformat(),
    }
    warnings = registrar.ca.expiry_warnings(now=record.not_before)
    if warnings:
        result["warnings"] = warnings
    return result


def _certificate_answer(
    request: web.Request, pem: bool, issued: Issued, fields: dict[str, object]
) -> web.Response:
    """JSON, or with ``Accept: application/x-pem-file`` (or ``?format=pem``) the chain a
    node presents: its certificate then the issuing CA's, ready for ``curl -o node.crt``."""
    if not pem:
        return web.json_response(fields)
    issuing = request.app[REGISTRAR].ca.issuing_cert.public_bytes(serialization.Encoding.PEM)
    return web.Response(body=issued.record.pem.encode() + issuing, content_type=PEM_CHAIN)


async def _admin(request: web.Request) -> str:
    """Who the admin is: a known, unexpired, unrevoked bearer token's label, or a valid,
    unrevoked admin certificate's name. Any other credential is a 401."""
    registrar = request.app[REGISTRAR]
    now = request.app[CLOCK].now()
    auth = request.headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        store = registrar.ca.store
        known = (
            await _off_loop(request.app, lambda: store.admin_token(token_hash(token.strip())))
            if scheme.lower() == "bearer"
            else None
        )
        state = "unknown" if known is None else known.state(now)
        if known is not None:
            request[IDENTITY] = f"token:{known.id}"
        if known is None or state != "valid":
            log.warning("admin call refused: %s admin token", state)
            raise ApiError(
                401,
                "invalid admin token" if known is None else f"the admin token is {state}",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return f"token:{known.label}"
    chain = peer_chain(request)
    if not chain:
        raise ApiError(
            401,
            "admin credentials needed: a bearer token or an admin client certificate",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        record = await _off_loop(request.app, lambda: registrar.authenticate(chain, now=now))
    except (NotAuthenticated, PolicyDenied) as exc:  # foreign, expired or revoked
        raise ApiError(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    request[IDENTITY] = f"{record.role}:{record.node_id}"
    if record.role != "admin":
        raise ApiError(403, f"{record.node_id!r} is not an admin of this CA")
    return f"cert:{record.node_id}"


def _wants_pem(request: web.Request, formats: tuple[str, str]) -> bool:
    """PEM when ``?format=pem`` or the Accept header names application/x-pem-file."""
    wanted = request.query.get("format")
    if wanted is not None:
        if wanted not in formats:
            raise ApiError(400, f"format is {' or '.join(formats)}")
        return wanted == "pem"
    return PEM_CRL in request.headers.get("Accept", "")


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _http_date(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
