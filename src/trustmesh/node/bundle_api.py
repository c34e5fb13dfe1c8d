"""The bundle routes of the node API (zero-trust-mesh.md section 7.5; docs/protocols/
bundles.md section 9). Only the node itself (a client certificate with its node_id, as
the CLI uses from the node's directory) may send from it or read its inbox: a bundle is
signed by its source, and the inbox is the node's own.

- ``POST /v1/bundles``: ``{destination, ttl_sec, payload}`` (payload base64), or with
  ``Content-Type: application/cbor`` a raw RFC 9171 bundle whose source is this node.
  201 ``{bundle_id, expires_at, ...}`` once the bundle is committed to the store.
- ``GET /v1/bundles?role=inbox|forwarding``: what this node holds.
- ``GET /v1/bundles/{id}``: one bundle as JSON, or as RFC 9171 bytes with
  ``Accept: application/cbor``.
- ``DELETE /v1/bundles/{id}``: the application took a delivered bundle.

Errors: 400 malformed (bad JSON, CBOR, CRC, EID, a source other than the caller), 403 a
caller other than this node, 404 no such bundle, 413 a payload over the limit, 429 the
source's share of the store is used up, 507 the store is full.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

from trustmesh.api.errors import ApiError
from trustmesh.bundle.errors import BadBundleIdError, BadEidError
from trustmesh.bundle.ids import BundleId
from trustmesh.bundle.store import ROLES, StoredBundle
from trustmesh.io.https import peer_chain
from trustmesh.mesh.errors import MalformedMessage
from trustmesh.mesh.trust import node_id_of
from trustmesh.wire.jsonwire import strict_loads

CBOR = "application/cbor"
MAX_LIST = 1000
DEFAULT_LIST = 100
MAX_LIST_BYTES = 8 * 1024 * 1024  # of stored bundles in one listing
MAX_TTL_S = 30 * 24 * 3600


class BundleService(Protocol):
    """What the routes ask of the node (``trustmesh.node.bundles.NodeBundles``)."""

    node_id: str
    max_payload: int

    def send(self, destination: str, ttl_s: int, payload: bytes) -> tuple[str, int]: ...

    def submit_raw(self, data: bytes) -> tuple[str, int]: ...

    def items(self, role: str, limit: int) -> list[StoredBundle]: ...

    def find(self, bundle_id: str) -> StoredBundle | None: ...

    def payload_of(self, bundle: StoredBundle) -> bytes: ...

    def acknowledge(self, bundle_id: str) -> bool: ...


BUNDLES_KEY: web.AppKey[BundleService] = web.AppKey("bundles")


def add_bundle_routes(app: web.Application, service: BundleService) -> None:
    app[BUNDLES_KEY] = service
    app.router.add_post("/v1/bundles", _post)
    app.router.add_get("/v1/bundles", _list)
    app.router.add_get("/v1/bundles/{bundle_id}", _get)
    app.router.add_delete("/v1/bundles/{bundle_id}", _delete)


def _service(request: web.Request) -> BundleService:
    """The service, once the caller is shown to be this node (the authentication
    middleware checked the chain and revocation already)."""
    service = request.app[BUNDLES_KEY]
    caller = node_id_of(peer_chain(request)[0])
    if caller != service.node_id:
        raise ApiError(
            403,
            f"bundles are sent and read by the node itself ({service.node_id}), not {caller}",
            code="not_this_node",
        )
    return service


async def _post(request: web.Request) -> web.Response:
    service = _service(request)
    if request.content_type == CBOR:
        data = await request.read()
        if not data:
            raise ApiError(400, "the body must be an RFC 9171 bundle", code="malformed")
        bundle_id, expires_ms = service.submit_raw(data)
    else:
        destination, ttl_s, payload = _json_request(await request.read(), service.max_payload)
        bundle_id, expires_ms = service.send(destination, ttl_s, payload)
    body = {"bundle_id": bundle_id, "expires_at": iso(expires_ms), "expires_at_ms": expires_ms}
    return web.json_response(body, status=201)


def _json_request(raw: bytes, max_payload: int) -> tuple[str, int, bytes]:
    limit = max_payload * 4 // 3 + 4096
    if len(raw) > limit:
        raise ApiError(413, f"the payload is over the limit of {max_payload} bytes")
    data = strict_loads(raw, max_size=limit, error=MalformedMessage)
    if not isinstance(data, dict):
        raise ApiError(400, "the body is a JSON object", code="malformed")
    unknown = set(data) - {"destination", "ttl_sec", "payload"}
    if unknown:
        raise ApiError(400, f"unknown fields: {', '.join(sorted(unknown))}", code="malformed")
    destination = data.get("destination")
    if not isinstance(destination, str) or not destination:
        raise ApiError(400, 'destination is a node_id or "broadcast"', code="malformed")
    ttl = data.get("ttl_sec")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= MAX_TTL_S:
        raise ApiError(400, f"ttl_sec is a number of seconds, 1..{MAX_TTL_S}", code="malformed")
    text = data.get("payload")
    if not isinstance(text, str):
        raise ApiError(400, "payload is base64 text", code="malformed")
    try:
        payload = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "payload is not base64", code="malformed") from None
    if len(payload) > max_payload:
        raise ApiError(413, f"a payload of {len(payload)} bytes is over {max_payload}")
    return destination, int(ttl), payload


async def _list(request: web.Request) -> web.Response:
    service = _service(request)
    role = request.query.get("role", "inbox")
    if role not in ROLES:
        raise ApiError(400, "role is inbox, forwarding or fragment", code="malformed")
    limit = _limit(request.query.get("limit"))
    items: list[dict[str, Any]] = []
    held = service.items(role, limit + 1)
    budget = MAX_LIST_BYTES
    for stored in held[:limit]:
        if budget < stored.size and items:
            break  # a listing's memory is bounded, whatever the node holds
        budget -= stored.size
        items.append(item_json(service, stored))
    more = len(held) > len(items)
    body = {"node_id": service.node_id, "role": role, "bundles": items, "more": more}
    return web.json_response(body)


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIST
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIST:
        raise ApiError(400, f"limit is an integer, 1..{MAX_LIST}", code="malformed")
    return int(text)


async def _get(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    stored = service.find(_bundle_id(request))
    if stored is None:
        raise ApiError(404, "no such bundle here", code="not_found")
    if CBOR in request.headers.get("Accept", ""):
        return web.Response(body=stored.data, content_type=CBOR)
    return web.json_response(item_json(service, stored))


async def _delete(request: web.Request) -> web.Response:
    service = _service(request)
    bundle_id = _bundle_id(request)
    if not service.acknowledge(bundle_id):
        raise ApiError(404, "no such bundle in the inbox", code="not_found")
    return web.json_response({"bundle_id": bundle_id, "status": "acknowledged"})


def _bundle_id(request: web.Request) -> str:
    text = request.match_info["bundle_id"]
    try:
        return str(BundleId.parse(text))
    except (BadBundleIdError, BadEidError) as exc:
        raise ApiError(400, str(exc), code="malformed") from None


def item_json(service: BundleService, stored: StoredBundle) -> dict[str, Any]:
    return {
        "bundle_id": stored.bundle_id,
        "source": stored.source,
        "destination": stored.destination,
        "payload": base64.b64encode(service.payload_of(stored)).decode(),
        "created_at": iso(stored.created_ms),
        "created_at_ms": stored.created_ms,
        "expires_at": iso(stored.expires_ms),
        "expires_at_ms": stored.expires_ms,
        "role": stored.role,
        "copies": stored.copies,
    }


def iso(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, UTC).isoformat(timespec="milliseconds")
