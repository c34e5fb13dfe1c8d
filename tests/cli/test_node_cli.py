"""``trustmesh node`` as an operator runs it: a CA served by ``trustmesh ca serve``,
three nodes enrolled with ``node init`` and run with ``node run`` as processes, an
anomaly published with ``node publish`` reaching every node, and a node revoked with
``trustmesh ca revoke`` cut off by the others (issue 6, "Done when").

Every wait is on a JSON line a process prints (catools.WAIT bounds each one).
"""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

from catools import (
    NODE_PASS,
    PASS,
    WAIT,
    Call,
    concurrently,
    one_line_failure,
    serving,
    succeeds,
    trustmesh,
)
from nodetools import NodeRun, running

ANOMALY = {"hash": "9f86d081884c7d65", "kind": "port-scan", "risk": 0.8, "meta": {"rule": "t-1"}}
OTHER = {**ANOMALY, "hash": "aa" * 8}
SPREAD = 10.0  # seconds for gossip and for a revocation (CRL fetched every second)


def _json(stdout: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(stdout)
    return data


def _usage_error(result: subprocess.CompletedProcess[str], option: str) -> None:
    """Exit 2, nothing on stdout, click's usage message naming ``option``, one Error line."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert option in errors[0], errors


def _node_init(
    directory: Path,
    ca_url: str,
    ca_cert: Path,
    token: str,
    node_id: str,
    *extra: str,
    listen: str = "127.0.0.1:0",
) -> Call:
    """The arguments (and passphrase) of a ``node init`` with links and API on port 0 and
    a CRL fetch every second; without --no-encrypt the key is encrypted with NODE_PASS."""
    args: tuple[str | Path, ...] = (
        *("node", "init", "--dir", directory, "--ca-url", ca_url, "--ca-cert", ca_cert),
        *("--token", token, "--node-id", node_id, "--listen", listen),
        *("--api", "127.0.0.1:0", "--crl-interval", "1", "--json", *extra),
    )
    return args, (None if "--no-encrypt" in extra else NODE_PASS)


# node-3's key is encrypted with NODE_PASS; node-1's and node-2's are not.
KEY_PASS = {"node-1": None, "node-2": None, "node-3": NODE_PASS}


def _ask(command: str, node_id: str, directory: Path, *extra: str) -> Call:
    """``trustmesh node COMMAND --dir DIRECTORY EXTRA``, with the node key's passphrase."""
    return ("node", command, "--dir", directory, *extra), KEY_PASS[node_id]


def _connected(peers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {p["node_id"]: p for p in peers["peers"]}
    return {k: v for k, v in rows.items() if v["status"] == "connected"}


def test_mesh_by_hand(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    created = _json(succeeds("ca", "init", "--dir", ca, "--json"))
    assert Path(created["ca_cert"]) == ca / "ca.crt"
    dirs = {f"node-{i}": tmp_path / f"n{i}" for i in (1, 2, 3)}
    with serving(ca) as server:
        made = concurrently(
            *(
                (("ca", "token", "create", "--dir", ca, "--node-id", n, "--json"), PASS)
                for n in dirs
            )
        )
        assert all(r.returncode == 0 for r in made), [r.stderr for r in made]
        tokens = {n: _json(r.stdout)["token"] for n, r in zip(dirs, made, strict=True)}

        def init(node_id: str, *extra: str, listen: str = "127.0.0.1:0") -> Call:
            return _node_init(
                dirs[node_id],
                server.url,
                ca / "ca.crt",
                tokens[node_id],
                node_id,
                *extra,
                listen=listen,
            )

        # A bad --listen is a usage error, and the token is not spent: node-3 uses it later.
        bad, first = concurrently(
            init("node-3", "--no-encrypt", listen="no-port-here"), init("node-1", "--no-encrypt")
        )
        _usage_error(bad, "--listen")
        assert not dirs["node-3"].exists()
        assert first.returncode == 0, first.stderr
        assert _json(first.stdout)["node_id"] == "node-1"

        with running((dirs["node-1"], None)) as (one,):
            seed = one.started()
            assert seed["node_id"] == "node-1"
            assert seed["listen"].startswith("127.0.0.1:")
            assert not seed["listen"].endswith(":0")
            run_file = _json((dirs["node-1"] / "run.json").read_text())
            assert run_file["listen"] == seed["listen"]
            _check_alone(dirs["node-1"])
            # node-2 and node-3 know only node-1; they find each other by peer exchange.
            inits = concurrently(
                init("node-2", "--no-encrypt", "--bootstrap", seed["listen"]),
                init("node-3", "--bootstrap", seed["listen"]),
            )
            assert all(r.returncode == 0 for r in inits), [r.stderr for r in inits]
            for node_id, directory in dirs.items():
                key = directory / "node.key"
                assert stat.S_IMODE(key.stat().st_mode) == 0o600, node_id
                encrypted = b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
                assert encrypted == (node_id == "node-3"), node_id
            with running((dirs["node-2"], None), (dirs["node-3"], NODE_PASS)) as (two, three):
                nodes = {"node-1": one, "node-2": two, "node-3": three}
                assert two.started()["node_id"] == "node-2"
                assert three.started()["node_id"] == "node-3"
                _check_mesh(nodes, dirs)
                _check_revocation(ca, nodes, dirs)
                for node_id, node in nodes.items():
                    _check_stop(node, node_id)
        # The nodes are down: asking one is a one-line failure, not a hang or a traceback.
        down, not_json = concurrently(
            _ask("peers", "node-1", dirs["node-1"], "--json"),
            _ask("publish", "node-1", dirs["node-1"], "--payload-json", "{nope"),
        )
        assert "cannot reach the node's API" in one_line_failure(down)
        _usage_error(not_json, "--payload-json")
        assert server.terminate() == 0, server.errors()


def _check_alone(directory: Path) -> None:
    """A node with no links yet: `node health` says degraded and exits 1 (JSON or not);
    its local socket, through which it answers with no passphrase, is 0600."""
    sock = directory / "api.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    as_json, human = concurrently(
        (("node", "health", "--dir", directory, "--json"), None),
        (("node", "health", "--dir", directory), None),
    )
    assert (as_json.returncode, human.returncode) == (1, 1), (as_json.stderr, human.stderr)
    assert as_json.stderr == human.stderr == ""
    health = _json(as_json.stdout)
    assert (health["status"], health["reasons"]) == ("degraded", ["no_links"])
    lines = [line.split(maxsplit=1) for line in human.stdout.splitlines()]
    assert ["status", "degraded: no link is up"] in lines


def _check_mesh(nodes: dict[str, NodeRun], dirs: dict[str, Path]) -> None:
    """Every node links to both others; node-2's anomaly reaches all three."""
    for node_id, node in nodes.items():
        for peer in nodes.keys() - {node_id}:
            node.event("link.up", peer=peer)
    # The read-only commands need no passphrase, node-3's key encrypted or not.
    health, peers_3, human = concurrently(
        (("node", "health", "--dir", dirs["node-3"], "--json"), None),
        (("node", "peers", "--dir", dirs["node-3"], "--json"), None),
        (("node", "health", "--dir", dirs["node-3"]), None),
    )
    assert health.returncode == 0, health.stderr
    assert (_json(health.stdout)["status"], _json(health.stdout)["reasons"]) == ("ok", [])
    assert peers_3.returncode == 0, peers_3.stderr
    assert sorted(_connected(_json(peers_3.stdout))) == ["node-1", "node-2"]
    assert human.returncode == 0, human.stderr
    assert ["status", "ok"] in [line.split() for line in human.stdout.splitlines()]
    # What an operator sees (node-1; the link.up lines above show the others' side).
    peers = _json(succeeds("node", "peers", "--dir", dirs["node-1"], "--json", passphrase=None))
    assert peers["node_id"] == "node-1"
    connected = _connected(peers)
    assert sorted(connected) == ["node-2", "node-3"], peers
    for row in connected.values():
        assert {"node_id", "status", "last_seen"} <= set(row)
        assert row["last_seen"]
    # A payload the mesh refuses is refused before it is sent (exit 1, one line).
    payload = json.dumps(ANOMALY)
    risky = json.dumps({**ANOMALY, "risk": 5})
    published, too_risky = concurrently(
        _ask(
            "publish",
            "node-2",
            dirs["node-2"],
            "--type",
            "anomaly",
            "--payload-json",
            payload,
            "--json",
        ),
        _ask("publish", "node-1", dirs["node-1"], "--payload-json", risky, "--json"),
    )
    assert "risk" in one_line_failure(too_risky)
    assert published.returncode == 0, published.stderr
    accepted = _json(published.stdout)
    assert accepted["status"] == "accepted", accepted
    message_id = accepted["message_id"]
    assert re.fullmatch("[0-9a-f]{64}", message_id)  # derived from origin and content
    for node in nodes.values():
        line = node.event("gossip.anomaly", SPREAD, message_id=message_id)
        assert line["origin"] == "node-2"
    listed = concurrently(*(_ask("anomalies", n, d, "--json") for n, d in dirs.items()))
    for node_id, answer in zip(dirs, listed, strict=True):
        assert answer.returncode == 0, answer.stderr
        anomalies = _json(answer.stdout)["anomalies"]
        assert len(anomalies) == 1, (node_id, anomalies)  # once, and not the risky one
        (found,) = anomalies
        assert found["message_id"] == message_id
        assert found["origin"] == "node-2"
        assert {k: found[k] for k in ANOMALY} == ANOMALY


def _check_revocation(ca: Path, nodes: dict[str, NodeRun], dirs: dict[str, Path]) -> None:
    """``ca revoke`` node-3: the others drop it, and its own node refuses its certificate."""
    revoked = _json(succeeds("ca", "revoke", "--dir", ca, "--node-id", "node-3", "--json"))
    assert len(revoked["revoked"]) == 1
    for node_id in ("node-1", "node-2"):
        nodes[node_id].event("peer.revoked", SPREAD, peer="node-3")
    # node-3 learns it from its own CRL fetch (the others cut it off before passing it on).
    assert nodes["node-3"].stderr.wait_for(
        lambda line: line.get("event") == "crl.updated" and line.get("revoked") == 1,
        "node-3's CRL listing its revocation",
        SPREAD,
    )
    nodes["node-3"].event("node.revoked", SPREAD)  # it says so once, and dials no more
    peers, own, failing = concurrently(
        _ask("peers", "node-1", dirs["node-1"], "--json"),
        _ask("publish", "node-3", dirs["node-3"], "--payload-json", json.dumps(OTHER)),
        (("node", "health", "--dir", dirs["node-3"], "--json"), None),
    )
    # Its own API refuses its revoked certificate; the local socket answers all the same.
    assert failing.returncode == 1, failing.stderr
    health = _json(failing.stdout)
    assert health["status"] == "failing"
    assert health["reasons"][0] == "revoked"
    assert peers.returncode == 0, peers.stderr
    rows = _json(peers.stdout)["peers"]
    assert [(p["node_id"], p["status"]) for p in rows] == [("node-2", "connected")]
    line = one_line_failure(own)
    assert "403" in line and "revoked" in line, line


def _check_stop(node: NodeRun, node_id: str) -> None:
    """SIGTERM: exit 0, {"event": "stopped"} last on stdout, run.json gone, JSON logs."""
    assert (node.directory / "run.json").exists()
    assert node.terminate() == 0, node.stderr.dump()
    events = [line["event"] for line in node.stdout.lines]
    assert events == ["started", "stopped"], node.stdout.dump()
    assert node.stdout.lines[-1]["node_id"] == node_id
    assert not (node.directory / "run.json").exists()
    assert not (node.directory / "api.sock").exists()
    assert node.stdout.other == []
    assert node.stderr.other == [], node.stderr.other  # every log line is JSON
    assert node.stderr.lines[-1]["event"] == "node.stopped"


def test_node_run_without_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = trustmesh("node", "run", "--dir", empty, passphrase=None)
    assert "node.toml" in one_line_failure(result)
    assert list(empty.iterdir()) == []


def test_a_second_run_on_one_directory_names_the_running_node(tmp_path: Path) -> None:
    ca, directory = tmp_path / "ca", tmp_path / "n1"
    succeeds("ca", "init", "--dir", ca)
    with serving(ca) as server:
        token = succeeds("ca", "token", "create", "--dir", ca, "--node-id", "node-1").strip()
        args, passphrase = _node_init(
            directory, server.url, ca / "ca.crt", token, "node-1", "--no-encrypt"
        )
        succeeds(*args, passphrase=passphrase)
        with running((directory, None)) as (first,):
            first.started()
            # It used to fail on the busy bundle store (or a port in use), naming neither.
            second = trustmesh("node", "run", "--dir", directory, passphrase=None)
            assert one_line_failure(second) == (
                f"trustmesh: error: node already running (pid {first.proc.pid}) in {directory}"
            )
            first.proc.kill()  # kill -9: its run.json and its socket stay behind
            first.proc.wait(timeout=WAIT)
        assert (directory / "run.json").exists()
        assert (directory / "api.sock").exists()
        with running((directory, None)) as (again,):
            assert again.started()["node_id"] == "node-1"  # the stale run.json blocked nothing
            again.proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, exit 130
            assert again.proc.wait(timeout=WAIT) == 130
            assert again.stdout.wait_for(lambda line: True, "a line")["event"] == "started"
            again.stdout.wait_ended()
            assert again.stdout.lines[-1]["event"] == "stopped"
