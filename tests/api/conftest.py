"""A running CA API on loopback for the API tests: a fresh CA in tmp_path, served by
CaServer over trustmesh TLS (see ca_support for the helpers)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from ca_support import PASSPHRASE, RunningCa, make_csr

from trustmesh.api.ca_server import CaServer
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar

__all__ = ["RunningCa", "make_csr"]


@pytest.fixture
async def ca_api_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await factory(policy=..., limiter=..., settings=...)``: start a CA API."""
    running: list[RunningCa] = []

    async def start(
        *,
        policy: EnrollmentPolicy | None = None,
        limiter: RateLimiter | None = None,
        settings: MeshSettings | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> RunningCa:
        directory = tmp_path / f"ca{len(running)}"
        ca = CertificateAuthority.init(directory, PASSPHRASE)
        registrar = Registrar(ca, policy or EnrollmentPolicy(), settings or MeshSettings())
        server = CaServer(
            registrar,
            PASSPHRASE,
            "127.0.0.1",
            0,
            limiter=limiter or RateLimiter(1000.0, 1000),
            clock=clock or (lambda: datetime.now(UTC)),
        )
        await server.start()
        handle = RunningCa(ca, server, directory)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        for session in handle.sessions:
            await session.close()
        await handle.server.stop()
        handle.ca.close()


@pytest.fixture
async def ca_api(ca_api_factory: Callable[..., Any]) -> RunningCa:
    """A CA API with the default policy and a generous rate limit."""
    running: RunningCa = await ca_api_factory()
    return running
