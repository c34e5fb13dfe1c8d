"""A node's metrics (issue 21): a mesh of three nodes on loopback gossips, then every
node's ``/metrics`` is scraped on its API (mTLS) and on its plain-HTTP metrics port, and
parsed with prometheus-client's own parser."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trustmesh.mesh.errors import BadSignature
from trustmesh.mesh.gossip import anomaly_payload, derive_message_id
from trustmesh.mesh.link import CloseCode, LinkClosed
from trustmesh.mesh.node import handshake_failure
from trustmesh.node.config import ConfigError, NodeConfig
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode
from trustmesh.sansio import ConnectionClosed

WAIT = 15.0
SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0, "metrics": "127.0.0.1:0"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def member_context(node: MeshNode) -> ssl.SSLContext:
    """A client context with ``node``'s own certificate (a mesh member's)."""
    context = ssl.create_default_context(cafile=str(node.directory / "ca.crt"))
    context.load_cert_chain(str(node.directory / "node.crt"), str(node.directory / "node.key"))
    return context


async def get(url: str, **options: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, **options) as response:
        return response.status, await response.text()


async def test_a_gossiping_mesh_is_measured_on_both_ports(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 3, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        published = [
            mesh.nodes[i].publish(anomaly_payload(f"{i:032x}", "port-scan", 0.5)) for i in range(3)
        ]
        ids = [p.message_id for p in published]
        await mesh.wait_for(
            lambda: all(i in n.seen for n in mesh.nodes for i in ids), WAIT, what="coverage"
        )
        # A refused message: node-1's signature over another payload, given to node-2.
        message = published[0].message
        assert message is not None
        payload = anomaly_payload("ff" * 16, "port-scan", 0.9)
        forged = dataclasses.replace(
            message,
            payload=payload,
            message_id=derive_message_id(
                message.origin, payload, message.timestamp, message.expiry
            ),
        )
        with pytest.raises(BadSignature):
            mesh.nodes[1].accept_raw(forged.encode())

        for node in mesh.nodes:
            assert node.metrics_url is not None
            assert node.metrics_url.startswith("http://127.0.0.1:")
            status, plain = await get(node.metrics_url)
            assert status == 200
            status, api = await get(
                node.api_url + "/metrics",
                ssl=member_context(mesh.nodes[0]),
                server_hostname=node.node_id,
            )
            assert status == 200
            for text in (plain, api):
                found = samples(text)
                assert value(found, "trustmesh_node_info", node_id=node.node_id) == 1
                links = value(found, "trustmesh_node_links", state="up")
                assert links == len(node.links) >= 1
                peers = value(found, "trustmesh_node_peers", state="connected")
                assert peers == sum(p.status == "connected" for p in node.peers.values())
                assert value(found, "trustmesh_node_link_handshakes_total") >= links
                accepted = value(found, "trustmesh_node_gossip_accepted_total")
                assert accepted == node.engine.stats.accepted >= 3
                assert value(found, "trustmesh_node_gossip_duplicates_total") >= 0
                assert value(found, "trustmesh_node_gossip_verify_seconds_count") >= 1
                assert value(found, "trustmesh_node_gossip_seen_ids") == len(node.seen) >= 3
                # Fetched from the CA at start: a fresh CRL that revokes nothing.
                assert value(found, "trustmesh_node_crl_revoked_serials") == 0
                assert 0 <= value(found, "trustmesh_node_crl_age_seconds") < 600
                assert value(found, "trustmesh_node_crl_next_update_seconds") > 3600
                assert value(found, "trustmesh_node_certificate_expiry_seconds") > 3600
                assert value(found, "trustmesh_node_certificate_renewal_seconds") > 0
                for role in ("inbox", "forwarding", "fragment"):
                    assert value(found, "trustmesh_node_bundles_stored", role=role) >= 0
                assert value(found, "trustmesh_node_bundles_submitted_total") >= 0
                held = value(
                    found, "trustmesh_node_connections", listener="links", state="authenticated"
                )
                assert held >= 0
            # Both ports read one registry, the listeners of both included.
            found = samples(api)
            for listener in ("links", "api", "metrics"):
                for state in ("authenticated", "unauthenticated"):
                    assert (
                        value(found, "trustmesh_node_connections", listener=listener, state=state)
                        >= 0
                    )

        found = samples((await get(mesh.nodes[1].metrics_url or ""))[1])
        assert value(found, "trustmesh_node_gossip_refused_total", reason="bad-signature") == 1

        # The API's /metrics wants a mesh certificate; the plain port has /metrics alone.
        target = mesh.nodes[0]
        trust = ssl.create_default_context(cafile=str(target.directory / "ca.crt"))
        status, text = await get(
            target.api_url + "/metrics", ssl=trust, server_hostname=target.node_id
        )
        assert status == 401 and '"unauthenticated"' in text
        assert target.metrics_url is not None
        status, text = await get(target.metrics_url.replace("/metrics", "/v1/mesh/peers"))
        assert status == 404 and '"not_found"' in text


def test_handshake_failures_have_few_reasons() -> None:
    closed = ConnectionClosed
    assert handshake_failure(closed("TLS failed: sslv3 alert certificate revoked")) == "tls-revoked"
    assert handshake_failure(closed("TLS failed: x (certificate has expired)")) == "tls-expired"
    assert handshake_failure(closed("TLS failed: tlsv1 alert internal error")) == "tls-alert"
    assert handshake_failure(closed("TLS failed: unexpected eof")) == "tls"
    assert handshake_failure(closed("TLS handshake timed out")) == "timeout"
    assert handshake_failure(closed("peer closed during the TLS handshake")) == "peer-closed"
    refused = LinkClosed("refused: hold_time 1", code=CloseCode.REFUSED)
    assert handshake_failure(refused) == "refused"
    assert handshake_failure(LinkClosed("peer closed the link", by_peer=True)) == "peer-closed"
    # A peer's CLOSE code of its own invention never becomes a label.
    assert handshake_failure(LinkClosed("x" * 64, code="x" * 64, by_peer=True)) == "other"


def test_the_metrics_address_is_checked() -> None:
    def config(**changes: Any) -> NodeConfig:
        return NodeConfig("node-1", "https://ca:8443", "127.0.0.1:0", "127.0.0.1:0", **changes)

    assert 'metrics = "127.0.0.1:9464"' in config(metrics="127.0.0.1:9464").to_toml()
    assert "metrics" not in config().to_toml()
    for bad in ("9464", "127.0.0.1:99999", 9464):
        with pytest.raises(ConfigError, match="metrics"):
            config(metrics=bad)
