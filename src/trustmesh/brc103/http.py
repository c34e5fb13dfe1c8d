"""BRC-104: BRC-103 general messages carried as ordinary HTTP requests and responses.

The client signs a *request payload* rebuilt from the request, the server signs a
*response payload* rebuilt from the response; the AuthMessage fields travel in
``x-bsv-auth-*`` headers (reference notes f.2). This module is the sans-IO part: the
header names, which headers are signed, and the two payload layouts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from trustmesh.brc103.collation import sort_key
from trustmesh.brc103.encoding import read_bytes, read_varint, write_varint
from trustmesh.brc103.errors import Brc103Error, MalformedMessageError
from trustmesh.brc103.messages import AuthMessage, MessageType, parse_message
from trustmesh.errors import DecodeError

AUTH_PATH = "/.well-known/auth"
CONTENT_TYPE = "content-type"
VERSION = "x-bsv-auth-version"
IDENTITY_KEY = "x-bsv-auth-identity-key"
NONCE = "x-bsv-auth-nonce"
YOUR_NONCE = "x-bsv-auth-your-nonce"
SIGNATURE = "x-bsv-auth-signature"
REQUEST_ID = "x-bsv-auth-request-id"
MESSAGE_TYPE = "x-bsv-auth-message-type"
REQUESTED_CERTIFICATES = "x-bsv-auth-requested-certificates"
REQUEST_ID_SIZE = 32
MAX_PAYLOAD_TEXT = 64 * 1024  # method, path, query, header names and values


class UnsupportedHeaderError(Brc103Error, ValueError):
    """A request header that BRC-104 cannot sign (the reference client refuses it too)."""

    code = "ERR_UNSUPPORTED_HEADER"


def new_request_id() -> bytes:
    return os.urandom(REQUEST_ID_SIZE)


def _signable(name: str, *, response: bool) -> bool:
    if name.startswith("x-bsv-auth"):
        return False
    if name.startswith("x-bsv-") or name == "authorization":
        return True
    return name == "content-type" and not response


def signed_request_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers a request payload covers: content-type (parameters cut), authorization
    and ``x-bsv-*`` but not ``x-bsv-auth*``; lower-cased and sorted. A server passes the
    request's headers and takes what it finds; other headers are simply not covered."""
    out: list[tuple[str, str]] = []
    for name, value in headers:
        key = name.lower()
        if not _signable(key, response=False):
            continue
        if key == "content-type":
            value = value.split(";", 1)[0].strip()
        out.append((key, value))
    return _locale_sorted(out)


def _locale_sorted(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """By name in ``localeCompare`` order, as the references sort signed headers (it
    differs from byte order where ``_``, ``.`` or digits meet letters)."""
    return sorted(headers, key=lambda item: (sort_key(item[0]), item))


def check_client_headers(headers: Iterable[tuple[str, str]]) -> None:
    """Refuse headers a BRC-104 client cannot sign, as the reference client does."""
    for name, _ in headers:
        key = name.lower()
        if key.startswith("x-bsv-auth"):
            raise UnsupportedHeaderError("No BSV auth headers allowed here!")
        if not _signable(key, response=False):
            raise UnsupportedHeaderError(
                f"header {name!r} cannot be signed: only content-type, authorization and "
                "x-bsv-* headers are supported"
            )


def signed_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers a response payload covers: authorization and ``x-bsv-*`` but not
    ``x-bsv-auth*``, lower-cased and sorted."""
    return _locale_sorted(
        [(k.lower(), v) for k, v in headers if _signable(k.lower(), response=True)]
    )


def _text(value: str | None) -> bytes:
    if value is None:
        return write_varint(-1)
    raw = value.encode("utf-8")
    return write_varint(len(raw)) + raw


def _headers(headers: list[tuple[str, str]]) -> bytes:
    out = bytearray(write_varint(len(headers)))
    for key, value in headers:
        out += _text(key) + _text(value)
    return bytes(out)


def encode_request_payload(
    request_id: bytes,
    method: str,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
) -> bytes:
    """``query`` is the search string including its ``?`` (empty when there is none);
    ``headers`` are already filtered and sorted; ``body`` is ``None`` when absent."""
    if len(request_id) != REQUEST_ID_SIZE:
        raise ValueError("a request id is 32 bytes")
    out = bytearray(request_id)
    out += _text(method)
    out += _text(path or None)
    out += _text(query or None)
    out += _headers(headers)
    out += write_varint(-1) if not body else write_varint(len(body)) + body
    return bytes(out)


def encode_response_payload(
    request_id: bytes,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    empty_as_minus_one: bool = False,
) -> bytes:
    """An empty body is ``varint(0)``, which the reference client expects; the reference
    server writes ``varint(-1)`` (``empty_as_minus_one``), so a client tries both."""
    out = bytearray(request_id)
    out += write_varint(status)
    out += _headers(headers)
    if body:
        out += write_varint(len(body)) + body
    else:
        out += write_varint(-1 if empty_as_minus_one else 0)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class RequestPayload:
    request_id: bytes
    method: str
    path: str | None
    query: str | None
    headers: list[tuple[str, str]]
    body: bytes | None


def decode_request_payload(data: bytes) -> RequestPayload:
    """Parse a request payload (tests and tools; servers rebuild, never trust, it)."""
    request_id, offset = read_bytes(data, 0, REQUEST_ID_SIZE, "request id")
    method, offset = _read_text(data, offset, "method")
    path, offset = _read_text(data, offset, "path")
    query, offset = _read_text(data, offset, "query")
    count, offset = read_varint(data, offset)
    if count < 0 or count > 1024:
        raise DecodeError(f"header count {count} out of range", offset=offset)
    headers: list[tuple[str, str]] = []
    for _ in range(count):
        key, offset = _read_text(data, offset, "header name")
        value, offset = _read_text(data, offset, "header value")
        if key is None or value is None:
            raise DecodeError("a header cannot be absent", offset=offset)
        headers.append((key, value))
    size, offset = read_varint(data, offset)
    body: bytes | None = None
    if size >= 0:
        body, offset = read_bytes(data, offset, size, "body")
    if offset != len(data):
        raise DecodeError("bytes after the body", offset=offset)
    if method is None:
        raise DecodeError("a request payload needs a method")
    return RequestPayload(request_id, method, path, query, headers, body)


def _read_text(data: bytes, offset: int, what: str) -> tuple[str | None, int]:
    size, offset = read_varint(data, offset)
    if size == -1:
        return None, offset
    if size > MAX_PAYLOAD_TEXT:
        raise DecodeError(f"{what} longer than {MAX_PAYLOAD_TEXT} bytes", offset=offset)
    raw, offset = read_bytes(data, offset, size, what)
    try:
        return raw.decode("utf-8"), offset
    except UnicodeDecodeError:
        raise DecodeError(f"{what} is not UTF-8", offset=offset) from None


def header_items(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), str(v)) for k, v in items]


def auth_headers(message: AuthMessage, request_id: str | None = None) -> dict[str, str]:
    """The ``x-bsv-auth-*`` headers that carry ``message`` (BRC-104 both ways)."""
    headers = {
        VERSION: message.version,
        IDENTITY_KEY: message.identity_key,
        SIGNATURE: (message.signature or b"").hex(),
    }
    if message.nonce:
        headers[NONCE] = message.nonce
    if message.your_nonce:
        headers[YOUR_NONCE] = message.your_nonce
    if request_id is not None:
        headers[REQUEST_ID] = request_id
    return headers


def message_from_headers(headers: Mapping[str, str], payload: bytes) -> AuthMessage:
    """The general message that ``x-bsv-auth-*`` headers carry, checked like a JSON one;
    its payload is the request or response payload the receiver rebuilt."""
    try:
        signature = bytes.fromhex(headers.get(SIGNATURE, ""))
    except ValueError:
        raise MalformedMessageError("x-bsv-auth-signature is not hex") from None
    message = parse_message(
        {
            "version": headers.get(VERSION),
            "messageType": MessageType.GENERAL.value,
            "identityKey": headers.get(IDENTITY_KEY),
            "nonce": headers.get(NONCE),
            "yourNonce": headers.get(YOUR_NONCE),
            "signature": list(signature),
        }
    )
    message.payload = payload
    return message
