"""A renewal or CRL poll that fails in any way (a disk error, not only the CA's answer)
is reported and retried: it must never leave the node waiting on a renewal that will
not come, until its certificate expires."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from trustmesh.node import runtime
from trustmesh.node.local import LocalMesh


async def test_a_renewal_that_fails_with_a_disk_error_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with LocalMesh(tmp_path, 1, node_settings={"crl_interval": 3600.0}) as mesh:
        node = mesh.nodes[0]
        seen: list[dict[str, Any]] = []
        node.listeners.append(
            lambda event, f: seen.append(f) if event == "cert.renew_failed" else None
        )

        async def disk_full(*args: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(runtime, "rotate_identity", disk_full)
        node.core.renewal.in_flight = True  # as the core's Renew action left it
        await node._renew_for_core()
        assert not node.core.renewal.in_flight
        assert node.core.renewal.retry_at_ms is not None
        assert seen and "OSError" in seen[0]["error"]
        # ... and counted by outcome, for the metrics.
        assert node.renewals == {"failed": 1}
        scrape = generate_latest(node.metrics.registry).decode()
        assert 'trustmesh_node_certificate_renewals_total{outcome="failed"} 1.0' in scrape
        assert 'trustmesh_node_certificate_renewals_total{outcome="renewed"} 0.0' in scrape

        async def broken_fetch() -> bytes | None:
            raise OSError("connection table full")

        monkeypatch.setattr(node.crl_source, "fetch", broken_fetch)
        assert await node.refresh_crl() is False
        assert node.core.next_crl_poll is not None  # the next poll is scheduled
