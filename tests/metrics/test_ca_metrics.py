"""The CA's metrics, access log and audit of refused enrollments (issue 21): a CA API on
loopback, an enrollment and refused ones, then ``/metrics`` scraped and parsed with
prometheus-client's own parser, on the API (admins only) and on the plain-HTTP port."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ca_support import PASSPHRASE, RunningCa, make_csr
from catools import succeeds
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from trustmesh.pki.ca import token_hash
from trustmesh.pki.store import admin_token_id

Factory = Callable[..., Any]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by (name, sorted labels)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def post_enroll(running: RunningCa, body: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with running.session().post(f"{running.url}/v1/enroll", json=body) as response:
        return response.status, await response.json()


async def get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str, str]:
    async with session.get(url, headers=headers) as response:
        return response.status, response.headers["Content-Type"], await response.text()


def write_admin(running: RunningCa, folder: Path) -> tuple[Path, Path]:
    """An admin client certificate and its key, as `trustmesh ca admin-cert` writes them."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = running.ca.issue_admin("alice", key.public_key())
    folder.mkdir()
    cert_file, key_file = folder / "admin.crt", folder / "admin.key"
    cert_file.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + running.ca.issuing_cert.public_bytes(serialization.Encoding.PEM)
    )
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_enrollments_refusals_and_the_crl_are_measured(
    ca_api_factory: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trustmesh.api.ca")
    running: RunningCa = await ca_api_factory(metrics=("127.0.0.1", 0))
    metrics_server = running.server.metrics_server
    assert metrics_server is not None
    assert metrics_server.url.startswith("http://127.0.0.1:")

    token = running.token("node-1")
    csr, _ = make_csr("node-1")
    status, body = await post_enroll(running, {"token": token, "csr": csr})
    assert status == 200, body
    serial = int(body["serial"], 16)
    # Refused: an unknown token, the spent token again (another key), a bad CSR.
    unknown = "tmenroll_" + "A" * 43
    other, _ = make_csr("node-1")
    fresh = running.token("node-2")
    refusals = [
        ({"token": unknown, "csr": csr}, "invalid_token"),
        ({"token": token, "csr": other}, "invalid_token"),
        ({"token": fresh, "csr": "-----BEGIN CERTIFICATE REQUEST-----\nxx"}, "invalid_csr"),
    ]
    for request, code in refusals:
        status, body = await post_enroll(running, request)
        assert (status, body["error"]) == (400, code), body
    running.ca.revoke(serial=serial, reason="keyCompromise")

    async with aiohttp.ClientSession() as plain:
        status, content_type, text = await get(plain, metrics_server.url)
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        found = samples(text)
        # Only /metrics on the plain port: the API's routes are not there.
        status, _, text_404 = await get(plain, metrics_server.url.replace("/metrics", "/v1/crl"))
        assert status == 404 and json.loads(text_404)["error"] == "not_found"
        # OpenMetrics when the scraper asks for it.
        status, content_type, om_text = await get(
            plain, metrics_server.url, Accept="application/openmetrics-text; version=1.0.0"
        )
        assert content_type.startswith("application/openmetrics-text")
        parsed = openmetrics_families(om_text)  # type: ignore[no-untyped-call]
        om_names = {family.name for family in parsed}
        assert "trustmesh_ca_enrollments" in om_names

    enrolled = "trustmesh_ca_enrollments_total"
    assert value(found, enrolled, outcome="issued") == 1
    assert value(found, enrolled, outcome="invalid_token") == 2
    assert value(found, enrolled, outcome="invalid_csr") == 1
    assert value(found, enrolled, outcome="policy_denied") == 0  # shown before it happens
    assert value(found, "trustmesh_ca_rotations_total", outcome="issued") == 0
    requests = "trustmesh_ca_requests_total"
    assert value(found, requests, method="POST", route="/v1/enroll", status="200") == 1
    assert value(found, requests, method="POST", route="/v1/enroll", status="400") == 3
    assert value(found, "trustmesh_ca_request_duration_seconds_count", route="/v1/enroll") == 4
    # The CRL was signed again after the revocation: it lists one serial, and is new.
    assert value(found, "trustmesh_ca_crl_revoked_serials") == 1
    assert 0 <= value(found, "trustmesh_ca_crl_age_seconds") < 60
    assert value(found, "trustmesh_ca_crl_next_update_seconds") > 3600
    expiry = "trustmesh_ca_certificate_expiry_seconds"
    assert value(found, expiry, certificate="root") > value(found, expiry, certificate="issuing")
    assert 0 < value(found, expiry, certificate="server") <= 7 * 86400
    # The listeners: the scrape itself holds a connection to the metrics port.
    assert value(found, "trustmesh_ca_connections", listener="metrics", state="authenticated") >= 1
    assert value(found, "trustmesh_ca_connections", listener="api", state="unauthenticated") >= 0

    # Every refusal is in the audit log, with its reason, node and client address;
    # `ca audit --json` (another process, on the same database) shows them.
    audit = [
        json.loads(line)
        for line in succeeds(
            "ca", "audit", "--dir", running.directory, "--jsonl", passphrase=PASSPHRASE.decode()
        ).splitlines()
    ]
    refused = [entry for entry in audit if entry["event"] == "enroll-refused"]
    newest_first = [(e["detail"]["reason"], e["node_id"], e["detail"]["node_id"]) for e in refused]
    # A token this CA never issued adds no row: anyone could send those without end
    # (the metrics above and the access log count them).
    assert newest_first == [
        ("invalid_csr", "node-2", "node-2"),
        ("invalid_token", "node-1", "node-1"),  # the spent token knows its node
    ]
    for entry in refused:
        assert entry["detail"]["client"] == "127.0.0.1" == entry["actor"]
        assert entry["detail"]["message"]
    assert all(unknown not in json.dumps(entry) for entry in audit)

    # One access-log line per request, with the route pattern and the client.
    lines = [r for r in caplog.records if r.name == "trustmesh.api.ca.access"]
    fields = [r.fields for r in lines]  # type: ignore[attr-defined]
    assert [f["status"] for f in fields] == [200, 400, 400, 400]
    for line in fields:
        assert set(line) == {"method", "route", "status", "identity", "remote", "latency_ms"}
        assert (line["method"], line["route"], line["remote"]) == (
            "POST",
            "/v1/enroll",
            "127.0.0.1",
        )
        assert line["latency_ms"] >= 0
    assert [f["identity"] for f in fields] == [
        "enroll:node-1",
        "anonymous",
        "anonymous",
        "anonymous",
    ]


async def test_metrics_on_the_api_are_for_admins(
    ca_api_factory: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trustmesh.api.ca.access")
    running: RunningCa = await ca_api_factory()
    url = f"{running.url}/metrics"
    admin = running.ca.create_admin_token("prometheus")
    node_cert, node_key, _ = running.write_node(tmp_path / "node", "node-1")
    admin_cert, admin_key = write_admin(running, tmp_path / "admin")

    # No credentials, a forged token: 401. A node's certificate: 403.
    status, _, text = await get(running.session(), url)
    assert (status, json.loads(text)["error"]) == (401, "unauthenticated")
    forged = "tmadmin_" + "B" * 43
    status, _, text = await get(running.session(), url, Authorization=f"Bearer {forged}")
    assert status == 401
    status, _, text = await get(running.session(node_cert, node_key), url)
    assert (status, json.loads(text)["error"]) == (403, "forbidden")

    # An admin token or an admin certificate: the metrics.
    status, _, text = await get(running.session(), url, Authorization=f"Bearer {admin}")
    assert status == 200
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {"trustmesh_ca_requests", "trustmesh_ca_crl_age_seconds"} <= families
    status, _, text = await get(running.session(admin_cert, admin_key), url)
    assert status == 200
    found = samples(text)
    assert (
        value(found, "trustmesh_ca_requests_total", method="GET", route="/metrics", status="401")
        == 2
    )
    assert (
        value(found, "trustmesh_ca_requests_total", method="GET", route="/metrics", status="403")
        == 1
    )
    assert (
        value(found, "trustmesh_ca_requests_total", method="GET", route="/metrics", status="200")
        == 1
    )

    # An unknown path is logged by no path at all: the route is null, the label "unmatched".
    status, _, _ = await get(running.session(), f"{running.url}/no/such/{forged}")
    assert status == 404

    identities = [
        (r.fields["status"], r.fields["route"], r.fields["identity"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "trustmesh.api.ca.access"
    ]
    admin_id = admin_token_id(token_hash(admin))
    assert identities == [
        (401, "/metrics", "anonymous"),
        (401, "/metrics", f"token:{admin_token_id(token_hash(forged))}"),
        (403, "/metrics", "node:node-1"),
        (200, "/metrics", f"token:{admin_id}"),
        (200, "/metrics", "admin:alice"),
        (404, None, "anonymous"),
    ]
    logged = "\n".join(json.dumps(r.fields) for r in caplog.records if hasattr(r, "fields"))
    assert admin not in logged and forged not in logged  # a token is never logged
