"""BRC-104 client: ``fetch`` over HTTP with BRC-103 mutual authentication.

The first request to an origin performs the handshake (``POST /.well-known/auth``), then
every request is a signed general message in ``x-bsv-auth-*`` headers, and every response
must be signed by the same server identity over the response payload. A response that
is not (a plain HTTP server, a wrong key, a bad signature) raises
:class:`UnauthenticatedResponseError`: nothing unauthenticated is returned as if it were.

Compatible with the reference express middleware and our own server: an empty response
body verifies whether the server signed it as ``varint(0)`` or ``varint(-1)``, and the
client does not wait for an answer to its certificateResponse (express never sends one).

A server that requests certificates in its (signed) initialResponse is answered at once
with a certificateResponse: the requested fields of the certificates we hold, or none at
all, so that the server refuses our requests at once instead of holding them.

A server may also ask for certificates in the ``x-bsv-auth-requested-certificates`` response
header. Nothing signs that header, so whoever sits on the path can write it: the client
never reveals certificate fields because of it. The request is handed to the caller
(``AuthResponse.requested_certificates``), who may answer it with
:meth:`AuthFetch.send_certificates`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

from trustmesh.brc103 import http as brc104
from trustmesh.brc103.certificates import VerifiableCertificate
from trustmesh.brc103.encoding import b64encode
from trustmesh.brc103.errors import (
    Brc103Error,
    IdentityMismatchError,
    TransportError,
)
from trustmesh.brc103.messages import (
    AuthMessage,
    MessageType,
    RequestedCertificates,
    parse_message_bytes,
)
from trustmesh.brc103.peer import Peer, PeerConfig
from trustmesh.brc103.revocation import RevocationChecker
from trustmesh.brc103.wallet import Wallet
from trustmesh.errors import DecodeError
from trustmesh.io.brc103 import monotonic_ms

log = logging.getLogger(__name__)
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
MAX_RETRIES = 3
MAX_AUTH_REPLY = 1024 * 1024


class UnauthenticatedResponseError(TransportError):
    """The server's answer is not a BRC-104 authenticated response."""

    code = "ERR_UNAUTHENTICATED_RESPONSE"

    def __init__(self, message: str, *, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(slots=True)
class AuthResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    identity_key: str  # the server's verified identity
    # The server's certificates validated on this session (fields decrypted).
    certificates: list[VerifiableCertificate] = field(default_factory=list)
    # What the unsigned x-bsv-auth-requested-certificates header asked for, unanswered;
    # the caller decides (AuthFetch.send_certificates). None: no such header.
    requested_certificates: RequestedCertificates | None = None

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def signed_headers(self) -> list[tuple[str, str]]:
        """The headers the server's signature covers (``x-bsv-*`` and ``authorization``);
        the others in ``headers`` (Content-Type, Date...) are not authenticated."""
        return brc104.signed_response_headers(self.headers.items())


class AuthFetch:
    def __init__(
        self,
        wallet: Wallet,
        config: PeerConfig | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        revocation: RevocationChecker | None = None,
        request_timeout: float = 30.0,
        max_response: int = 64 * 1024 * 1024,
        clock: Callable[[], int] = monotonic_ms,
    ) -> None:
        self.max_response = max_response
        self._clock = clock  # the peer core's time, in milliseconds (as BRC104Server's)
        self.peer = Peer(wallet, config, revocation=revocation)
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._servers: dict[str, str] = {}  # origin -> server identity key
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AuthFetch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    # --- handshake ------------------------------------------------------------------------

    async def server_identity(self, origin: str) -> str:
        """The origin's identity key, handshaking first if there is no live session."""
        lock = self._locks.setdefault(origin, asyncio.Lock())
        async with lock:
            known = self._servers.get(origin)
            if known is not None and self.peer.has_session(known):
                return known
            identity = await self._handshake(origin)
            self._servers[origin] = identity
            return identity

    async def _handshake(self, origin: str) -> str:
        request = self.peer.initiate(self._clock(), peer_identity_key=self._servers.get(origin))
        assert request.initial_nonce is not None
        try:
            reply = await self._post_auth(origin, request)
            if reply is None or reply.message_type is not MessageType.INITIAL_RESPONSE:
                raise UnauthenticatedResponseError(
                    f"{origin} did not answer with an initialResponse"
                )
            self.peer.receive(reply, self._clock())
        except BaseException:
            self.peer.forget(request.initial_nonce)  # no half-made session stays behind
            raise
        queued = self.peer.messages_to_send()
        asked = reply.requested_certificates
        answers = self.peer.config.answer_certificate_requests
        if not queued and answers and asked is not None and asked.required:
            # We hold none of them: say so at once (an empty certificateResponse), so the
            # server answers our requests now instead of holding them.
            session = self.peer.session(session_nonce=request.initial_nonce)
            queued = [self.peer.create_certificate_response([], session=session)]
        for message in queued:
            self._post_in_background(origin, message)
        return reply.identity_key

    async def _post_auth(self, origin: str, message: AuthMessage) -> AuthMessage | None:
        url = origin + brc104.AUTH_PATH
        try:
            async with self._http().post(
                url,
                data=message.to_bytes(),
                headers={"Content-Type": "application/json"},
                timeout=self._timeout,
            ) as response:
                body = await _read_capped(response, MAX_AUTH_REPLY)
                if response.status == 204:
                    return None
                if response.status != 200:
                    raise UnauthenticatedResponseError(
                        f"{url} answered HTTP {response.status}: {body[:200]!r}",
                        status=response.status,
                        body=body,
                    )
        except aiohttp.ClientError as exc:
            raise TransportError(f"cannot reach {url}: {exc}") from None
        except TimeoutError:
            raise TransportError(f"{url} did not answer in time") from None
        try:
            return parse_message_bytes(body, max_size=MAX_AUTH_REPLY)
        except DecodeError as exc:
            raise UnauthenticatedResponseError(
                f"{url} answered with no AuthMessage: {exc}"
            ) from None

    async def _post_quietly(self, origin: str, message: AuthMessage) -> None:
        """Send a certificateResponse without anyone waiting for the answer: the reference
        server never answers one that holds certificates."""
        try:
            await self._post_auth(origin, message)
        except UnauthenticatedResponseError as exc:
            if exc.status == 400 and not message.certificates:
                # "No certificates provided": both servers answer an empty one so.
                log.info("%s noted that we hold none of the certificates it asked for", origin)
            else:
                log.warning("sending a %s to %s failed: %s", message.message_type, origin, exc)
        except Brc103Error as exc:
            log.warning("sending a %s to %s failed: %s", message.message_type, origin, exc)

    # --- requests -------------------------------------------------------------------------

    async def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        body: bytes | str | None = None,
    ) -> AuthResponse:
        """Send one authenticated request; return the server's authenticated response."""
        target = yarl.URL(url)  # what aiohttp will send: sign exactly that path and query
        if target.scheme not in ("http", "https") or not target.host:
            raise ValueError(f"{url!r} is not an http(s) URL")
        origin = str(target.origin())
        method = method.upper()
        header_list = brc104.header_items(headers or {})
        brc104.check_client_headers(header_list)
        content_type = next((v for k, v in header_list if k.lower() == "content-type"), None)
        data = body.encode("utf-8") if isinstance(body, str) else body
        if data is None and method in BODY_METHODS:
            is_json = (content_type or "").split(";")[0].strip() == "application/json"
            data = b"{}" if is_json else None
        if data and content_type is None:
            raise ValueError("a request with a body needs a Content-Type header")
        path = target.raw_path or "/"
        query = "?" + target.raw_query_string if target.raw_query_string else ""
        signed_headers = brc104.signed_request_headers(header_list)
        send_url = yarl.URL(origin + path + query, encoded=True)
        for attempt in range(1, MAX_RETRIES + 1):
            identity = await self.server_identity(origin)
            request_id = brc104.new_request_id()
            payload = brc104.encode_request_payload(
                request_id, method, path, query, signed_headers, data or None
            )
            session = self.peer.session(identity_key=identity)
            message = self.peer.create_general(payload, session=session)
            result = await self._exchange(
                send_url, method, header_list, data, message, request_id, identity
            )
            if result is not None:
                return result
            if attempt < MAX_RETRIES:
                log.info("the server lost our session; handshaking again (attempt %d)", attempt + 1)
            # Only this session: others may carry requests still in flight. The origin's
            # identity stays pinned, so the next handshake must reach the same key.
            self.peer.forget(session.session_nonce)
        raise UnauthenticatedResponseError(f"{origin} kept refusing our sessions")

    async def _exchange(
        self,
        url: yarl.URL,
        method: str,
        header_list: list[tuple[str, str]],
        data: bytes | None,
        message: AuthMessage,
        request_id: bytes,
        identity: str,
    ) -> AuthResponse | None:
        send_headers = CIMultiDict(header_list)
        send_headers.update(brc104.auth_headers(message, b64encode(request_id)))
        try:
            async with self._http().request(
                method,
                url,
                headers=send_headers,
                data=data,
                allow_redirects=False,
                # aiohttp would add an unsigned Content-Type to a body-less POST.
                skip_auto_headers=() if brc104.CONTENT_TYPE in send_headers else ("Content-Type",),
                timeout=self._timeout,
            ) as response:
                body = await _read_capped(response, self.max_response)
                status, headers = response.status, response.headers
        except aiohttp.ClientError as exc:
            raise TransportError(f"cannot reach {url}: {exc}") from None
        except TimeoutError:
            raise TransportError(f"{url} did not answer in time") from None
        missing = [
            name
            for name in (brc104.VERSION, brc104.IDENTITY_KEY, brc104.SIGNATURE)
            if not headers.get(name, "").strip()
        ]
        if missing:
            if status == 401 and _lost_session(body):
                return None  # the server does not know our session (it restarted)
            preview = body[:300].decode("utf-8", "replace").strip()
            raise UnauthenticatedResponseError(
                f"HTTP {status} from {url} without BSV authentication "
                f"(missing {', '.join(missing)})" + (f": {preview}" if preview else ""),
                status=status,
                body=body,
            )
        if headers.get(brc104.IDENTITY_KEY) != identity:
            raise IdentityMismatchError(
                f"{url} answered as {headers.get(brc104.IDENTITY_KEY)}, not {identity}"
            )
        if headers.get(brc104.REQUEST_ID) not in (None, b64encode(request_id)):
            raise UnauthenticatedResponseError("the response answers another request id")
        self._verify_response(request_id, status, headers, body)
        requested = _requested_in_header(url, headers)
        session = self.peer.session(identity_key=identity)
        return AuthResponse(status, headers, body, identity, list(session.certificates), requested)

    def _verify_response(
        self, request_id: bytes, status: int, headers: CIMultiDictProxy[str], body: bytes
    ) -> None:
        signed = brc104.signed_response_headers(headers.items())
        encodings = [False] if body else [False, True]  # empty: varint(0), else varint(-1)
        try:
            candidates = [
                brc104.message_from_headers(
                    headers,
                    brc104.encode_response_payload(
                        request_id, status, signed, body, empty_as_minus_one=minus_one
                    ),
                )
                for minus_one in encodings
            ]
            self.peer.receive_any(candidates, self._clock())
        except (Brc103Error, DecodeError) as exc:
            raise UnauthenticatedResponseError(f"the response does not verify: {exc}") from None

    async def send_certificates(self, url: str, requested: RequestedCertificates) -> int:
        """Reveal to the server of ``url``'s origin the fields of our certificates that
        ``requested`` names (in a signed certificateResponse, not waited for), and return
        how many certificates went. Only the caller decides this: a request that came in
        the unsigned ``x-bsv-auth-requested-certificates`` header is never answered by
        itself, so check it against what you mean to disclose first."""
        origin = str(yarl.URL(url).origin())
        identity = await self.server_identity(origin)
        certificates = self.peer.prove(requested, identity)
        if certificates:
            session = self.peer.session(identity_key=identity)
            message = self.peer.create_certificate_response(certificates, session=session)
            self._post_in_background(origin, message)
        return len(certificates)

    def _post_in_background(self, origin: str, message: AuthMessage) -> None:
        task = asyncio.get_running_loop().create_task(self._post_quietly(origin, message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _requested_in_header(
    url: yarl.URL, headers: CIMultiDictProxy[str]
) -> RequestedCertificates | None:
    """What the unsigned certificate request header asks for; None if absent or malformed."""
    text = headers.get(brc104.REQUESTED_CERTIFICATES)
    if not text:
        return None
    try:
        requested = RequestedCertificates.from_text(text)
    except DecodeError as exc:
        log.warning("ignored a malformed certificate request from %s: %s", url.origin(), exc)
        return None
    log.info(
        "%s asks for certificates in an unsigned header; not answered by itself "
        "(AuthFetch.send_certificates answers it)",
        url.origin(),
    )
    return requested


def _lost_session(body: bytes) -> bool:
    """Does a 401 without auth headers say the server lost our session (it restarted or
    forgot us)? Ours says ERR_SESSION_NOT_FOUND or ERR_INVALID_NONCE; the reference
    says "Session not found" or "HMAC is not valid". Anything else is a refusal."""
    text = body[:2048].decode("utf-8", "replace").lower()
    return any(
        marker in text
        for marker in ("err_session_not_found", "err_invalid_nonce", "session not found", "hmac")
    )


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body (however many reads it takes), refusing one over ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise TransportError(f"a response of {response.content_length} bytes is over {limit}")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise TransportError(f"a response over {limit} bytes")
    return bytes(body)
