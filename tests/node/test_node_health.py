"""``GET /v1/mesh/health``'s ``status`` (issue 21): ``ok``, ``degraded`` (no links, no CRL,
a CRL past its nextUpdate) or ``failing`` (an expired certificate, a revoked node), with
the reasons; a revoked node reports it over its local socket (its own API refuses its
certificate) and logs it once, and the node that refuses it at the TLS handshake logs
why."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from trustmesh.clock import FakeClock
from trustmesh.node.client import NodeApiError, NodeClient
from trustmesh.node.health import REASONS, status_of
from trustmesh.node.links import LinkFailed
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode

WAIT = 15.0
SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}


@pytest.fixture
async def mesh3(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    async with LocalMesh(tmp_path, 3, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        yield mesh


def events_of(node: MeshNode, name: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    node.listeners.append(lambda event, fields: seen.append(fields) if event == name else None)
    return seen


def health_at(node: MeshNode, clock: FakeClock) -> dict[str, Any]:
    """The node's health as it would be at ``clock``'s time (nothing else runs meanwhile)."""
    real = node.clock
    node.clock = clock
    try:
        return node.health()
    finally:
        node.clock = real


def test_the_status_follows_the_worst_reason() -> None:
    assert status_of([]) == "ok"
    assert status_of(["no_links"]) == "degraded"
    assert status_of(["no_links", "crl_stale", "no_crl"]) == "degraded"
    assert status_of(["revoked", "no_links"]) == "failing"
    assert status_of(["certificate_expired"]) == "failing"
    assert set(REASONS) == {"certificate_expired", "revoked", "no_links", "no_crl", "crl_stale"}


async def test_a_connected_node_is_ok(mesh3: LocalMesh) -> None:
    for node in mesh3.nodes:
        health = node.health()
        assert (health["status"], health["reasons"]) == ("ok", []), node.node_id


async def test_a_node_without_links_is_degraded_and_time_makes_it_worse(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 1, node_settings=dict(SETTINGS)) as mesh:
        (alone,) = mesh.nodes
        health = alone.health()
        assert (health["status"], health["reasons"]) == ("degraded", ["no_links"])
        # Over the local socket too, as `node health` asks.
        answer = await NodeClient(alone.directory).get("/v1/mesh/health")
        assert (answer["status"], answer["reasons"]) == ("degraded", ["no_links"])

        next_update = alone.trust.crl_next_update
        not_after = alone.identity.certificate.not_valid_after_utc
        assert next_update is not None
        assert next_update < not_after  # a CRL lasts 24 h, a certificate 72 h
        stale = health_at(alone, FakeClock(next_update + timedelta(minutes=1)))
        assert (stale["status"], stale["reasons"]) == ("degraded", ["no_links", "crl_stale"])
        expired = health_at(alone, FakeClock(not_after + timedelta(seconds=1)))
        assert expired["status"] == "failing"
        assert expired["reasons"] == ["certificate_expired", "no_links", "crl_stale"]

        held, alone.trust.crl_der = alone.trust.crl_der, None  # as if the CA never answered
        try:
            unfetched = alone.health()
        finally:
            alone.trust.crl_der = held
        assert (unfetched["status"], unfetched["reasons"]) == ("degraded", ["no_links", "no_crl"])


async def test_the_revoked_node_reports_failing_and_its_refusal_is_logged(
    mesh3: LocalMesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trustmesh.node")
    assert mesh3.ca is not None
    first, revoked = mesh3.nodes[0], mesh3.nodes[-1]
    told = events_of(revoked, "node.revoked")
    mesh3.ca.revoke(node_id=revoked.node_id, reason="keyCompromise")
    assert await revoked.refresh_crl()  # its own fetch: only the CA's CRL convinces it
    assert await first.refresh_crl()
    await mesh3.wait_for(
        lambda: revoked.node_id not in first.links, WAIT, what=f"{first.node_id} cutting it off"
    )
    assert len(told) == 1
    assert told[0]["serial"] == format(revoked.identity.certificate.serial_number, "x")

    # Its own API refuses its own (revoked) certificate; the local socket still answers.
    with pytest.raises(NodeApiError) as refused:
        await NodeClient(revoked.directory, local=False).get("/v1/mesh/health")
    assert (refused.value.status, refused.value.code) == (403, "revoked")
    health = await NodeClient(revoked.directory).get("/v1/mesh/health")
    assert health["status"] == "failing"
    assert health["reasons"][0] == "revoked"
    assert first.health()["status"] == "ok"  # it still has node-2

    # The refusing side logs the refusal, with the reason.
    refusals = events_of(first, "link.tls_failed")
    with pytest.raises(LinkFailed):
        await revoked.dial(first.listen_address)

    def full_refusal() -> bool:
        return any("resumed" not in e["reason"] for e in refusals)

    await mesh3.wait_for(full_refusal, WAIT, what="the refusal")
    logged = [
        record
        for record in caplog.records
        if record.getMessage() == "link.tls_failed"
        and getattr(record, "node", None) == first.node_id
        and "resumed" not in record.__dict__["fields"]["reason"]
    ]
    assert logged, "the refusing node logged no link.tls_failed"
    fields = logged[-1].__dict__["fields"]
    assert fields["direction"] == "inbound"
    assert fields["reason"] == "TLS failed: certificate verify failed (certificate revoked)"
    assert logged[-1].levelno >= logging.INFO
    # The revoked node said it once, at ERROR, whatever came after.
    said = [
        r
        for r in caplog.records
        if r.getMessage() == "node.revoked" and getattr(r, "node", None) == revoked.node_id
    ]
    assert [r.levelno for r in said] == [logging.ERROR]
