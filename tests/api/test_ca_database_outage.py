"""A CA replica whose PostgreSQL database goes away (issue 23): its requests are
answered ``503 store_unavailable`` with ``Retry-After`` instead of hanging, the event
loop stays free meanwhile, ``/v1/health`` says the database is unavailable, the metrics
and the last CRL are still served, and once the database is back the replica works
again by itself. Each test runs its own PostgreSQL server, which it stops and starts."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from ca_support import RunningCa, make_csr
from pgcluster import PostgresCluster

from trustmesh.api import ca as ca_api_module
from trustmesh.pki import pgstore
from trustmesh.pki.store import SqlCaStore

Factory = Callable[..., Any]
# The longest a request may take while the database is down: the pool's wait for a
# connection (pgstore.POOL_TIMEOUT, 1 s here), with room for a loaded machine.
ANSWER_WITHIN = 15.0
RECOVER_WITHIN = 60.0


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[PostgresCluster]:
    # Shorter waits than a deployment's, for a faster test: the same code paths.
    monkeypatch.setattr(pgstore, "POOL_TIMEOUT", 1.0)
    monkeypatch.setattr(pgstore, "RECONNECT_TIMEOUT", 2.0)
    with PostgresCluster.start() as started:
        yield started


async def enroll(
    session: aiohttp.ClientSession, running: RunningCa, body: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with asyncio.timeout(ANSWER_WITHIN):
        async with session.post(f"{running.url}/v1/enroll", json=body) as response:
            return response.status, json.loads(await response.read()), dict(response.headers)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, dict[str, str]]:
    async with asyncio.timeout(ANSWER_WITHIN):
        async with session.get(url) as response:
            return response.status, await response.read(), dict(response.headers)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in the scrape")


async def test_a_replica_without_its_database_answers_503_and_recovers(
    ca_api_factory: Factory, cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    running: RunningCa = await ca_api_factory(
        db=cluster.create_database("ca"), metrics=("127.0.0.1", 0)
    )
    metrics_server = running.server.metrics_server
    assert metrics_server is not None
    session = running.session()
    plain = running.session()
    csr, _ = make_csr("n-0")
    status, body, _ = await enroll(session, running, {"token": running.token("n-0"), "csr": csr})
    assert status == 200, body
    status, crl_before, _ = await get(session, f"{running.url}/v1/crl")
    assert status == 200
    token = running.token("n-1")
    csr, _ = make_csr("n-1")

    # A store call under way: flagged from the thread that makes it.
    in_store = threading.Event()
    token_of = SqlCaStore.token

    def flagged(self: SqlCaStore, token_hash: str) -> Any:
        in_store.set()
        return token_of(self, token_hash)

    monkeypatch.setattr(SqlCaStore, "token", flagged)
    await asyncio.to_thread(cluster.halt)

    pending = asyncio.create_task(enroll(session, running, {"token": token, "csr": csr}))
    assert await asyncio.to_thread(in_store.wait, ANSWER_WITHIN)
    # The enrollment waits for the database on a worker thread: the loop serves others.
    status, _, _ = await get(session, f"{running.url}/v1/openapi.json")
    assert status == 200
    assert not pending.done(), "the event loop waited for the database"
    status, refused, headers = await pending
    assert (status, refused["error"]) == (503, "store_unavailable"), refused
    assert headers["Retry-After"] == ca_api_module.RETRY_AFTER

    status, raw, headers = await get(session, f"{running.url}/v1/health")
    health = json.loads(raw)
    assert status == 503 and headers["Retry-After"] == ca_api_module.RETRY_AFTER
    assert (health["status"], health["database"], health["store"]) == (
        "unavailable",
        "unavailable",
        "postgresql",
    )
    # The CRL signed last is still valid, and still served; the metrics still answer.
    status, crl_during, _ = await get(session, f"{running.url}/v1/crl")
    assert (status, crl_during) == (200, crl_before)
    status, scrape, _ = await get(plain, metrics_server.url)
    assert status == 200 and metric(scrape.decode(), "trustmesh_ca_database_up") == 0
    # The API's own certificate is due: it keeps the one it has, and tries again later.
    serving = running.server.tls_context
    assert await running.server.renew_certificate() is False
    assert running.server.tls_context is serving

    await asyncio.to_thread(cluster.resume)
    async with asyncio.timeout(RECOVER_WITHIN):
        while True:  # each call waits for the pool, so this loop does not spin
            status, raw, _ = await get(session, f"{running.url}/v1/health")
            if status == 200:
                break
    assert json.loads(raw)["database"] == "ok"
    # The enrollment the outage refused goes through with the same token.
    status, body, _ = await enroll(session, running, {"token": token, "csr": csr})
    assert status == 200, body
    status, scrape, _ = await get(plain, metrics_server.url)
    assert metric(scrape.decode(), "trustmesh_ca_database_up") == 1
    assert await running.server.renew_certificate() is True
    assert running.server.tls_context is not serving


async def test_the_database_restarted_under_load_loses_nothing(
    ca_api_factory: Factory, cluster: PostgresCluster
) -> None:
    """12 clients enroll 4 nodes each, retrying a 503 with the same token and key; the
    database stops after the 10th certificate and starts again after the 6th 503."""
    running: RunningCa = await ca_api_factory(db=cluster.create_database("ca"))
    session = running.session()
    clients, each = 12, 4
    work = [
        [
            (f"n-{c}-{i}", running.token(f"n-{c}-{i}"), make_csr(f"n-{c}-{i}")[0])
            for i in range(each)
        ]
        for c in range(clients)
    ]
    issued: dict[str, dict[str, Any]] = {}
    statuses: list[int] = []
    stop_now, start_again = asyncio.Event(), asyncio.Event()

    async def client(jobs: list[tuple[str, str, str]]) -> None:
        for node_id, token, csr in jobs:
            for _ in range(100):  # bounded: a 503 takes the pool's timeout, not 0 s
                status, body, _ = await enroll(session, running, {"token": token, "csr": csr})
                statuses.append(status)
                if status == 200:
                    issued[node_id] = body
                    if len(issued) >= 10:
                        stop_now.set()
                    break
                assert (status, body["error"]) == (503, "store_unavailable"), body
                if statuses.count(503) >= 6:
                    start_again.set()
            else:
                raise AssertionError(f"{node_id} never enrolled")

    async def outage() -> None:
        await stop_now.wait()
        await asyncio.to_thread(cluster.halt)
        await start_again.wait()
        await asyncio.to_thread(cluster.resume)

    async with asyncio.timeout(120):
        await asyncio.gather(outage(), *(client(jobs) for jobs in work))

    assert set(statuses) == {200, 503} and statuses.count(503) >= 6
    assert len(issued) == clients * each
    stored = {c.node_id: c for c in running.ca.store.all() if c.role == "node"}
    assert set(stored) == set(issued)  # one certificate per node: no token bought two
    for node_id, answer in issued.items():
        assert stored[node_id].serial_hex == answer["serial"]
        assert stored[node_id].pem == answer["certificate"]
    tokens = running.ca.store.tokens()
    assert all(token.used_at is not None for token in tokens.values())
