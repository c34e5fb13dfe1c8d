"""``trustmesh demo --dashboard``: the demo's whole mesh on one page, while it runs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request
from typing import Any

import pytest
from clitools import TRUSTMESH, clean_env

from trustmesh.demo.dashboard import MESH_ID, mesh_state


def _state(me: str, nodes: list[tuple[str, str]], links: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "node_id": me,
        "status": "ok",
        "nodes": [{"id": i, "state": s, "address": f"{i}:1"} for i, s in nodes],
        "nodes_left_out": 0,
        "links": [{"source": a, "target": b, "direction": "outbound"} for a, b in links],
    }


def test_the_mesh_state_is_the_union_of_the_nodes_views() -> None:
    one = _state("n1", [("n1", "self"), ("n2", "connected"), ("n4", "known")], [("n1", "n2")])
    two = _state("n2", [("n2", "self"), ("n1", "connected"), ("n3", "connected")], [("n2", "n1")])
    three = _state("n3", [("n3", "self"), ("n2", "connected"), ("n4", "revoked")], [("n3", "n2")])
    merged = mesh_state([one, two, three])
    assert merged["node_id"] == MESH_ID
    states = {n["id"]: n["state"] for n in merged["nodes"]}
    # n3 runs (its own state says so); n4 is revoked in one view: revoked.
    assert states == {"n1": "self", "n2": "connected", "n3": "connected", "n4": "revoked"}
    pairs = {frozenset((k["source"], k["target"])) for k in merged["links"]}
    assert pairs == {frozenset(("n1", "n2")), frozenset(("n2", "n3"))}  # one line per link
    with pytest.raises(ValueError):
        mesh_state([])


@pytest.mark.timeout(90)
def test_demo_dashboard_serves_every_node_and_link_until_sigterm() -> None:
    process = subprocess.Popen(
        [TRUSTMESH, "demo", "--nodes", "4", "--dashboard", "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:  # the URL comes once the checks are done
            if found := re.search(r"dashboard: (http://127\.0\.0\.1:\d+/dashboard/)", line):
                break
        else:
            pytest.fail(f"no dashboard URL; exit {process.wait()}")
        url = found[1]
        with urllib.request.urlopen(url + "state.json", timeout=10) as answer:
            state = json.load(answer)
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert b"<html" in answer.read().lower()
        states = {n["id"]: n["state"] for n in state["nodes"]}
        # node-4 was revoked by the demo; the other three run, linked to each other.
        assert states == {
            "node-1": "self",
            "node-2": "connected",
            "node-3": "connected",
            "node-4": "revoked",
        }
        assert len(state["links"]) == 3
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    report = json.loads(out)
    assert report["ok"] and report["steps"][-1]["name"] == "clean shutdown"
