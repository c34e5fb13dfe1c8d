"""Link admission (issue 17, formation): a peer at its link cap answers HELLO, then
refuses with CLOSE link-cap. That HELLO must not reset the dialler's backoff, or every
refusal in a row waits the same second and a full mesh livelocks on refused dials."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trustmesh.mesh.link import CloseCode, LinkClosed
from trustmesh.node.config import load_config, write_config
from trustmesh.node.local import LocalMesh

WAIT = 15.0
SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}


async def test_each_refusal_at_the_cap_in_a_row_waits_longer(tmp_path: Path) -> None:
    mesh = LocalMesh(tmp_path, 3, node_settings=dict(SETTINGS))
    await mesh.start_ca()
    try:
        full = await mesh.start_node(await mesh.enroll(1, max_links=1))
        await mesh.start_node(await mesh.enroll(2))  # bootstraps to node-1: its one link
        await mesh.wait_for(lambda: "node-2" in full.links, WAIT, what="node-1's one link")
        directory = await mesh.enroll(3)
        # No bootstrap: the test dials node-1 itself, refusal after refusal.
        write_config(directory, dataclasses.replace(load_config(directory), bootstrap=()))
        newcomer = await mesh.start_node(directory)
        address = full.listen_address
        for refusals in (1, 2, 3):
            link = await newcomer.dial(address)  # both HELLOs, then node-1's refusal
            closed = await link.wait_closed()
            assert isinstance(closed, LinkClosed)
            assert closed.code == CloseCode.LINK_CAP
            cooldown = newcomer.core.cooldown_of(address)
            assert cooldown is not None
            assert cooldown[1] == refusals  # 1 s, 2 s, 4 s ...: not 1 s each time
        assert set(full.links) == {"node-2"}  # the cap held throughout
    finally:
        for node in mesh.nodes:
            await node.stop()
        if mesh.ca_server is not None:
            await mesh.ca_server.stop()
