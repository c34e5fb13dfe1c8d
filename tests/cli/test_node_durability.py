"""202 means durable (issue 16 item 13): a real ``trustmesh node run`` takes gossip
through its API under load and is killed with SIGKILL while answers are in flight;
every message it answered 202 is in its store afterwards.

Bounded: at most ``MESSAGES`` posts, ``PARALLEL`` at a time, the whole load within
``catools.WAIT``; the kill comes after the ``KILL_AFTER``-th 202.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from catools import WAIT, serving, succeeds
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from nodetools import NodeRun

from trustmesh.errors import ProtocolError
from trustmesh.keystore.filestore import load_key_file
from trustmesh.mesh.gossip import anomaly_payload, sign_message
from trustmesh.mesh.store import MeshStore
from trustmesh.node.client import NodeClient
from trustmesh.node.runtime import now_ms

MESSAGES = 400
PARALLEL = 16
KILL_AFTER = 120
LIMITS = (
    "\n[limits]\nrequest_rate = 10000.0\nrequest_burst = 10000\n"
    "handshake_rate = 10000.0\nhandshake_burst = 10000\n"
)


def _init_node(ca: Path, ca_url: str, directory: Path) -> None:
    token = json.loads(
        succeeds("ca", "token", "create", "--dir", ca, "--node-id", "node-1", "--json")
    )["token"]
    succeeds(
        *("node", "init", "--dir", directory, "--ca-url", ca_url),
        *("--ca-cert", ca / "ca.crt", "--token", token, "--node-id", "node-1"),
        *("--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--no-encrypt", "--json"),
        passphrase=None,
    )
    with (directory / "node.toml").open("a") as config:
        config.write(LIMITS)  # the load is not meant to meet the API's rate limit


async def _load(directory: Path, run: NodeRun) -> set[str]:
    """Post signed messages, ``PARALLEL`` at a time; SIGKILL the node after the
    ``KILL_AFTER``-th 202 while the others are in flight. The ids answered 202."""
    key = load_key_file(directory / "node.key", None)
    chain = tuple(
        c.public_bytes(serialization.Encoding.DER)
        for c in x509.load_pem_x509_certificates((directory / "node.crt").read_bytes())
    )
    client = NodeClient(directory)
    answered: set[str] = set()
    killed = asyncio.Event()
    gate = asyncio.Semaphore(PARALLEL)

    async def post(n: int) -> None:
        message = sign_message(
            key,
            "node-1",
            anomaly_payload(f"{n:032x}", "load", 0.5),
            now_ms=now_ms(),
            chain=chain,
        )
        async with gate:
            if killed.is_set():
                return
            try:
                answer = await client.post("/v1/mesh/gossip", message.encode())
            except (ProtocolError, OSError):
                return  # refused or cut by the kill: never answered 202
        assert answer["message_id"] == message.message_id
        answered.add(message.message_id)
        if len(answered) == KILL_AFTER and not killed.is_set():
            killed.set()
            run.proc.send_signal(signal.SIGKILL)

    async with asyncio.timeout(WAIT):
        await asyncio.gather(*(post(n) for n in range(MESSAGES)))
    assert killed.is_set(), f"only {len(answered)} answers before the load ended"
    return answered


def test_every_message_answered_202_survives_kill_9(tmp_path: Path) -> None:
    ca, directory = tmp_path / "ca", tmp_path / "n1"
    succeeds("ca", "init", "--dir", ca, "--json")
    with serving(ca) as server:
        _init_node(ca, server.url, directory)
        run = NodeRun(directory)
        try:
            run.started()
            answered = asyncio.run(_load(directory, run))
            assert run.proc.wait(timeout=WAIT) == -signal.SIGKILL
        finally:
            run.close()
        assert server.terminate() == 0, server.errors()
    store = MeshStore(directory / "mesh.db")
    try:
        kept = {i.message_id for i in store.indicators(limit=10_000)}
        seen = {message_id for message_id, _ in store.seen()}
    finally:
        store.close()
    assert len(answered) >= KILL_AFTER
    assert answered - kept == set(), f"{len(answered - kept)} of {len(answered)} lost"
    assert answered <= seen
