"""``trustmesh node wait``'s loop: every condition at once, retries while the node is not
up, gives up with what was missing. (tests/docs runs it against real nodes.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from trustmesh.node.client import NodeApiError, NodeClient
from trustmesh.node.wait import ANOMALIES, HEALTH, PEERS, WaitTimeout, conditions, wait_for


class ScriptedNode:
    """A NodeClient whose answers per route come from a script, one per poll; the last
    one is repeated. An exception in the script is raised instead."""

    def __init__(self, script: dict[str, list[Any]]) -> None:
        self.script = {path: iter(answers) for path, answers in script.items()}
        self.last: dict[str, Any] = {}
        self.calls: list[str] = []
        self.queries: list[dict[str, str]] = []

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        self.calls.append(path)
        self.queries.append(params)
        answer = next(self.script[path], self.last.get(path))
        self.last[path] = answer
        if isinstance(answer, Exception):
            raise answer
        return cast(dict[str, Any], answer)


def run(node: ScriptedNode, timeout: float = 5.0, **wanted: Any) -> dict[str, Any]:
    found = conditions(
        links=wanted.get("links"),
        healthy=wanted.get("healthy", False),
        anomalies=wanted.get("anomalies", ()),
        gone=wanted.get("gone", ()),
    )
    client = cast(NodeClient, node)
    return asyncio.run(wait_for(client, found, within=timeout, poll_interval=0))


def health(links: int, status: str = "ok") -> dict[str, Any]:
    return {"node_id": "node-1", "status": status, "reasons": [], "links": links}


def test_waits_through_a_node_that_is_not_up_yet_then_for_links() -> None:
    down = NodeApiError("node-1 is not running")  # status 0: cannot reach
    node = ScriptedNode({HEALTH: [down, down, health(0), health(1), health(2)]})
    assert run(node, links=2)["links"] == 2
    assert node.calls == [HEALTH] * 5


def test_every_condition_must_hold_in_the_same_poll() -> None:
    node = ScriptedNode(
        {
            HEALTH: [health(1, "degraded"), health(1), health(1)],
            ANOMALIES: [{"anomalies": []}, {"anomalies": [{"hash": "ab"}]}],
            PEERS: [{"peers": [{"node_id": "node-3"}]}, {"peers": [{"node_id": "node-3"}]}, {}],
        }
    )
    answer = run(node, links=1, healthy=True, anomalies=["ab"], gone=["node-3"])
    assert answer["status"] == "ok"
    assert node.calls.count(PEERS) == 3  # node-3 left at the third look
    assert node.calls.count(HEALTH) == 3  # one health read per poll, for all its conditions


def test_an_anomaly_is_asked_for_by_its_hash() -> None:
    """The node looks the anomaly up (``hash=``): it reads no other indicator, and one
    older than its newest 10,000 is still found."""
    digest = "ab" * 8
    node = ScriptedNode({HEALTH: [health(1)], ANOMALIES: [{"anomalies": [{"hash": digest}]}]})
    run(node, anomalies=[digest])
    asked = [q for path, q in zip(node.calls, node.queries, strict=True) if path == ANOMALIES]
    assert asked == [{"hash": digest, "limit": "10000"}]  # an older node ignores hash


def test_a_timeout_says_what_is_missing() -> None:
    node = ScriptedNode({HEALTH: [health(1)], PEERS: [{"peers": [{"node_id": "node-3"}]}]})
    with pytest.raises(WaitTimeout, match=r"timed out after 0 s waiting for node-3 gone") as err:
        run(node, timeout=0, links=1, gone=["node-3"])
    assert "link" not in str(err.value)  # the link condition held
    with pytest.raises(WaitTimeout, match=r"the node to answer \(node-1 is not running\)"):
        run(ScriptedNode({HEALTH: [NodeApiError("node-1 is not running")]}), timeout=0)


def test_a_refusal_is_not_waited_on() -> None:
    refused = NodeApiError("forbidden", status=403, code="forbidden")
    node = ScriptedNode({HEALTH: [refused]})
    with pytest.raises(NodeApiError, match="forbidden"):
        run(node, timeout=30)
    assert node.calls == [HEALTH]


class HangingNode:
    """A node that accepts the request and never answers."""

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_node_that_never_answers_costs_the_timeout_no_more() -> None:
    # Each request gets what is left of the wait (it used to get up to 10 s of its own).
    client = cast(NodeClient, HangingNode())

    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(WaitTimeout, match="it did not, in time"):
            await wait_for(
                client, conditions(links=1, healthy=False, anomalies=(), gone=()), within=0.3
            )
        return loop.time() - start

    assert asyncio.run(main()) < 2.0


def test_an_anomaly_hash_that_cannot_match_is_a_usage_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from trustmesh.cli import main as cli_main

    for bad in ("XYZ", "abc", "0" * 15, "0" * 17, "0" * 130):
        result = CliRunner().invoke(
            cli_main.cli, ["node", "wait", "--dir", str(tmp_path), "--anomaly", bad]
        )
        assert result.exit_code == 2 and "--anomaly" in result.output, (bad, result.output)
