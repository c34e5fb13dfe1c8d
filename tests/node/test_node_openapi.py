"""The node API's OpenAPI 3.1 document (src/trustmesh/api/node_openapi.json): it is valid
OpenAPI 3.1, it describes exactly the routes ``node_app`` registers, every error code the
API maps is listed, and real requests and responses on running nodes (real TLS, real
client certificates, real stores: ``LocalMesh``) conform to it (openapi-core). The
response validator runs strict: a field the document does not describe is an error as
much as a missing one, so the document cannot drift from the code unnoticed."""

from __future__ import annotations

import base64
import io
import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from jsonschema_path import SchemaPath
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.security.exceptions import SecurityProviderError
from openapi_core.security.factories import SecurityProviderFactory
from openapi_core.security.providers import BaseProvider
from openapi_core.templating.responses.exceptions import ResponseNotFound
from openapi_core.validation.request.exceptions import (
    InvalidParameter,
    InvalidRequestBody,
    MissingRequiredRequestBody,
    SecurityValidationError,
)
from openapi_core.validation.response.exceptions import InvalidData, MissingRequiredHeader
from openapi_schema_validator import OAS31Validator
from openapi_schema_validator import validate as validate_schema
from openapi_spec_validator import OpenAPIV31SpecValidator
from openapi_spec_validator import validate as validate_spec
from werkzeug.datastructures import Headers, ImmutableMultiDict

from trustmesh.api import errors as api_errors
from trustmesh.bundle.codec import Bundle, CreationTimestamp
from trustmesh.bundle.eid import inbox, node_eid
from trustmesh.bundle.ids import unix_ms_to_dtn_ms
from trustmesh.mesh.gossip import anomaly_payload, derive_message_id
from trustmesh.node import api
from trustmesh.node.api import NodeView
from trustmesh.node.bundle_api import BundleService
from trustmesh.node.client import api_url
from trustmesh.node.config import load_config
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode, now_ms

WAIT = 10.0
SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}
DOCUMENT: dict[str, Any] = json.loads(
    resources.files("trustmesh.api").joinpath("node_openapi.json").read_text()
)
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


# --- openapi-core adapters for aiohttp client exchanges ---------------------------------


@dataclass
class MeshParameters(RequestParameters):
    """Request parameters plus what openapi-core cannot see in headers: whether the TLS
    connection carried a client certificate."""

    client_certificate: bool = False


class ClientCertificateProvider(BaseProvider):
    """openapi-core checks no ``mutualTLS`` scheme itself: this one is satisfied when the
    request went out with a client certificate."""

    def __call__(self, parameters: RequestParameters) -> str:
        if not getattr(parameters, "client_certificate", False):
            raise SecurityProviderError("no client certificate")
        return "client certificate"


class MeshSecurity(SecurityProviderFactory):
    def create(self, scheme: SchemaPath) -> Any:
        if (scheme / "type").read_str() == "mutualTLS":
            return ClientCertificateProvider(scheme)
        return super().create(scheme)


API = OpenAPI.from_dict(
    DOCUMENT,
    config=Config(
        security_provider_factory=MeshSecurity(),
        # Strict: an object schema without additionalProperties accepts no other fields.
        additional_properties_default_policy="forbid",
    ),
)


@dataclass
class Sent:
    """A request as sent (openapi-core's Request protocol)."""

    host_url: str
    path: str
    method: str
    body: bytes | None
    content_type: str
    parameters: RequestParameters


@dataclass(frozen=True)
class Received:
    """A response as received (openapi-core's Response protocol)."""

    status_code: int
    content_type: str
    headers: Headers
    data: bytes

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Client:
    """Requests to one node's API, as ``directory``'s node (its node.crt and node.key) or
    with no client certificate; each exchange is returned for validation. The server is
    checked against the mesh root and the node_id its certificate names."""

    node: MeshNode
    directory: Path | None

    @property
    def url(self) -> str:
        return api_url(self.node.directory, load_config(self.node.directory))

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.node.directory / "ca.crt"))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        if self.directory is not None:
            context.load_cert_chain(self.directory / "node.crt", self.directory / "node.key")
        return context

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        raw: bytes | None = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[Sent, Received]:
        sent_headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent_headers.setdefault("Content-Type", "application/json")
        url = self.url
        timeout = aiohttp.ClientTimeout(total=WAIT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                method,
                url + path,
                data=io.BytesIO(data) if data is not None else None,
                params=query,
                headers=sent_headers,
                ssl=self.context(),
                server_hostname=self.node.node_id,
            ) as response,
        ):
            received = Received(
                status_code=response.status,
                content_type=response.headers.get("Content-Type", "").lower(),
                headers=Headers(list(response.headers.items())),
                data=await response.read(),
            )
        port = url.rsplit(":", 1)[1]
        sent = Sent(
            host_url=f"https://{self.node.node_id}:{port}",  # the name the server proves
            path=path,
            method=method.lower(),
            body=data,
            content_type=sent_headers.get("Content-Type", ""),
            parameters=MeshParameters(
                query=ImmutableMultiDict(query or {}),
                header=Headers(sent_headers),
                client_certificate=self.directory is not None,
            ),
        )
        return sent, received


def as_node(mesh: LocalMesh, index: int, *, to: int | None = None) -> Client:
    """A client of node-``to`` (default: the same node) with node-``index``'s certificate."""
    return Client(mesh.nodes[(to or index) - 1], mesh.nodes[index - 1].directory)


def anonymous(mesh: LocalMesh, to: int) -> Client:
    return Client(mesh.nodes[to - 1], None)


def conforms(sent: Sent, received: Received, *, request_conforms: bool = True) -> None:
    """The response is one the document describes for this operation and status (raises
    otherwise); so is the request, unless the test sends a non-conforming one on purpose."""
    API.validate_response(sent, received)
    if request_conforms:
        API.validate_request(sent)


def conforms_to_component(received: Received, name: str) -> None:
    """For answers outside any operation (unknown path, wrong method): the response
    matches ``components/responses/<name>``."""
    spec = DOCUMENT["components"]["responses"][name]
    for header, definition in spec.get("headers", {}).items():
        target = definition["$ref"].rsplit("/", 1)[-1]
        if DOCUMENT["components"]["headers"][target].get("required"):
            assert header in received.headers, f"{name} needs header {header}"
    assert received.content_type.split(";")[0] in spec["content"]
    schema = spec["content"]["application/json"]["schema"]
    validate_schema(
        received.json(), {**schema, "components": DOCUMENT["components"]}, cls=OAS31Validator
    )
    assert set(received.json()) == {"error", "message"}


def error_code(received: Received) -> str:
    code: str = received.json()["error"]
    return code


def anomaly(n: int) -> dict[str, Any]:
    return anomaly_payload(f"{n:032x}", "port-scan", 0.5, {"n": n, "iface": "eth0"})


def cbor_bundle(source: str, destination: str, payload: bytes, sequence: int = 1) -> bytes:
    """An RFC 9171 bundle as an application makes it (unsigned, no hop count block)."""
    return Bundle.build(
        source=node_eid(source),
        destination=inbox(destination),
        payload=payload,
        creation=CreationTimestamp(unix_ms_to_dtn_ms(now_ms()), sequence),
        lifetime_ms=600_000,
    ).encode()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    async with LocalMesh(tmp_path, 2, node_settings=dict(SETTINGS)) as running:
        await running.wait_for(running.connected, WAIT, what="a connected mesh")
        yield running


# --- the document itself ------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    validate_spec(DOCUMENT, cls=OpenAPIV31SpecValidator)
    assert DOCUMENT["openapi"] == "3.1.0"
    assert DOCUMENT["info"]["title"] == "trustmesh mesh node"
    assert DOCUMENT["info"]["version"] == "1"
    assert DOCUMENT["security"] == [{"mutualTLS": []}]
    assert DOCUMENT["components"]["securitySchemes"]["mutualTLS"]["type"] == "mutualTLS"


class StubNode:
    """Enough of a node for ``node_app`` to build its routes (none is called)."""

    node_id = "node-1"
    config = None


def app_routes(*, bundles: bool) -> set[tuple[str, str]]:
    service = cast(BundleService, object()) if bundles else None
    app = api.node_app(cast(NodeView, StubNode()), bundles=service)
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"  # aiohttp adds HEAD to GET
    }


def documented_routes() -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in METHODS and method != "head"
    }


def test_document_describes_exactly_the_routes_of_the_app() -> None:
    with_bundles, without = app_routes(bundles=True), app_routes(bundles=False)
    assert documented_routes() == with_bundles
    # A node without a bundle service leaves out the bundle routes, and only them.
    assert without < with_bundles
    bundle_paths = {path for _, path in with_bundles - without}
    assert bundle_paths == {"/v1/bundles", "/v1/bundles/{bundle_id}"}
    assert all(not path.startswith("/v1/bundles") for _, path in without)


def test_every_operation_answers_what_the_middlewares_answer() -> None:
    """The authentication middleware runs before every handler (401, 403 ``revoked``) and
    the error middleware turns any failure into a 500: each operation lists them."""
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                assert {"401", "403", "500"} <= set(operation["responses"]), (method, path)
                assert "revoked" in json.dumps(operation["responses"]["403"]), (method, path)


def test_every_error_code_of_the_api_is_listed() -> None:
    listed = DOCUMENT["components"]["schemas"]["Error"]["properties"]["error"]["description"]
    codes = {code for _, code in api.ERRORS.values()}
    codes |= set(api_errors._CODES.values()) - {"forbidden"}  # the node API never says it
    codes |= {"internal", "not_this_node", "timeout", "malformed", "revoked"}
    assert {code for code in codes if f"`{code}`" not in listed} == set()
    described = json.dumps(DOCUMENT["paths"]) + json.dumps(DOCUMENT["components"]["responses"])
    assert {code for code in codes if f"`{code}`" not in described} == set()


async def test_node_serves_the_document(mesh: LocalMesh) -> None:
    sent, received = await as_node(mesh, 1).call("GET", "/v1/openapi.json")
    assert received.status_code == 200
    assert received.json() == DOCUMENT == api.openapi_document()
    conforms(sent, received)


# --- mesh routes ----------------------------------------------------------------------------


async def test_peers_health_and_anomalies_conform(mesh: LocalMesh) -> None:
    published = mesh.nodes[1].publish(anomaly(1))
    await mesh.wait_for(
        lambda: published.message_id in mesh.nodes[0].seen, WAIT, what="the anomaly spreading"
    )
    node1 = as_node(mesh, 1)

    sent, received = await node1.call("GET", "/v1/mesh/peers")
    assert received.status_code == 200, received.data
    conforms(sent, received)
    (peer,) = received.json()["peers"]
    assert (peer["node_id"], peer["status"], peer["score"]) == ("node-2", "connected", 0)

    sent, received = await node1.call("GET", "/v1/mesh/health")
    assert received.status_code == 200, received.data
    conforms(sent, received)
    health = received.json()
    assert (health["node_id"], health["links"], health["gossip"]["accepted"]) == ("node-1", 1, 1)
    assert set(health["limits"]) == {"links", "api", "local"}
    assert (health["status"], health["reasons"]) == ("ok", [])

    sent, received = await node1.call("GET", "/v1/mesh/anomalies")
    assert received.status_code == 200, received.data
    conforms(sent, received)
    (indicator,) = received.json()["anomalies"]
    assert indicator["message_id"] == published.message_id
    assert indicator["meta"] == {"n": 1, "iface": "eth0"}

    query = {"limit": "5", "since": str(indicator["received_at"])}
    sent, received = await node1.call("GET", "/v1/mesh/anomalies", query=query)
    assert received.status_code == 200, received.data
    conforms(sent, received)
    assert received.json()["anomalies"] == []

    query = {"hash": f"{1:032x}", "limit": "1"}
    sent, received = await node1.call("GET", "/v1/mesh/anomalies", query=query)
    assert received.status_code == 200, received.data
    conforms(sent, received)
    assert [i["message_id"] for i in received.json()["anomalies"]] == [published.message_id]
    sent, received = await node1.call("GET", "/v1/mesh/anomalies", query={"hash": f"{2:032x}"})
    assert received.json()["anomalies"] == []

    for bad in ("ABCDEF0123456789", "abc", "0" * 17):
        sent, received = await node1.call("GET", "/v1/mesh/anomalies", query={"hash": bad})
        assert (received.status_code, error_code(received)) == (400, "bad_request"), bad
        conforms(sent, received, request_conforms=False)

    sent, received = await node1.call("GET", "/v1/mesh/anomalies", query={"limit": "0"})
    assert (received.status_code, error_code(received)) == (400, "bad_request")
    conforms(sent, received, request_conforms=False)
    with pytest.raises(InvalidParameter):
        API.validate_request(sent)


async def test_gossip_conforms(mesh: LocalMesh) -> None:
    origin = mesh.nodes[0]
    node1 = as_node(mesh, 1)
    message = origin.sign(anomaly(2))

    sent, received = await node1.call(
        "POST",
        "/v1/mesh/gossip",
        raw=message.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert received.status_code == 202, received.data
    conforms(sent, received)
    assert received.json() == {
        "message_id": message.message_id,
        "status": "accepted",
        "forwarded_to": 1,
    }

    sent, received = await node1.call("POST", "/v1/mesh/gossip", body=message.to_json())
    assert received.status_code == 202, received.data
    conforms(sent, received)
    assert received.json()["status"] == "duplicate"

    # A forgery: another payload under its derived id, with the old signature.
    payload = anomaly(3)
    forged = replace(
        message,
        payload=payload,
        message_id=derive_message_id(message.origin, payload, message.timestamp, message.expiry),
    )
    sent, received = await node1.call("POST", "/v1/mesh/gossip", body=forged.to_json())
    assert (received.status_code, error_code(received)) == (400, "bad_signature")
    conforms(sent, received)

    expired = origin.sign(anomaly(4), ttl_ms=1)
    sent, received = await node1.call("POST", "/v1/mesh/gossip", body=expired.to_json())
    assert (received.status_code, error_code(received)) == (400, "expired")
    conforms(sent, received)

    # Requests the document itself rules out get the documented 400 too.
    sent, received = await node1.call("POST", "/v1/mesh/gossip", raw=b"")
    assert (received.status_code, error_code(received)) == (400, "bad_request")
    conforms(sent, received, request_conforms=False)
    with pytest.raises(MissingRequiredRequestBody):
        API.validate_request(sent)

    bad = {**message.to_json(), "extra": 1}
    sent, received = await node1.call("POST", "/v1/mesh/gossip", body=bad)
    assert (received.status_code, error_code(received)) == (400, "malformed")
    conforms(sent, received, request_conforms=False)
    with pytest.raises(InvalidRequestBody):
        API.validate_request(sent)


async def test_failed_commit_conforms(mesh: LocalMesh, monkeypatch: pytest.MonkeyPatch) -> None:
    node = mesh.nodes[0]

    def broken() -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(node, "flush", broken)
        sent, received = await as_node(mesh, 1).call(
            "POST", "/v1/mesh/gossip", body=node.sign(anomaly(5)).to_json()
        )
    assert (received.status_code, error_code(received)) == (500, "internal")
    conforms(sent, received)


async def test_limits_quotas_conform(tmp_path: Path) -> None:
    """One node with a gossip rate of 1/s (burst 1) and a small bundle store: 64 KiB in
    all, 16 KiB per source."""
    settings = {
        **SETTINGS,
        "limits": {"request_rate": 1.0, "request_burst": 1},
        "bundle_quota": 64 * 1024,
        "bundle_source_quota": 16 * 1024,
    }
    async with LocalMesh(tmp_path, 1, node_settings=settings) as single:
        node1 = as_node(single, 1)
        first = single.nodes[0].sign(anomaly(6)).to_json()
        sent, received = await node1.call("POST", "/v1/mesh/gossip", body=first)
        assert received.status_code == 202, received.data
        second = single.nodes[0].sign(anomaly(7)).to_json()
        sent, received = await node1.call("POST", "/v1/mesh/gossip", body=second)
        assert (received.status_code, error_code(received)) == (429, "rate_limited")
        assert received.headers["Retry-After"] == "1"
        conforms(sent, received)
        headers = Headers([(k, v) for k, v in received.headers.items() if k != "Retry-After"])
        with pytest.raises(MissingRequiredHeader):
            API.validate_response(sent, replace(received, headers=headers))

        def send(size: int) -> dict[str, Any]:
            payload = base64.b64encode(b"\x01" * size).decode()
            return {"destination": "node-9", "ttl_sec": 600, "payload": payload}

        sent, received = await node1.call("POST", "/v1/bundles", body=send(20_000))
        assert (received.status_code, error_code(received)) == (429, "source_quota")
        conforms(sent, received)

        sent, received = await node1.call("POST", "/v1/bundles", body=send(70_000))
        assert (received.status_code, error_code(received)) == (507, "store_full")
        conforms(sent, received)

        sent, received = await node1.call("POST", "/v1/bundles", body=send(1024 * 1024 + 1))
        assert (received.status_code, error_code(received)) == (413, "too_large")
        conforms(sent, received)


# --- bundles ------------------------------------------------------------------------------


async def test_bundle_round_trip_conforms(mesh: LocalMesh) -> None:
    node1, node2 = as_node(mesh, 1), as_node(mesh, 2)
    body = {"destination": "node-2", "ttl_sec": 600, "payload": base64.b64encode(b"hi").decode()}
    sent, received = await node1.call("POST", "/v1/bundles", body=body)
    assert received.status_code == 201, received.data
    conforms(sent, received)
    bundle_id = received.json()["bundle_id"]

    receiver = mesh.nodes[1]
    await mesh.wait_for(
        lambda: receiver.bundles.find(bundle_id) is not None, WAIT, what="the delivery"
    )

    sent, received = await node2.call("GET", "/v1/bundles")
    assert received.status_code == 200, received.data
    conforms(sent, received)
    (item,) = received.json()["bundles"]
    assert (item["bundle_id"], item["role"], item["payload"]) == (
        bundle_id,
        "inbox",
        body["payload"],
    )
    assert (item["source"], item["destination"]) == ("node-1", "dtn://node-2/inbox")

    for role in ("forwarding", "fragment"):
        sent, received = await node2.call("GET", "/v1/bundles", query={"role": role})
        assert received.status_code == 200, received.data
        conforms(sent, received)

    path = f"/v1/bundles/{bundle_id}"
    sent, received = await node2.call("GET", path)
    assert received.status_code == 200, received.data
    conforms(sent, received)
    assert received.json() == item

    sent, received = await node2.call("GET", path, headers={"Accept": "application/cbor"})
    assert received.status_code == 200, received.data
    assert received.content_type == "application/cbor"
    conforms(sent, received)
    stored = receiver.bundles.find(bundle_id)
    assert stored is not None and received.data == stored.data

    sent, received = await node2.call("DELETE", path)
    assert received.status_code == 200, received.data
    conforms(sent, received)
    assert received.json() == {"bundle_id": bundle_id, "status": "acknowledged"}

    for method in ("DELETE", "GET"):
        sent, received = await node2.call(method, path)
        assert (received.status_code, error_code(received)) == (404, "not_found")
        conforms(sent, received)


async def test_bundle_as_cbor_conforms(mesh: LocalMesh) -> None:
    node1 = as_node(mesh, 1)
    cbor = {"Content-Type": "application/cbor"}
    raw = cbor_bundle("node-1", "node-1", b"to myself")
    sent, received = await node1.call("POST", "/v1/bundles", raw=raw, headers=cbor)
    assert received.status_code == 201, received.data
    conforms(sent, received)
    bundle_id = received.json()["bundle_id"]
    sent, received = await node1.call("GET", f"/v1/bundles/{bundle_id}")
    assert received.status_code == 200, received.data
    conforms(sent, received)
    assert base64.b64decode(received.json()["payload"]) == b"to myself"

    foreign = cbor_bundle("node-2", "node-1", b"not mine")
    sent, received = await node1.call("POST", "/v1/bundles", raw=foreign, headers=cbor)
    assert (received.status_code, error_code(received)) == (400, "bad_bundle")
    conforms(sent, received)

    sent, received = await node1.call("POST", "/v1/bundles", raw=b"\x9f\x00", headers=cbor)
    assert (received.status_code, error_code(received)) == (400, "malformed")
    conforms(sent, received)


async def test_bundle_errors_conform(mesh: LocalMesh) -> None:
    node1 = as_node(mesh, 1)

    # Another node's certificate: a mesh member, but not this node.
    sent, received = await as_node(mesh, 2, to=1).call("GET", "/v1/bundles")
    assert (received.status_code, error_code(received)) == (403, "not_this_node")
    conforms(sent, received)
    sent, received = await as_node(mesh, 2, to=1).call("GET", "/v1/mesh/health")
    assert received.status_code == 200  # the mesh routes take any member's
    conforms(sent, received)

    sent, received = await node1.call("GET", "/v1/bundles", query={"role": "outbox"})
    assert (received.status_code, error_code(received)) == (400, "malformed")
    conforms(sent, received, request_conforms=False)
    with pytest.raises(InvalidParameter):
        API.validate_request(sent)

    sent, received = await node1.call("GET", "/v1/bundles/not-a-bundle-id")
    assert (received.status_code, error_code(received)) == (400, "malformed")
    conforms(sent, received, request_conforms=False)
    with pytest.raises(InvalidParameter):
        API.validate_request(sent)

    body = {"destination": "node-2", "ttl_sec": 600, "payload": "aGk=", "priority": 1}
    sent, received = await node1.call("POST", "/v1/bundles", body=body)
    assert (received.status_code, error_code(received)) == (400, "malformed")
    conforms(sent, received, request_conforms=False)
    with pytest.raises(InvalidRequestBody):
        API.validate_request(sent)

    body = {"destination": "node-2", "ttl_sec": 0, "payload": "aGk="}
    sent, received = await node1.call("POST", "/v1/bundles", body=body)
    assert (received.status_code, error_code(received)) == (400, "malformed")
    conforms(sent, received, request_conforms=False)
    with pytest.raises(InvalidRequestBody):
        API.validate_request(sent)


# --- authentication, unknown paths and methods ----------------------------------------------


async def test_without_client_certificate_conforms(mesh: LocalMesh) -> None:
    for method, path in [
        ("GET", "/v1/mesh/peers"),
        ("POST", "/v1/mesh/gossip"),
        ("GET", "/v1/bundles"),
    ]:
        body: dict[str, Any] | None = {} if method == "POST" else None
        sent, received = await anonymous(mesh, 1).call(method, path, body=body)
        assert (received.status_code, error_code(received)) == (401, "unauthenticated"), path
        conforms(sent, received, request_conforms=False)
        with pytest.raises(SecurityValidationError):  # the document requires mutual TLS
            API.validate_request(sent)


async def test_unknown_path_and_wrong_method_conform(mesh: LocalMesh) -> None:
    _, received = await anonymous(mesh, 1).call("GET", "/v1/nothing-here")
    assert (received.status_code, error_code(received)) == (401, "unauthenticated")

    node1 = as_node(mesh, 1)
    _, received = await node1.call("GET", "/v1/nothing-here")
    assert (received.status_code, error_code(received)) == (404, "not_found")
    conforms_to_component(received, "NotFound")

    _, received = await node1.call("GET", "/v1/mesh/gossip")
    assert (received.status_code, error_code(received)) == (405, "method_not_allowed")
    assert received.headers["Allow"] == "POST"
    conforms_to_component(received, "MethodNotAllowed")


# --- drift: responses the document does not describe fail validation ---------------------


def _edit_gossip(body: dict[str, Any]) -> None:
    body["gossip"]["rejected"]["bad-signature"] = "one"


DRIFTS: dict[str, Callable[[dict[str, Any]], object]] = {
    "missing-field": lambda body: body.pop("renewal_due"),
    "missing-nested": lambda body: body["formation"].pop("dials"),
    "undocumented-field": lambda body: body.update(bundles=0),
    "undocumented-listener": lambda body: body["limits"].update(other={}),
    "wrong-type": _edit_gossip,
    "bad-serial-format": lambda body: body.update(serial="0xABC"),
}


async def test_a_drifted_response_fails_validation(mesh: LocalMesh) -> None:
    sent, received = await as_node(mesh, 1).call("GET", "/v1/mesh/health")
    conforms(sent, received)  # the real one passes
    for name, edit in DRIFTS.items():
        body = received.json()
        edit(body)
        drifted = replace(received, data=json.dumps(body).encode())
        try:
            API.validate_response(sent, drifted)
        except InvalidData:
            continue
        pytest.fail(f"the response with drift {name!r} passed validation")
    with pytest.raises(ResponseNotFound):  # a status the operation never answers
        API.validate_response(sent, replace(received, status_code=507))
