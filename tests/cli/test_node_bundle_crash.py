"""kill -9 loses no accepted bundle: a sender killed right after its 201, and a receiver
killed in the middle of taking a stream of bundles. Real `trustmesh node run` processes,
a real CA server, real links."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from catools import PASS, serving, succeeds, trustmesh
from nodetools import NodeRun

from trustmesh.node.client import NodeClient

BUNDLES = 60


def free_port() -> int:
    """A port for node-1, which must come back on the same one after a kill."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def mesh_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """node-1 (fixed link port) and node-2 (bootstrap: node-1), enrolled, not running."""
    ca = tmp_path / "ca"
    succeeds("ca", "init", "--dir", ca)
    port = free_port()
    with serving(ca) as server:
        dirs = []
        for index, listen, extra in (
            (1, f"127.0.0.1:{port}", ()),
            (2, "127.0.0.1:0", ("--bootstrap", f"127.0.0.1:{port}")),
        ):
            node_id, directory = f"node-{index}", tmp_path / f"n{index}"
            token = json.loads(
                succeeds("ca", "token", "create", "--dir", ca, "--node-id", node_id, "--json")
            )["token"]
            succeeds(
                *("node", "init", "--dir", directory, "--ca-url", server.url),
                *("--ca-cert", ca / "ca.crt", "--token", token, "--node-id", node_id),
                *("--listen", listen, "--api", "127.0.0.1:0", "--no-encrypt", *extra),
                passphrase=None,
            )
            dirs.append(directory)
        yield dirs[0], dirs[1]


def post(directory: Path, payload: bytes) -> str:
    body = {"destination": "node-2", "ttl_sec": 600, "payload": base64.b64encode(payload).decode()}
    answer = asyncio.run(NodeClient(directory).post("/v1/bundles", json.dumps(body).encode()))
    return str(answer["bundle_id"])


def inbox(directory: Path) -> list[str]:
    """node-2's inbox, read from its store (the node stopped)."""
    result = trustmesh("node", "bundle", "inbox", "--dir", directory, "--json", passphrase=PASS)
    assert result.returncode == 0, result.stderr
    return [b["bundle_id"] for b in json.loads(result.stdout)["bundles"]]


def test_a_sender_killed_right_after_its_201_still_delivers(
    mesh_dirs: tuple[Path, Path],
) -> None:
    n1, n2 = mesh_dirs
    first = NodeRun(n1)
    try:
        first.started()
        bundle_id = post(n1, b"accepted, then the power went")
        first.proc.kill()  # -9: no shutdown, no flush
        first.proc.wait(timeout=15)
    finally:
        first.close()
    sender, receiver = NodeRun(n1), NodeRun(n2)
    try:
        sender.started()
        receiver.started()
        receiver.event("bundle.delivered", bundle_id=bundle_id)
        assert receiver.terminate() == 0
        assert inbox(n2) == [bundle_id]
    finally:
        sender.close()
        receiver.close()


def test_a_receiver_killed_while_taking_bundles_loses_none(
    mesh_dirs: tuple[Path, Path],
) -> None:
    n1, n2 = mesh_dirs
    sender = NodeRun(n1)
    try:
        sender.started()
        sent = {post(n1, f"bundle {i}".encode() * 20) for i in range(BUNDLES)}
        receiver = NodeRun(n2)
        try:
            receiver.started()
            receiver.event("bundle.delivered")  # the stream has begun: kill it now
            receiver.proc.kill()
            receiver.proc.wait(timeout=15)
        finally:
            receiver.close()
        again = NodeRun(n2)
        try:
            again.started()
            # Custody: node-1 lets a bundle go only once node-2 committed it.
            for bundle_id in sent:
                sender.event("bundle.forwarded", bundle_id=bundle_id, released=True)
            assert again.terminate() == 0
        finally:
            again.close()
        held = sorted(inbox(n2))
        assert held == sorted(sent)  # every one, once
    finally:
        sender.close()
