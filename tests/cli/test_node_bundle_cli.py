"""``trustmesh node bundle send|inbox|ack`` as a user runs them: against a running node's
API, and on a stopped node's own store (a bundle sent then leaves when the node runs)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from clitools import clean_env, trustmesh_executable

from trustmesh.node.local import LocalMesh

SETTINGS = {"digest_interval": 0.2, "crl_interval": 3600.0}
WAIT = 20.0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [trustmesh_executable(), "node", "bundle", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread: the nodes it talks to run on this test's event loop."""
    return await asyncio.to_thread(cli, *args)


async def test_send_inbox_ack_through_running_nodes_and_offline(tmp_path: Path) -> None:
    async with LocalMesh(tmp_path, 2, node_settings=dict(SETTINGS)) as mesh:
        await mesh.wait_for(mesh.connected, WAIT, what="a connected mesh")
        n1, n2 = mesh.nodes
        sent = await run(
            "send",
            "--dir",
            str(n1.directory),
            "--to",
            "node-2",
            "--ttl",
            "10m",
            "--data",
            "hello",
            "--json",
        )
        assert sent.returncode == 0, sent.stderr
        answer = json.loads(sent.stdout)
        assert set(answer) == {"bundle_id", "expires_at"}
        bundle_id = answer["bundle_id"]
        await mesh.wait_for(
            lambda: n2.bundle_store.get(bundle_id, "inbox") is not None, WAIT, what="delivery"
        )
        inbox = await run("inbox", "--dir", str(n2.directory), "--json")
        (item,) = json.loads(inbox.stdout)["bundles"]
        assert item["bundle_id"] == bundle_id and item["payload"] == "aGVsbG8="
        human = await run("inbox", "--dir", str(n2.directory))
        header, row = human.stdout.splitlines()
        assert header.split() == ["BUNDLE_ID", "SOURCE", "DESTINATION", "EXPIRES_AT", "BYTES"]
        assert row.split()[:2] == [bundle_id, "node-1"] and row.split()[-1] == "5"
        acked = await run("ack", "--dir", str(n2.directory), bundle_id)
        assert acked.returncode == 0 and "acknowledged" in acked.stdout
        again = await run("ack", "--dir", str(n2.directory), bundle_id)
        assert again.returncode != 0 and "404" in again.stderr

        # node-1 stopped: its CLI signs and stores the bundle itself; it goes on start.
        directory = n1.directory
        await n1.quiesce()
        await n1.stop()
        mesh.nodes.remove(n1)
        payload = tmp_path / "payload.bin"
        payload.write_bytes(bytes(range(256)))
        offline = await run(
            "send",
            "--dir",
            str(directory),
            "--to",
            "node-2",
            "--ttl",
            "600",
            "--file",
            str(payload),
        )
        assert offline.returncode == 0, offline.stderr
        bundle_id = offline.stdout.strip()
        held = await run("inbox", "--dir", str(directory), "--role", "forwarding", "--json")
        assert [b["bundle_id"] for b in json.loads(held.stdout)["bundles"]] == [bundle_id]
        await mesh.start_node(directory)
        await mesh.wait_for(
            lambda: n2.bundle_store.get(bundle_id, "inbox") is not None,
            WAIT,
            what="the offline bundle's delivery",
        )


def test_send_needs_exactly_one_payload_and_a_sane_ttl(tmp_path: Path) -> None:
    tmp_path.joinpath("n").mkdir()
    both = cli(
        "send",
        "--dir",
        str(tmp_path / "n"),
        "--to",
        "x",
        "--ttl",
        "60",
        "--data",
        "a",
        "--file",
        __file__,
    )
    assert both.returncode == 2 and "exactly one of --data and --file" in both.stderr
    ttl = cli("send", "--dir", str(tmp_path / "n"), "--to", "x", "--ttl", "31d", "--data", "a")
    assert ttl.returncode == 2 and "--ttl" in ttl.stderr
