"""TLS sessions of mesh links (issue 16 items 6 and 8): a revoked node is refused at the
TLS handshake itself, not only at link start, with the certificate_revoked alert, and both
nodes log why; nodes resume their outgoing links, and a resumption is checked against the
revocation view as a full handshake is."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from trustmesh.demo.mesh import MeshDemo
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


async def test_a_revoked_node_fails_the_tls_handshake_with_certificate_revoked(
    mesh3: LocalMesh,
) -> None:
    assert mesh3.ca is not None
    first, revoked = mesh3.nodes[0], mesh3.nodes[-1]
    serial = revoked.identity.certificate.serial_number
    mesh3.ca.revoke(node_id=revoked.node_id, reason="keyCompromise")
    assert await first.refresh_crl()
    await mesh3.wait_for(
        lambda: revoked.node_id not in first.links, WAIT, what=f"{first.node_id} cutting it off"
    )
    assert first.trust.is_revoked(serial)
    refused_here = events_of(first, "link.tls_failed")
    refused_there = events_of(revoked, "link.tls_failed")
    with pytest.raises(LinkFailed) as failure:
        await revoked.dial(first.listen_address)
    # The TLS alert, not a CLOSE at link start (that would be code "revoked"): remove
    # the handshake check and this is "revoked: ... is revoked" instead.
    assert str(failure.value) == "TLS failed: tls alert certificate revoked"
    assert failure.value.code is None
    await mesh3.wait_for(
        lambda: any("resumed" not in e["reason"] for e in refused_here),
        WAIT,
        what="the refusal logged",
    )
    assert refused_here[-1]["direction"] == "inbound"
    assert refused_here[-1]["reason"] == (
        "TLS failed: certificate verify failed (certificate revoked)"
    )
    # (Its first attempt may have offered a ticket from before: see the next test.)
    assert refused_there and refused_there[-1]["direction"] == "outbound"
    assert refused_there[-1]["reason"] == "TLS failed: tls alert certificate revoked"
    assert revoked.node_id not in first.links


async def test_outgoing_links_resume_and_a_revoked_node_cannot(mesh3: LocalMesh) -> None:
    assert mesh3.ca is not None
    first, revoked = mesh3.nodes[0], mesh3.nodes[-1]
    # Its bootstrap link to node-1 was a full handshake and left a ticket: the next link
    # to the same address resumes (it may then lose the collision with the first).
    link = await revoked.dial(first.listen_address)
    established = link.driver.core.established
    assert established is not None and established.resumed
    mesh3.ca.revoke(node_id=revoked.node_id, reason="keyCompromise")
    assert await first.refresh_crl()
    await mesh3.wait_for(
        lambda: revoked.node_id not in first.links, WAIT, what=f"{first.node_id} cutting it off"
    )
    refused_here = events_of(first, "link.tls_failed")
    # It still holds a ticket from before its revocation: node-1 refuses the resumption,
    # and the dial goes on with a full handshake, refused with the alert.
    with pytest.raises(LinkFailed) as failure:
        await revoked.dial(first.listen_address)
    assert str(failure.value) == "TLS failed: tls alert certificate revoked"
    await mesh3.wait_for(lambda: len(refused_here) >= 2, WAIT, what="both refusals logged")
    assert [e["reason"] for e in refused_here] == [
        "TLS failed: resumed session: certificate verify failed (certificate revoked)",
        "TLS failed: certificate verify failed (certificate revoked)",
    ]
    assert revoked.node_id not in first.links


async def test_the_demo_checks_the_refusal_at_the_tls_handshake(tmp_path: Path) -> None:
    steps = await MeshDemo(tmp_path, 3).run()
    assert [s.name for s in steps if not s.ok] == []
    revocation = next(s for s in steps if s.name == "revocation")
    assert revocation.data["refusal"] == "TLS failed: tls alert certificate revoked"
    assert "certificate_revoked alert" in revocation.detail
