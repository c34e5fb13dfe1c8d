"""A bundle that pyd3tn (an independent BPv7 implementation) builds is accepted by our
node: handed to its API as raw RFC 9171 bytes, signed there, carried over the mesh, and
delivered; and what our node delivers pyd3tn reads (our signature block aside)."""

from __future__ import annotations

import io
import ssl
import time
from pathlib import Path

import aiohttp
import pyd3tn.bundle7 as b7  # type: ignore[import-untyped]
import pytest

from trustmesh.bundle.bib import find_signature_block
from trustmesh.bundle.codec import decode_bundle
from trustmesh.node.client import NodeClient
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode

WAIT = 20.0


async def post_cbor(node: MeshNode, body: bytes) -> tuple[int, bytes]:
    context: ssl.SSLContext = NodeClient(node.directory)._ssl
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            node.api_url + "/v1/bundles",
            data=io.BytesIO(body),
            headers={"Content-Type": "application/cbor"},
            ssl=context,
            server_hostname=node.node_id,
        ) as response,
    ):
        return response.status, await response.read()


@pytest.mark.parametrize("crc", ["CRC16", "CRC32", "NONE"])
async def test_our_node_accepts_and_delivers_a_pyd3tn_bundle(tmp_path: Path, crc: str) -> None:
    settings = {"digest_interval": 0.2, "crl_interval": 3600.0}
    async with LocalMesh(tmp_path, 2, node_settings=settings) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        n1, n2 = mesh.nodes
        raw = b7.serialize_bundle7(
            "dtn://node-1/app",
            "dtn://node-2/inbox",
            b"made by pyd3tn",
            crc_type_primary=b7.CRCType[crc],
            crc_type_canonical=b7.CRCType[crc],
            creation_timestamp=int(time.time()),
            sequence_number=7,
            lifetime=600,
        )
        status, answer = await post_cbor(n1, raw)
        assert status == 201, answer
        delivered = lambda: n2.bundle_store.count("inbox") == 1  # noqa: E731
        await mesh.wait_for(delivered, WAIT, what="delivery")
        (stored,) = n2.bundle_store.items("inbox")
        # What we deliver, pyd3tn reads, once without our signature block (pyd3tn knows
        # no BPSec block type):
        ours = decode_bundle(stored.data, max_size=1 << 20)
        block = find_signature_block(ours)
        assert block is not None
        theirs = b7.Bundle.parse(ours.without_block(block.number).encode())
        assert bytes(theirs.payload_block.data) == b"made by pyd3tn"
        assert str(theirs.primary_block.source) == "dtn://node-1/app"
        assert stored.bundle_id.endswith(":7")
