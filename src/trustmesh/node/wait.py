"""``trustmesh node wait``: block until a running node reaches a state, for scripts.

Each condition reads one read-only route of the node (its local socket first, see
:mod:`trustmesh.node.client`) and says what it still waits for. A node that is not up
yet is waited for too, so ``node run ... &`` can be followed by ``node wait``.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trustmesh.node.client import NodeApiError, NodeClient

POLL_INTERVAL = 0.2  # seconds between two looks: cheap reads of a local socket
MIN_REQUEST = 0.1  # seconds a last look may take, when the wait has no time left


@dataclass(frozen=True)
class Condition(ABC):
    """One thing to wait for: ``path`` is the route it reads, ``pending`` returns None once
    the answer satisfies it, else what it still waits for (said on timeout)."""

    path: str
    params: dict[str, str]
    description: str

    @abstractmethod
    def pending(self, answer: dict[str, Any]) -> str | None: ...


@dataclass(frozen=True)
class Links(Condition):
    count: int

    def pending(self, answer: dict[str, Any]) -> str | None:
        links = answer.get("links", 0)
        return None if links >= self.count else f"{self.description} ({links} up)"


@dataclass(frozen=True)
class Healthy(Condition):
    def pending(self, answer: dict[str, Any]) -> str | None:
        status = answer.get("status")
        reasons = ", ".join(str(r) for r in answer.get("reasons", []))
        return None if status == "ok" else f"{self.description} (it is {status}: {reasons})"


@dataclass(frozen=True)
class Anomaly(Condition):
    hash: str

    def pending(self, answer: dict[str, Any]) -> str | None:
        hashes = {str(a.get("hash")) for a in answer.get("anomalies", [])}
        return None if self.hash in hashes else self.description


@dataclass(frozen=True)
class Gone(Condition):
    node_id: str

    def pending(self, answer: dict[str, Any]) -> str | None:
        known = {str(p.get("node_id")) for p in answer.get("peers", [])}
        return self.description if self.node_id in known else None


HEALTH, PEERS, ANOMALIES = "/v1/mesh/health", "/v1/mesh/peers", "/v1/mesh/anomalies"


def conditions(
    *, links: int | None, healthy: bool, anomalies: Sequence[str], gone: Sequence[str]
) -> list[Condition]:
    """The conditions of ``node wait``'s options (none: only that the node answers)."""
    found: list[Condition] = [Links(HEALTH, {}, "the node to answer", 0)]
    if links is not None:
        found.append(Links(HEALTH, {}, f"{links} link(s) up", links))
    if healthy:
        found.append(Healthy(HEALTH, {}, "status ok"))
    for digest in anomalies:
        # The node finds it by its hash: no reading of every indicator it holds, and none
        # missed behind the newest 10,000. A node from before ``hash`` ignores it and
        # answers with its newest 10,000, as it always did.
        query = {"hash": digest, "limit": "10000"}
        found.append(Anomaly(ANOMALIES, query, f"anomaly {digest}", digest))
    for node_id in gone:
        found.append(Gone(PEERS, {}, f"{node_id} gone from the peer table", node_id))
    return found


class WaitTimeout(NodeApiError):
    """The node did not reach the state in time (the message says what was missing)."""


async def wait_for(
    client: NodeClient,
    wanted: Sequence[Condition],
    *,
    within: float,
    poll_interval: float = POLL_INTERVAL,
) -> dict[str, Any]:
    """Poll until every condition holds at once; returns the last health answer.

    Raises :class:`WaitTimeout` after ``within`` seconds, naming what was still
    missing (or why the node could not be asked). An API error other than "cannot
    reach" (a refusal) is raised at once: waiting would not change it."""
    deadline = time.monotonic() + within
    missing = ["the node to answer"]
    while True:
        try:
            answers: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, Any]] = {}
            missing = []
            for condition in wanted:
                key = (condition.path, tuple(sorted(condition.params.items())))
                if key not in answers:
                    # No request outlives the wait: a node that hangs costs --timeout, no more.
                    async with asyncio.timeout(max(deadline - time.monotonic(), MIN_REQUEST)):
                        answers[key] = await client.get(condition.path, **condition.params)
                if (pending := condition.pending(answers[key])) is not None:
                    missing.append(pending)
            if not missing:
                return answers.get((HEALTH, ()), {})
        except NodeApiError as exc:
            if exc.status != 0:
                raise
            missing = [f"the node to answer ({exc})"]
        except TimeoutError:
            missing = ["the node to answer (it did not, in time)"]
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {within:g} s waiting for {'; '.join(missing)}")
        await asyncio.sleep(poll_interval)
