"""Hostile input to the CA API: whatever the body, every answer is a JSON error with a
4xx status (never a 500, never a hang), and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh.api.ca import ca_app
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.clock import FakeClock
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["token", "csr", "node_id", "attestation", "serial", "reason", "current_cert_serial"]
)
bodies = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(field_names, json_values, max_size=5).map(lambda v: json.dumps(v).encode())
)


@pytest.fixture
async def client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestClient[Any, Any]]:
    directory: Path = tmp_path_factory.mktemp("fuzz") / "ca"
    ca = CertificateAuthority.init(directory, None, now=NOW)
    app = ca_app(
        Registrar(ca, EnrollmentPolicy(), MeshSettings()),
        limiter=RateLimiter(1e9, 10**9),
        clock=FakeClock(NOW),
    )
    test_client = TestClient(TestServer(app, host="127.0.0.1"))
    await test_client.start_server()
    yield test_client
    await test_client.close()
    ca.close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(path=st.sampled_from(["/v1/enroll", "/v1/rotate", "/v1/revoke"]), body=bodies)
async def test_any_body_gets_a_json_4xx(
    client: TestClient[Any, Any], path: str, body: bytes
) -> None:
    headers = {"Authorization": "Bearer tmadmin_x"} if path == "/v1/revoke" else {}
    response = await client.post(path, data=body, headers=headers)
    assert 400 <= response.status < 500, await response.text()
    answer = await response.json()
    assert set(answer) == {"error", "message"}
    assert answer["message"]


async def test_the_server_still_serves_after_the_fuzzing(client: TestClient[Any, Any]) -> None:
    for _ in range(3):
        await client.post("/v1/enroll", data=b"\x00" * 1000)
    response = await client.get("/v1/health")
    assert response.status == 200
