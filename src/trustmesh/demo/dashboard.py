"""``trustmesh demo --dashboard``: the demo's whole mesh on one live page.

A node's own dashboard shows the mesh as that node knows it: its links, and the nodes it
has heard of. The demo runs every node in one process, so it can show all of it: the
first node's view, with every other running node's links and facts added. The page is
the node dashboard's own (``trustmesh.node.dashboard``), served on 127.0.0.1 only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from trustmesh.api.errors import json_errors
from trustmesh.io.https import HttpServer, serve_app
from trustmesh.io.limits import ResourcePolicy
from trustmesh.node.dashboard import PREFIX, Dashboard, add_dashboard_routes, node_state
from trustmesh.node.runtime import MeshNode

MESH_ID = "demo mesh"
# What a node says of itself that its peers' views lack or hold older copies of.
_OWN_FACTS = ("address", "serial", "not_after_ms", "renewal_due_ms")


def mesh_state(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from the states of several nodes of a mesh (the first is "self"): the
    union of their nodes and links. A node another state calls "self" is running, so
    "connected"; one that any state calls revoked is revoked."""
    if not states:
        raise ValueError("a mesh state needs at least one node's state")
    merged = dict(states[0])
    nodes = {n["id"]: dict(n) for n in merged["nodes"]}
    links = {frozenset((k["source"], k["target"])): k for k in merged["links"]}
    for state in states[1:]:
        for node in state["nodes"]:
            entry = nodes.setdefault(node["id"], {**node})
            if node["state"] == "self":
                entry.update({k: node[k] for k in _OWN_FACTS if node.get(k) is not None})
                if entry["state"] != "self":
                    entry["state"] = "revoked" if node.get("revoked") else "connected"
            elif node["state"] == "revoked":
                entry["state"] = "revoked"
        for link in state["links"]:
            links.setdefault(frozenset((link["source"], link["target"])), link)
    merged["node_id"] = MESH_ID
    merged["nodes"] = list(nodes.values())
    merged["links"] = list(links.values())
    merged["nodes_left_out"] = 0
    return merged


class MeshDashboard:
    """The page for ``nodes()`` (the running nodes, the first one "self"), on a
    plain-HTTP server on 127.0.0.1."""

    def __init__(self, nodes: Callable[[], Sequence[MeshNode]], *, port: int = 0) -> None:
        self._nodes = nodes
        self.port = port
        self.dashboard = Dashboard(self.state, clock_ms=lambda: time.time_ns() // 1_000_000)
        self._server: HttpServer | None = None

    def state(self) -> dict[str, Any]:
        return mesh_state([node_state(node) for node in self._nodes()])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}/"

    async def start(self) -> str:
        app = web.Application(middlewares=[json_errors({})])
        add_dashboard_routes(app, self.dashboard)
        self._server = await serve_app(
            app,
            "127.0.0.1",
            self.port,
            context=None,
            policy=ResourcePolicy(max_connections=64, max_per_source=64),
            name="demo dashboard",
            shutdown_timeout=1.0,
        )
        self.port = self._server.port
        for node in self._nodes():  # each node's events refresh the page soon
            node.listeners.append(lambda event, fields: self.dashboard.poke())
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
