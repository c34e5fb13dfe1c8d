"""JSON errors for every trustmesh HTTP API: ``{"error": code, "message": text}``.

Handlers raise :class:`ApiError` (or a typed protocol error the API maps to a status);
the middleware turns it, and aiohttp's own errors (404, 405, 413), into a JSON body, so
no client ever has to parse an HTML error page or an empty body.

An error never echoes much of what the client sent: a message quotes input through
:func:`excerpt` (at most ``MAX_EXCERPT`` characters), and :func:`error_response` cuts
every message to ``MAX_MESSAGE`` printable ASCII characters, so garbage in makes a
small answer out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Middleware

from trustmesh.errors import ProtocolError

log = logging.getLogger("trustmesh.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_EXCERPT = 80  # characters of anything a client sent that an error may quote
MAX_MESSAGE = 240  # characters of an error message in all
ELLIPSIS = "\u2026"

_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "rate_limited",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.headers = dict(headers or {})


def excerpt(value: object, limit: int = MAX_EXCERPT) -> str:
    """At most ``limit`` characters of ``value`` (text, bytes, or anything ``str()`` can
    show), for an error message or a log line: control and non-ASCII characters escaped
    as Python does (``\\x00``, ``\\u00e9``), and an ellipsis at the end when cut."""
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value[: limit + 1]).decode("ascii", "backslashreplace")
    else:
        text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    shown = "".join(
        ch if " " <= ch <= "~" else ch.encode("unicode_escape").decode("ascii")
        for ch in text[:limit]
    )
    if cut or len(shown) > limit:
        return shown[: limit - 1] + ELLIPSIS
    return shown


def error_response(error: ApiError) -> web.Response:
    return web.json_response(
        {"error": excerpt(error.code, MAX_EXCERPT), "message": excerpt(error.message, MAX_MESSAGE)},
        status=error.status,
        headers=error.headers,
    )


def json_errors(mapping: Mapping[type[ProtocolError], tuple[int, str]]) -> Middleware:
    """A middleware: ``mapping`` gives each protocol error class its status and code
    (the most specific class listed wins, by method resolution order)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc)
        except ProtocolError as exc:
            for cls in type(exc).__mro__:
                if cls in mapping:
                    status, code = mapping[cls]
                    return error_response(ApiError(status, str(exc), code=code))
            # A protocol error this API maps to no status is our bug: a JSON 500 still.
            log.exception("%s %s failed", request.method, request.path)
            return error_response(ApiError(500, "internal error", code="internal"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            # aiohttp's text says more than its reason for some errors (a 413 names the
            # limit); for others it is just "404: Not Found".
            text = exc.text or ""
            message = exc.reason if text.startswith(f"{exc.status}:") or not text else text
            return error_response(ApiError(exc.status, message, headers=headers))
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(ApiError(500, "internal error", code="internal"))

    return middleware


async def json_body(request: web.Request) -> dict[str, object]:
    """The request's fields: a JSON object body, or an HTML form
    (``application/x-www-form-urlencoded``, what ``curl -d`` and ``--data-urlencode``
    send); a 400 for anything else."""
    if request.content_type == "application/x-www-form-urlencoded":
        return await _form(request)
    raw = await request.read()
    if not raw:
        raise ApiError(400, "the request needs a JSON object body")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


async def _form(request: web.Request) -> dict[str, object]:
    try:
        form = await request.post()
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the form body does not parse") from None
    fields: dict[str, object] = {}
    for name, value in form.items():
        if name in fields:
            raise ApiError(400, f"field '{excerpt(name)}' is given twice")
        if not isinstance(value, str):
            raise ApiError(400, f"field '{excerpt(name)}' must be text")
        fields[name] = value
    if not fields:
        raise ApiError(400, "the request has no fields")
    return fields


def field(body: Mapping[str, object], name: str, *, required: bool = True) -> str | None:
    """A string field of a JSON body: a 400 when it is missing (and required) or not a
    string."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"field {name!r} must be a string")
    return value
