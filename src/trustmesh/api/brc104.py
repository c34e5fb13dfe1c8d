"""BRC-104 for aiohttp servers: a middleware that puts any app behind BRC-103.

``Brc104Server(wallet).install(app)`` answers ``POST /.well-known/auth`` (handshakes and
certificate exchange) and checks every other request: its ``x-bsv-auth-*`` headers must
carry a general message, signed over the request payload, on a live session. The handler
then sees the client's verified identity key through :func:`identity_key_of`, and its
response is signed over the response payload.

Unlike the reference express middleware, the request payload is rebuilt from the raw
body bytes (so JSON with spaces, or ``application/json; charset=utf-8``, verifies), the
application's ``Content-Type`` is kept, an empty body is signed as the reference client
expects (``varint(0)``), and a certificateResponse POST gets an immediate 204.

Certificates the server requests (``PeerConfig.requested_certificates``) go out in the
initialResponse, as the reference's; the client answers with a certificateResponse POST,
and its requests are held until a certificate validates. A client that has none is
refused at once: its empty certificateResponse gets 400 (as the reference answers it) and
its requests 401 ``ERR_CERTIFICATES_MISSING``; a client that sends nothing at all (the TS
AuthFetch holding no match) gets that 401 after a short grace (``certificate_grace_ms``,
1 s: a wallet may ask its user; at most 3 s however slow the client was to send its first
request). Held requests are bounded per session (the core), per client address (429 for
the newcomer) and in all (the oldest held request of the address holding the most gets
the 429 instead, as half-open sessions are evicted: an attacker's addresses cannot keep
an honest client's first request out), counted in ``stats``, and in time (the
certificate timeout plus a margin).

Under attack: each client address (an IPv6 one per /64) may post so many handshakes a
second and make so many general requests a second, and each verified identity key so
many requests; beyond that 429 with ``Retry-After``. The unproven sessions an address's
handshakes make are bounded per address, so one address's flood of handshakes pushes out
only its own (``PeerConfig.max_unproven_sessions_per_source``). Error bodies quote at most
a short excerpt of what the client sent.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable

from aiohttp import web

from trustmesh.api.errors import excerpt
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.brc103 import http as brc104
from trustmesh.brc103.certificates import VerifiableCertificate
from trustmesh.brc103.encoding import b64decode, js_stringify
from trustmesh.brc103.errors import (
    Brc103Error,
    CertificatesMissingError,
    CertificatesTimeoutError,
    MalformedMessageError,
)
from trustmesh.brc103.messages import AuthMessage, MessageType, parse_message_bytes
from trustmesh.brc103.peer import (
    Event,
    GeneralMessageReceived,
    HeldMessagesDropped,
    Peer,
    PeerConfig,
)
from trustmesh.brc103.revocation import RevocationChecker
from trustmesh.brc103.sessions import Session
from trustmesh.brc103.wallet import Wallet
from trustmesh.errors import DecodeError
from trustmesh.io.brc103 import PeerTimer, monotonic_ms
from trustmesh.io.limits import LimitStats, ResourcePolicy, source_of

log = logging.getLogger(__name__)
IDENTITY_KEY = web.RequestKey("trustmesh.brc103.identity_key", str)
CERTIFICATES = web.RequestKey("trustmesh.brc103.certificates", list[VerifiableCertificate])
SESSION_IDLE_MS = 3_600_000  # a client silent for an hour handshakes again
HOLD_MARGIN = 5.0  # seconds past the certificate timeout before a held request gives up
# A client asked for certificates that sends no certificateResponse within this long of its
# first held request has none (PeerConfig.certificate_grace_ms; the TS AuthFetch says
# nothing when it holds no matching certificate, and sends the ones it holds at once; a
# wallet that asks its user first needs a moment).
CERTIFICATE_GRACE_MS = 1_000
HELD_FULL = "too many requests waiting for certificates; show them first"
AUTH_RATE = 20.0  # /.well-known/auth messages per second per client address, on average
AUTH_BURST = 100
MAX_DESCRIPTION = 200  # characters of an error's description
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HeldRequestEvictedError(Exception):
    """A held request let go to make room for another address's (answered 429)."""


def identity_key_of(request: web.Request) -> str:
    """The client's verified identity key (``"unknown"`` on an allowed unauthenticated
    request)."""
    try:
        return request[IDENTITY_KEY]
    except KeyError:
        raise RuntimeError("the BRC-104 middleware did not run for this request") from None


def _error(
    status: int, code: str, description: str, *, retry_after: float | None = None
) -> web.Response:
    """A JSON error, as the reference middleware answers them (unsigned). The
    description is cut to a short excerpt: it may quote what the client sent."""
    response = web.json_response(
        {"status": "error", "code": code, "description": excerpt(description, MAX_DESCRIPTION)},
        status=status,
    )
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def source_of_request(request: web.Request) -> str:
    """The client address a request counts under (an IPv6 address per /64)."""
    return source_of(request.remote or "unknown")


class Brc104Server:
    def __init__(
        self,
        wallet: Wallet,
        config: PeerConfig | None = None,
        *,
        revocation: RevocationChecker | None = None,
        allow_unauthenticated: bool = False,
        auth_rate_limit: RateLimiter | None = None,
        policy: ResourcePolicy | None = None,
        request_rate_limit: RateLimiter | None = None,
        identity_rate_limit: RateLimiter | None = None,
        certificate_grace_ms: int | None = CERTIFICATE_GRACE_MS,
        max_held_requests: int | None = None,
        max_held_requests_per_source: int | None = None,
        clock: Callable[[], int] = monotonic_ms,
    ) -> None:
        if config is None:
            config = PeerConfig(session_idle_ms=SESSION_IDLE_MS)
        if config.certificate_grace_ms is None and certificate_grace_ms is not None:
            config = dataclasses.replace(config, certificate_grace_ms=certificate_grace_ms)
        self.peer = Peer(wallet, config, revocation=revocation)
        self.timer = PeerTimer(self.peer, clock, self._dispatch)
        self.allow_unauthenticated = allow_unauthenticated
        self._clock = clock
        policy = policy or ResourcePolicy()

        def seconds() -> float:
            return clock() / 1000

        # Handshakes cost the server two signatures' worth of curve work: one client must
        # not be able to spend it all, nor push other clients' sessions out of the table.
        self.auth_rate_limit = auth_rate_limit or RateLimiter(AUTH_RATE, AUTH_BURST, clock=seconds)
        # General requests: per client address before anything is verified, and per
        # verified identity key (an address cannot spend another client's budget).
        self.request_rate_limit = request_rate_limit or RateLimiter(
            policy.request_rate, policy.request_burst, clock=seconds
        )
        self.identity_rate_limit = identity_rate_limit or RateLimiter(
            policy.request_rate, policy.request_burst, clock=seconds
        )
        # Requests held until the client's certificates validate, by id() of their
        # message: the peer hands the same object back when it releases or drops it.
        self._waiting: dict[int, asyncio.Future[GeneralMessageReceived]] = {}
        # ... and, oldest first, the address each came from and its message.
        self._held: dict[int, tuple[str, AuthMessage]] = {}
        # Each held request keeps an HTTP request (and its task) open: they are bounded in
        # all and per client address (the core bounds them per session, in count and bytes).
        self.max_held_requests = max_held_requests or policy.max_unauthenticated
        self.max_held_requests_per_source = (
            max_held_requests_per_source or policy.max_unauthenticated_per_source
        )
        self.held_requests = 0
        self._held_by_source: collections.Counter[str] = collections.Counter()
        self.stats = LimitStats("brc104")

    @property
    def identity_key(self) -> str:
        return self.peer.identity_key

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, _app: web.Application) -> None:
        self.timer.cancel()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == brc104.AUTH_PATH:
            if request.method != "POST":
                return _error(405, "ERR_METHOD_NOT_ALLOWED", "POST an AuthMessage here")
            return await self._auth_endpoint(request)
        if brc104.REQUEST_ID not in request.headers:
            if self.allow_unauthenticated:
                request[IDENTITY_KEY] = "unknown"
                return await handler(request)
            return web.json_response(
                {
                    "status": "error",
                    "code": "UNAUTHORIZED",
                    "message": "Mutual-authentication failed!",
                },
                status=401,
            )
        return await self._general(request, handler)

    # --- /.well-known/auth --------------------------------------------------------------

    async def _auth_endpoint(self, request: web.Request) -> web.StreamResponse:
        source = source_of_request(request)
        wait = self.auth_rate_limit.check(source)
        if wait is not None:
            return _error(
                429, "ERR_RATE_LIMITED", "too many handshakes; slow down", retry_after=wait
            )
        try:
            message = parse_message_bytes(await request.read())
            if message.message_type is MessageType.GENERAL:
                raise MalformedMessageError(
                    "general messages travel as ordinary requests, not to /.well-known/auth"
                )
            events = self.peer.receive(message, self._clock(), source=source)
        except (MalformedMessageError, DecodeError) as exc:
            return _error(400, getattr(exc, "code", "ERR_MALFORMED_MESSAGE"), str(exc))
        except Brc103Error as exc:
            log.info("refused a %s from %s: %s", message.message_type, source, excerpt(exc))
            return _error(401, exc.code, str(exc))
        self._dispatch(events)
        self.timer.arm()
        replies = self.peer.messages_to_send()
        if message.message_type is MessageType.CERTIFICATE_RESPONSE and _says_none(message, events):
            # As the reference answers a certificateResponse without certificates (its
            # body is {"status": "No certificates provided"}); the requests it holds,
            # and those that follow, get their 401 at once.
            return _error(400, CertificatesMissingError.code, "No certificates provided")
        if not replies:  # a certificateResponse: the reference never answers it at all
            return web.Response(status=204)
        reply = replies[0]
        for extra in replies[1:]:
            log.warning("dropped an extra %s reply", extra.message_type)
        return web.Response(
            body=reply.to_bytes(), content_type="application/json", headers=_auth_headers(reply)
        )

    # --- general messages ---------------------------------------------------------------

    async def _general(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        wait = self.request_rate_limit.check(source_of_request(request))
        if wait is not None:
            return _error(
                429, "ERR_RATE_LIMITED", "too many requests from this address", retry_after=wait
            )
        headers = request.headers
        try:
            request_id_text = headers[brc104.REQUEST_ID]
            request_id = b64decode(request_id_text, "request id")
            if len(request_id) != brc104.REQUEST_ID_SIZE:
                raise MalformedMessageError("x-bsv-auth-request-id must be 32 bytes of base64")
            body = await request.read()
            path, _, query = request.raw_path.partition("?")
            signed = brc104.signed_request_headers(headers.items())
            # The Python reference client signs a URL without a path as "no path" (-1),
            # where every other client signs "/": both are tried for "/".
            messages = [
                brc104.message_from_headers(
                    headers,
                    brc104.encode_request_payload(
                        request_id,
                        request.method,
                        variant,
                        "?" + query if query else "",
                        signed,
                        body or None,
                    ),
                )
                for variant in ([path, ""] if path == "/" else [path])
            ]
        except (DecodeError, Brc103Error, KeyError, ValueError) as exc:
            return _error(400, "ERR_MALFORMED_REQUEST", str(exc))
        message = messages[0]
        source = source_of_request(request)
        if self._would_hold(message) and not self._room_to_hold(source):
            return _error(429, "ERR_RATE_LIMITED", HELD_FULL, retry_after=1.0)
        try:
            event = await self._receive_general(messages, source)
        except HeldRequestEvictedError:
            return _error(429, "ERR_RATE_LIMITED", HELD_FULL, retry_after=1.0)
        except Brc103Error as exc:
            log.info("refused a request from %s: %s", excerpt(message.identity_key), excerpt(exc))
            return _error(401, "ERR_AUTH_FAILED", f"{exc.code}: {exc}")
        # Keep the session itself: the answer is owed even if the table drops it meanwhile.
        session = self.peer.sessions.get(event.session_nonce)
        if session is None:
            return _error(401, "ERR_AUTH_FAILED", "the session ended; handshake again")
        wait = self.identity_rate_limit.check(event.identity_key)
        if wait is not None:
            # The request verified, so the refusal is signed like any answer to it.
            limited = _error(
                429, "ERR_RATE_LIMITED", "too many requests from this identity", retry_after=wait
            )
            return self._sign_response(limited, request_id, request_id_text, session)
        request[IDENTITY_KEY] = event.identity_key
        request[CERTIFICATES] = list(session.certificates)
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a 404 or 405 is answered, and signed, too
            response = web.Response(
                status=exc.status, reason=exc.reason, body=exc.body, headers=exc.headers
            )
        return self._sign_response(response, request_id, request_id_text, session)

    def _would_hold(self, message: AuthMessage) -> bool:
        """Would the peer hold this request for its session's certificates?"""
        session = self.peer.sessions.get(message.your_nonce or "")
        return (
            session is not None
            and session.certificates_required
            and not session.certificates_validated
            and not session.certificates_missing
        )

    def _room_to_hold(self, source: str) -> bool:
        """Room for one more held request from ``source``: none (False) at its own cap.
        The cap on all never refuses (:meth:`_make_room`)."""
        if self._held_by_source[source] >= self.max_held_requests_per_source:
            self.stats.hit(
                "held.refused_per_source", source, f"{self.max_held_requests_per_source} held"
            )
            return False
        return True

    def _make_room(self, source: str) -> None:
        """At the cap on all, before a verified request from ``source`` is held: the
        oldest held request of the address holding the most (if it holds more than
        ``source`` will, else ``source``'s own oldest, else the oldest of all) is let go
        with a 429, as half-open sessions are evicted. Only a request that verified (and
        that the peer holds) makes room: a forged one cannot push others out."""
        while self.held_requests >= self.max_held_requests and self._held:
            victim = self._held_victim(source)
            detail = f"{self.max_held_requests} held; one let go for {source}"
            self.stats.hit("held.evicted_total", self._held[victim][0], detail)
            self._let_go(victim, HeldRequestEvictedError(HELD_FULL))

    def _held_victim(self, source: str) -> int:
        oldest: dict[str, int] = {}  # address -> its oldest held request
        for key, (held_source, _message) in self._held.items():  # oldest first
            oldest.setdefault(held_source, key)
        top = max(self._held_by_source, key=lambda s: self._held_by_source[s])
        if top in oldest and self._held_by_source[top] > self._held_by_source[source] + 1:
            return oldest[top]
        return oldest.get(source) or next(iter(self._held))

    def _let_go(self, key: int, error: Exception) -> None:
        """Stop holding request ``key``: its waiter gets ``error``, its slot is free now
        and the peer forgets its message."""
        waiter = self._waiting.pop(key, None)
        held_source, message = self._held.pop(key)
        self._release_slot(held_source)
        self.peer.unhold(message)
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _release_slot(self, source: str) -> None:
        self.held_requests -= 1
        self._held_by_source[source] -= 1
        if self._held_by_source[source] <= 0:
            del self._held_by_source[source]

    async def _receive_general(
        self, candidates: list[AuthMessage], source: str
    ) -> GeneralMessageReceived:
        """The verified general message: at once, or once the client's certificates
        validate (it is held until then, within the certificate timeout, or refused at
        once when the client turns out to have none)."""
        message, events = self.peer.receive_any(candidates, self._clock())  # raises if refused
        mine = next(
            (e for e in events if isinstance(e, GeneralMessageReceived) and e.message is message),
            None,
        )
        waiter: asyncio.Future[GeneralMessageReceived] | None = None
        if mine is None:
            self._make_room(source)
            waiter = asyncio.get_running_loop().create_future()
            self._waiting[id(message)] = waiter
            self._held[id(message)] = (source, message)
            self.held_requests += 1
            self._held_by_source[source] += 1
        try:
            self._dispatch(events)
            self.timer.arm()
            if waiter is None:
                assert mine is not None
                return mine
            limit = self.peer.config.certificate_timeout_ms / 1000 + HOLD_MARGIN
            try:
                async with asyncio.timeout(limit):
                    return await waiter
            except TimeoutError:
                raise CertificatesTimeoutError("the client's certificates did not arrive") from None
        finally:
            if self._waiting.pop(id(message), None) is not None:
                self._held.pop(id(message), None)
                self._release_slot(source)

    def _sign_response(
        self,
        response: web.StreamResponse,
        request_id: bytes,
        request_id_text: str,
        session: Session,
    ) -> web.StreamResponse:
        if not isinstance(response, web.Response) or not isinstance(
            response.body, bytes | bytearray | None
        ):
            log.error("a streamed response cannot be signed under BRC-104")
            return _error(500, "ERR_INTERNAL_SERVER_ERROR", "streamed responses cannot be signed")
        body = bytes(response.body or b"")
        payload = brc104.encode_response_payload(
            request_id,
            response.status,
            brc104.signed_response_headers(response.headers.items()),
            body,
        )
        reply = self.peer.create_general(payload, session=session)
        response.headers.update(_auth_headers(reply))
        response.headers[brc104.REQUEST_ID] = request_id_text
        return response

    # --- events and timers --------------------------------------------------------------

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, GeneralMessageReceived):
                waiter = self._waiting.get(id(event.message))
                if waiter is not None and not waiter.done():
                    waiter.set_result(event)
            elif isinstance(event, HeldMessagesDropped):
                for message in event.messages:
                    waiter = self._waiting.get(id(message))
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(event.error)


def _says_none(message: AuthMessage, events: list[Event]) -> bool:
    """Did this certificateResponse say the client has none of the certificates we
    require (the peer then ends the session's wait with CertificatesMissingError)?"""
    return not message.certificates and any(
        isinstance(event, HeldMessagesDropped)
        and isinstance(event.error, CertificatesMissingError)
        and event.session_nonce == message.your_nonce
        for event in events
    )


def _auth_headers(message: AuthMessage) -> dict[str, str]:
    """The reply's headers as the express middleware sends them (the TS client reads the
    JSON body of /.well-known/auth answers, but other clients may read these)."""
    headers = brc104.auth_headers(message)
    headers[brc104.MESSAGE_TYPE] = message.message_type.value
    if message.message_type is not MessageType.GENERAL and message.requested_certificates:
        headers[brc104.REQUESTED_CERTIFICATES] = js_stringify(message.requested_json()).decode()
    return headers
