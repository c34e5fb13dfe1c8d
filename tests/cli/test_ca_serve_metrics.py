"""``trustmesh ca serve`` as a process: its access log (one JSON line per request on
stderr) and ``--metrics HOST:PORT`` (plain HTTP, scraped and parsed)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from catools import JSON, PASS, WAIT, curl, require_curl, serving, succeeds
from prometheus_client.parser import text_string_to_metric_families

from trustmesh.pki.ca import CertificateAuthority


def test_ca_serve_logs_every_request_and_serves_metrics(tmp_path: Path) -> None:
    require_curl()
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory, PASS.encode()).close()
    with serving(directory, "--metrics", "127.0.0.1:0") as server:
        ca = server.ca_cert
        assert curl(f"{server.url}/v1/health", "--cacert", ca).status == 200
        token = succeeds("ca", "token", "create", "--dir", directory, "--node-id", "node-9")
        body = json.dumps({"token": token.strip(), "csr": "not a CSR"})
        reply = curl(f"{server.url}/v1/enroll", "--cacert", ca, "-H", JSON, "-d", body)
        assert reply.error(400, "invalid_csr")
        assert curl(f"{server.url}/nothing/here", "--cacert", ca).status == 404

        metrics_url = server.metrics_url  # the first line names it
        assert metrics_url is not None and metrics_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(metrics_url, timeout=WAIT) as response:
            assert response.status == 200
            text = response.read().decode()
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert values[("trustmesh_ca_enrollments_total", (("outcome", "invalid_csr"),))] == 1
        health = (("method", "GET"), ("route", "/v1/health"), ("status", "200"))
        assert values[("trustmesh_ca_requests_total", health)] == 1
        assert server.terminate() == 0, server.errors()

    lines = [json.loads(line) for line in server.errors().splitlines()]
    access = [line for line in lines if line["logger"] == "trustmesh.api.ca.access"]
    assert [(a["method"], a["route"], a["status"]) for a in access] == [
        ("GET", "/v1/health", 200),
        ("POST", "/v1/enroll", 400),
        ("GET", None, 404),
    ]
    for line in access:
        assert line["event"] == "http.request"
        assert line["identity"] == "anonymous"
        assert line["remote"] == "127.0.0.1"
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
        assert {"ts", "level"} <= line.keys()
    assert token.strip() not in server.errors()  # a token is never logged
    # The refusal is audited too.
    audit = succeeds("ca", "audit", "--dir", directory, "--jsonl")
    refused = [json.loads(x) for x in audit.splitlines() if '"enroll-refused"' in x]
    assert [(r["node_id"], r["detail"]["reason"]) for r in refused] == [("node-9", "invalid_csr")]
