"""The CA API's OpenAPI 3.1 document (src/trustmesh/api/ca_openapi.json): it is valid
OpenAPI 3.1, the server serves it, and real requests and responses on a running CA conform
to it (openapi-core). The response validator runs strict: a field the document does not
describe is an error as much as a missing one, so the document cannot drift from the
code unnoticed."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from ca_support import RunningCa, make_csr
from cryptography import x509
from jsonschema_path import SchemaPath
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.deserializing.media_types.util import plain_loads
from openapi_core.security.exceptions import SecurityProviderError
from openapi_core.security.factories import SecurityProviderFactory
from openapi_core.security.providers import BaseProvider
from openapi_core.templating.responses.exceptions import ResponseNotFound
from openapi_core.validation.request.exceptions import (
    InvalidParameter,
    InvalidRequestBody,
    SecurityValidationError,
)
from openapi_core.validation.response.exceptions import (
    InvalidData,
    MissingRequiredHeader,
)
from openapi_schema_validator import OAS31Validator
from openapi_schema_validator import validate as validate_schema
from openapi_spec_validator import OpenAPIV31SpecValidator
from openapi_spec_validator import validate as validate_spec
from werkzeug.datastructures import Headers, ImmutableMultiDict

from trustmesh.api.ca import ca_app, openapi_document
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.clock import SystemClock
from trustmesh.pki.ca import token_hash
from trustmesh.pki.enroll import EnrollmentPolicy

Factory = Callable[..., Any]
DOCUMENT = openapi_document()


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
        # Strict: an object schema without additionalProperties accepts no other fields
        # (the request bodies say additionalProperties: true, as the server ignores extras).
        additional_properties_default_policy="forbid",
        # PEM is text: validate it as the string the document says (DER stays bytes).
        extra_media_type_deserializers={"application/x-pem-file": plain_loads},
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
    """An aiohttp session on the CA that records each exchange for validation."""

    session: aiohttp.ClientSession
    url: str
    client_certificate: bool = False
    extra_headers: dict[str, str] = field(default_factory=dict)

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        form: Mapping[str, str] | None = None,
        raw: bytes | None = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[Sent, Received]:
        sent_headers = {**self.extra_headers, **(headers or {})}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent_headers["Content-Type"] = "application/json"
        elif form is not None:
            data = urlencode(form).encode()
            sent_headers["Content-Type"] = "application/x-www-form-urlencoded"
        async with self.session.request(
            method, self.url + path, data=data, params=query, headers=sent_headers
        ) as response:
            received = Received(
                status_code=response.status,
                content_type=response.headers.get("Content-Type", "").lower(),
                headers=Headers(list(response.headers.items())),
                data=await response.read(),
            )
        sent = Sent(
            host_url=self.url,
            path=path,
            method=method.lower(),
            body=data,
            content_type=sent_headers.get("Content-Type", ""),
            parameters=MeshParameters(
                query=ImmutableMultiDict(query or {}),
                header=Headers(sent_headers),
                client_certificate=self.client_certificate,
            ),
        )
        return sent, received


def client(ca_api: RunningCa, cert: Path | None = None, key: Path | None = None) -> Client:
    return Client(ca_api.session(cert, key), ca_api.url, client_certificate=cert is not None)


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
        received.json(),
        {**schema, "components": DOCUMENT["components"]},
        cls=OAS31Validator,
    )
    assert set(received.json()) == {"error", "message"}


def error_code(received: Received) -> str:
    code: str = received.json()["error"]
    return code


async def enroll(ca_api: RunningCa, api: Client, node_id: str) -> tuple[Sent, Received]:
    csr, _ = make_csr(node_id)
    return await api.call("POST", "/v1/enroll", body={"token": ca_api.token(node_id), "csr": csr})


# --- the document itself ------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    validate_spec(DOCUMENT, cls=OpenAPIV31SpecValidator)
    assert DOCUMENT["openapi"] == "3.1.0"
    assert DOCUMENT["info"]["title"] == "trustmesh mesh CA"
    assert DOCUMENT["info"]["version"] == "1"


def test_document_describes_exactly_the_routes_of_the_app(ca_api: RunningCa) -> None:
    app = ca_app(ca_api.server.registrar, limiter=RateLimiter(1.0, 1))
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"  # aiohttp adds HEAD to GET
    }
    documented = {
        (method, path)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method != "head"
    }
    assert documented == routes


async def test_server_serves_the_document(ca_api: RunningCa) -> None:
    sent, received = await client(ca_api).call("GET", "/v1/openapi.json")
    assert received.status_code == 200
    assert received.json() == DOCUMENT
    conforms(sent, received)


# --- enrollment ---------------------------------------------------------------------------


async def test_enroll_success_conforms(ca_api: RunningCa) -> None:
    sent, received = await enroll(ca_api, client(ca_api), "node-1")
    assert received.status_code == 200, received.data
    conforms(sent, received)
    body = received.json()
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert body["serial"] == format(cert.serial_number, "x")
    assert body["node_id"] == "node-1"
    assert body["config"]["crl_url"] is None


async def test_enroll_form_with_pem_answer_conforms(ca_api: RunningCa) -> None:
    csr, _ = make_csr("node-1")
    form = {"token": ca_api.token("node-1"), "csr": csr}
    sent, received = await client(ca_api).call(
        "POST", "/v1/enroll", form=form, headers={"Accept": "application/x-pem-file"}
    )
    assert received.status_code == 200, received.data
    assert received.content_type == "application/x-pem-file"
    conforms(sent, received)
    leaf, issuing = x509.load_pem_x509_certificates(received.data)
    assert issuing == ca_api.ca.issuing_cert
    leaf.verify_directly_issued_by(issuing)


async def test_enroll_errors_conform(ca_api: RunningCa) -> None:
    api = client(ca_api)
    csr, _ = make_csr("node-1")

    sent, received = await api.call(
        "POST", "/v1/enroll", body={"token": "tmenroll_" + "A" * 43, "csr": csr}
    )
    assert (received.status_code, error_code(received)) == (400, "invalid_token")
    conforms(sent, received)

    body = {"token": ca_api.token("node-1"), "csr": "-----BEGIN CERTIFICATE REQUEST-----\nxx"}
    sent, received = await api.call("POST", "/v1/enroll", body=body)
    assert (received.status_code, error_code(received)) == (400, "invalid_csr")
    conforms(sent, received)

    # Requests the document itself rules out get the documented 400 too.
    sent, received = await api.call("POST", "/v1/enroll", body={"csr": csr})
    assert (received.status_code, error_code(received)) == (400, "bad_request")
    conforms(sent, received, request_conforms=False)
    with pytest.raises(InvalidRequestBody):
        API.validate_request(sent)

    json_type = {"Content-Type": "application/json"}
    sent, received = await api.call("POST", "/v1/enroll", raw=b"{not json", headers=json_type)
    assert (received.status_code, error_code(received)) == (400, "bad_request")
    conforms(sent, received, request_conforms=False)


async def test_enroll_policy_denied_conforms(ca_api_factory: Factory) -> None:
    running: RunningCa = await ca_api_factory(policy=EnrollmentPolicy(allow=("web-*",)))
    sent, received = await enroll(running, client(running), "node-1")
    assert (received.status_code, error_code(received)) == (403, "policy_denied")
    conforms(sent, received)


async def test_too_large_body_conforms(ca_api: RunningCa) -> None:
    body = {"token": ca_api.token("node-1"), "csr": "x" * (70 * 1024)}
    sent, received = await client(ca_api).call("POST", "/v1/enroll", body=body)
    assert (received.status_code, error_code(received)) == (413, "too_large")
    conforms(sent, received)


async def test_rate_limited_conforms(ca_api_factory: Factory) -> None:
    running: RunningCa = await ca_api_factory(limiter=RateLimiter(1.0, 1, clock=lambda: 0.0))
    api = client(running)
    first = await enroll(running, api, "node-1")
    assert first[1].status_code == 200
    sent, received = await enroll(running, api, "node-2")
    assert (received.status_code, error_code(received)) == (429, "rate_limited")
    assert received.headers["Retry-After"] == "1"
    conforms(sent, received)


# --- rotation -----------------------------------------------------------------------------


async def test_rotate_without_certificate_conforms(ca_api: RunningCa) -> None:
    csr, _ = make_csr("node-2")
    sent, received = await client(ca_api).call("POST", "/v1/rotate", body={"csr": csr})
    assert (received.status_code, error_code(received)) == (401, "unauthenticated")
    conforms(sent, received, request_conforms=False)
    with pytest.raises(SecurityValidationError):  # the document requires mutual TLS
        API.validate_request(sent)


async def test_rotate_with_node_certificate_conforms(ca_api: RunningCa, tmp_path: Path) -> None:
    cert_file, key_file, cert = ca_api.write_node(tmp_path, "node-2")
    csr, _ = make_csr("node-2")
    body = {"csr": csr, "current_cert_serial": format(cert.serial_number, "x")}
    sent, received = await client(ca_api, cert_file, key_file).call("POST", "/v1/rotate", body=body)
    assert received.status_code == 200, received.data
    conforms(sent, received)
    answer = received.json()
    assert answer["previous_serial"] == format(cert.serial_number, "x")
    assert answer["serial"] != answer["previous_serial"]
    assert answer["node_id"] == "node-2"

    # The same request again (a retry: the same key) gets the same certificate; as a
    # form, in PEM.
    sent, received = await client(ca_api, cert_file, key_file).call(
        "POST", "/v1/rotate", form={"csr": csr}, query={"format": "pem"}
    )
    assert received.status_code == 200, received.data
    assert received.content_type == "application/x-pem-file"
    conforms(sent, received)
    leaf, _ = x509.load_pem_x509_certificates(received.data)
    assert leaf.subject == cert.subject
    assert format(leaf.serial_number, "x") == answer["serial"]

    # Another key: the old certificate is superseded and may not rotate again.
    other, _ = make_csr("node-2")
    sent, received = await client(ca_api, cert_file, key_file).call(
        "POST", "/v1/rotate", body={"csr": other}
    )
    assert (received.status_code, error_code(received)) == (409, "superseded")
    conforms(sent, received)

    # A current_cert_serial that is not the client certificate's.
    body = {"csr": other, "current_cert_serial": "abc123"}
    sent, received = await client(ca_api, cert_file, key_file).call("POST", "/v1/rotate", body=body)
    assert (received.status_code, error_code(received)) == (400, "serial_mismatch")
    conforms(sent, received)


# --- the CRL ------------------------------------------------------------------------------


async def test_crl_der_pem_and_not_modified_conform(ca_api: RunningCa) -> None:
    api = client(ca_api)

    sent, der = await api.call("GET", "/v1/crl")
    assert der.status_code == 200
    assert der.content_type == "application/pkix-crl"
    x509.load_der_x509_crl(der.data)
    conforms(sent, der)

    sent, pem = await api.call("GET", "/v1/crl", query={"format": "pem"})
    assert pem.status_code == 200
    assert pem.content_type == "application/x-pem-file"
    x509.load_pem_x509_crl(pem.data)
    conforms(sent, pem)

    etag = der.headers["ETag"]
    sent, cached = await api.call("GET", "/v1/crl", headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.data == b""
    assert cached.headers["ETag"] == etag
    conforms(sent, cached)

    sent, head = await api.call("HEAD", "/v1/crl", headers={"If-None-Match": pem.headers["ETag"]})
    assert head.status_code == 200  # the PEM tag does not match the DER form
    assert head.headers["ETag"] == etag
    conforms(sent, head)

    sent, bad = await api.call("GET", "/v1/crl", query={"format": "xml"})
    assert (bad.status_code, error_code(bad)) == (400, "bad_request")
    conforms(sent, bad, request_conforms=False)
    with pytest.raises(InvalidParameter):
        API.validate_request(sent)


# --- revocation ---------------------------------------------------------------------------


async def test_revoke_with_admin_token_conforms(ca_api: RunningCa, tmp_path: Path) -> None:
    _, _, cert = ca_api.write_node(tmp_path, "node-3")
    admin = client(ca_api)
    admin.extra_headers["Authorization"] = f"Bearer {ca_api.ca.create_admin_token()}"

    body = {"serial": format(cert.serial_number, "x"), "reason": "keyCompromise"}
    sent, received = await admin.call("POST", "/v1/revoke", body=body)
    assert received.status_code == 204, received.data
    assert received.data == b""
    conforms(sent, received)
    sent, crl = await admin.call("GET", "/v1/crl")
    revoked = x509.load_der_x509_crl(crl.data)
    assert revoked.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    ca_api.write_node(tmp_path, "node-5")
    form = {"node_id": "node-5", "reason": "cessationOfOperation"}
    sent, received = await admin.call("POST", "/v1/revoke", form=form)
    assert received.status_code == 204, received.data
    conforms(sent, received)
    assert [c.revoked_at is not None for c in ca_api.ca.store.by_node("node-5")] == [True]

    sent, received = await admin.call("POST", "/v1/revoke", body={"serial": "abc123"})
    assert (received.status_code, error_code(received)) == (404, "unknown_certificate")
    conforms(sent, received)

    sent, received = await admin.call("POST", "/v1/revoke", body={"reason": "superseded"})
    assert (received.status_code, error_code(received)) == (400, "bad_request")
    conforms(sent, received, request_conforms=False)  # neither serial nor node_id
    with pytest.raises(InvalidRequestBody):
        API.validate_request(sent)


async def test_revoke_without_credentials_conforms(ca_api: RunningCa) -> None:
    sent, received = await client(ca_api).call("POST", "/v1/revoke", body={"node_id": "node-1"})
    assert (received.status_code, error_code(received)) == (401, "unauthenticated")
    assert received.headers["WWW-Authenticate"] == "Bearer"
    conforms(sent, received, request_conforms=False)
    with pytest.raises(SecurityValidationError):
        API.validate_request(sent)


async def test_revoke_with_node_certificate_is_forbidden(ca_api: RunningCa, tmp_path: Path) -> None:
    cert_file, key_file, _ = ca_api.write_node(tmp_path, "node-4")
    api = client(ca_api, cert_file, key_file)
    sent, received = await api.call("POST", "/v1/revoke", body={"node_id": "node-4"})
    assert (received.status_code, error_code(received)) == (403, "forbidden")
    conforms(sent, received)  # the request has the credential type the document asks for


# --- health, unknown paths and methods, internal errors -----------------------------------


async def test_health_conforms(ca_api: RunningCa) -> None:
    sent, received = await client(ca_api).call("GET", "/v1/health")
    assert received.status_code == 200
    conforms(sent, received)
    assert received.json()["status"] == "ok"
    assert received.json()["revoked"] == 0


async def test_unknown_path_and_wrong_method_conform(ca_api: RunningCa) -> None:
    api = client(ca_api)
    _, received = await api.call("GET", "/v1/nothing-here")
    assert (received.status_code, error_code(received)) == (404, "not_found")
    conforms_to_component(received, "NotFound")

    _, received = await api.call("GET", "/v1/enroll")
    assert (received.status_code, error_code(received)) == (405, "method_not_allowed")
    assert received.headers["Allow"] == "POST"
    conforms_to_component(received, "MethodNotAllowed")


class FailingClock(SystemClock):
    """The CA's clock; once ``broken``, it raises, so a handler fails unexpectedly."""

    def __init__(self) -> None:
        self.broken = False

    def now(self) -> datetime:
        if self.broken:
            raise RuntimeError("the clock broke")
        return super().now()


async def test_internal_error_conforms(ca_api_factory: Factory) -> None:
    clock = FailingClock()
    running: RunningCa = await ca_api_factory(clock=clock)
    clock.broken = True
    sent, received = await client(running).call("GET", "/v1/health")
    assert (received.status_code, error_code(received)) == (500, "internal")
    conforms(sent, received)


# --- drift: responses the document does not describe fail validation ---------------------


def _edit_config(body: dict[str, Any]) -> None:
    body["config"]["crl_url"] = 42


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda body: body.pop("serial"), id="missing-serial"),
        pytest.param(lambda body: body["config"].pop("gossip_fanout"), id="missing-nested"),
        pytest.param(lambda body: body.update(expires="soon"), id="undocumented-field"),
        pytest.param(_edit_config, id="wrong-type"),
        pytest.param(lambda body: body.update(serial="0xABC"), id="bad-serial-format"),
    ],
)
async def test_a_drifted_enroll_response_fails_validation(
    ca_api: RunningCa, edit: Callable[[dict[str, Any]], object]
) -> None:
    sent, received = await enroll(ca_api, client(ca_api), "node-1")
    conforms(sent, received)  # the real one passes
    body = received.json()
    edit(body)
    drifted = replace(received, data=json.dumps(body).encode())
    with pytest.raises(InvalidData):
        API.validate_response(sent, drifted)


async def test_a_drifted_crl_response_fails_validation(ca_api: RunningCa) -> None:
    sent, received = await client(ca_api).call("GET", "/v1/crl")
    conforms(sent, received)
    headers = Headers([(k, v) for k, v in received.headers.items() if k.lower() != "etag"])
    with pytest.raises(MissingRequiredHeader):
        API.validate_response(sent, replace(received, headers=headers))
    with pytest.raises(ResponseNotFound):  # a status the operation never answers
        API.validate_response(sent, replace(received, status_code=401))


# --- challenges ---------------------------------------------------------------------------


async def test_challenges_conform(ca_api: RunningCa, tmp_path: Path) -> None:
    api = client(ca_api)
    token = ca_api.token("node-c")
    sent, received = await api.call("POST", "/v1/enroll/challenge", body={"token": token})
    assert received.status_code == 200, received.data
    conforms(sent, received)
    assert len(base64.b64decode(received.json()["nonce"])) == 40
    # A challenge spends nothing: the token still enrolls.
    unspent = ca_api.ca.store.token(token_hash(token))
    assert unspent is not None and unspent.used_at is None

    sent, received = await api.call("POST", "/v1/enroll/challenge", body={"token": "tmenroll_x"})
    assert (received.status_code, error_code(received)) == (400, "invalid_token")
    conforms(sent, received)

    sent, received = await api.call("POST", "/v1/enroll/challenge", body={})
    assert (received.status_code, error_code(received)) == (401, "unauthenticated")
    conforms(sent, received)

    cert_file, key_file, _ = ca_api.write_node(tmp_path, "node-d")
    mtls = client(ca_api, cert_file, key_file)
    sent, received = await mtls.call("POST", "/v1/enroll/challenge", body={})
    assert received.status_code == 200, received.data
    conforms(sent, received)


async def test_attestation_reports_conform(ca_api: RunningCa, tmp_path: Path) -> None:
    evidence = {"quote": "AA==", "signature": "AA==", "ak_public": "AA==", "pcrs": {"sha256": {}}}
    anonymous = client(ca_api)
    sent, received = await anonymous.call(
        "POST", "/v1/attestation/report", body={"serial": "01", "evidence": evidence}
    )
    assert (received.status_code, error_code(received)) == (401, "unauthenticated")
    conforms(sent, received, request_conforms=False)  # no client certificate, on purpose

    cert_file, key_file, cert = ca_api.write_node(tmp_path, "node-r")
    reporter = client(ca_api, cert_file, key_file)
    sent, received = await reporter.call(
        "POST", "/v1/attestation/report", body={"serial": "0badc0de", "evidence": evidence}
    )
    assert (received.status_code, error_code(received)) == (404, "unknown_certificate")
    conforms(sent, received)
    # A certificate issued without a quote has no platform to check a quote against.
    body = {"serial": format(cert.serial_number, "x"), "evidence": evidence}
    sent, received = await reporter.call("POST", "/v1/attestation/report", body=body)
    assert (received.status_code, error_code(received)) == (400, "bad_request")
    assert "no attested platform" in received.json()["message"]
    conforms(sent, received)
    sent, received = await reporter.call(
        "POST", "/v1/attestation/report", body={"serial": "01", "evidence": "not an object"}
    )
    assert (received.status_code, error_code(received)) == (400, "bad_request")
    conforms(sent, received, request_conforms=False)
