"""Big CRLs between real nodes (TLS 1.3 links on loopback, the CA over HTTPS): a link
comes up between nodes whose CRL numbers differ whatever the CRL's size, and the CRL
arrives whole and verified; a CRL too big to gossip is pushed over links instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from meshtools import big_crl

from trustmesh.api.ca_client import CaClient
from trustmesh.keystore.filestore import load_key_file
from trustmesh.mesh.link import MAX_FRAME
from trustmesh.mesh.trust import MAX_GOSSIP_CRL
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode, now_ms

WAIT = 30.0
SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}


def issuing_key(mesh: LocalMesh) -> ec.EllipticCurvePrivateKey:
    key = load_key_file(mesh.ca_dir / "issuing.key", mesh.passphrase).to_cryptography()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def mesh_crl(mesh: LocalMesh, count: int) -> tuple[bytes, int]:
    """A CRL of ``count`` serials from the mesh's issuing CA, numbered an hour ahead of
    the CA's own (so newer than any CRL the nodes fetch)."""
    assert mesh.ca is not None
    number = now_ms() + 3_600_000
    der = big_crl(issuing_key(mesh), mesh.ca.issuing_cert.subject, count, number=number)
    return der, number


def events(node: MeshNode, name: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    node.listeners.append(
        lambda event, fields: seen.append(dict(fields)) if event == name else None
    )
    return seen


async def test_a_link_up_carries_a_crl_of_100000_serials_to_a_node_with_an_older_one(
    tmp_path: Path,
) -> None:
    async with LocalMesh(tmp_path, 1, node_settings=dict(SETTINGS)) as mesh:
        first = mesh.nodes[0]
        der, number = mesh_crl(mesh, 100_000)
        assert len(der) > 3 * MAX_FRAME
        assert first.apply_crl(der, source="test") is not None  # as from the CA
        downs = events(first, "link.down")
        # node-2 starts with the CA's CRL, older: node-1 sends its own at link up.
        second = await mesh.start_node(await mesh.enroll(2))
        updates = events(second, "crl.updated")
        await mesh.wait_for(
            lambda: second.trust.crl_number == number, WAIT, what="the CRL at node-2"
        )
        assert second.trust.crl_der == der  # whole, and taken: signature and number checked
        assert len(second.trust.revoked) == 100_000
        assert second.store.crl() == der
        assert [u["source"] for u in updates] == ["link from node-1"]
        # The link that carried it is up on both ends; nothing closed it.
        assert second.node_id in first.links and first.node_id in second.links
        assert first.links[second.node_id].up and second.links[first.node_id].up
        assert downs == []


async def test_a_crl_too_big_to_gossip_is_pushed_over_links_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with LocalMesh(tmp_path, 2, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        first, second = mesh.nodes
        der, number = mesh_crl(mesh, 5_000)  # fits gossip's 512 KiB, but not worth it
        assert MAX_GOSSIP_CRL < len(der) < MAX_FRAME
        monkeypatch.setattr(CaClient, "crl_if_changed", lambda _, etag: (der, "big"))
        updates = events(second, "crl.updated")
        accepted = first.engine.stats.accepted
        assert await first.refresh_crl()
        await mesh.wait_for(lambda: bool(updates), WAIT, what="the CRL at node-2")
        assert first.engine.stats.accepted == accepted  # no crl gossip was published
        assert [u["source"] for u in updates] == ["link from node-1"]
        assert second.trust.crl_number == number and second.trust.crl_der == der
