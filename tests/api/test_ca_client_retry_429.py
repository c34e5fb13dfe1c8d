"""The CA client waits out a 429 (Retry-After) and asks again, so nodes behind one
address enroll at the pace the CA allows instead of failing (issue 17: the demo's
enrollments from 127.0.0.1 were throttled into failure)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from trustmesh.api.ca_client import MAX_RETRY_AFTER, CaClient, CaRequestFailed, make_csr
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.crypto.keys import KeyKind, PrivateKey


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def enroll(client: CaClient, token: str, node_id: str) -> dict[str, Any]:
    return client.enroll(
        token, make_csr(PrivateKey.generate(KeyKind.P256), node_id), node_id=node_id
    )


async def test_a_429_is_waited_out_and_the_request_repeated(
    ca_api_factory: Callable[..., Any],
) -> None:
    clock = FakeClock()
    ca = await ca_api_factory(limiter=RateLimiter(1.0, 1, clock=clock))
    client = CaClient(ca.url, ca.directory / "ca.crt", sleep=clock.sleep)
    first = await asyncio.to_thread(enroll, client, ca.token("node-1"), "node-1")
    second = await asyncio.to_thread(enroll, client, ca.token("node-2"), "node-2")
    assert (first["node_id"], second["node_id"]) == ("node-1", "node-2")
    assert clock.slept == [1.0]  # the CA's Retry-After, once


async def test_a_wait_longer_than_the_client_accepts_is_reported(
    ca_api_factory: Callable[..., Any],
) -> None:
    clock = FakeClock()
    rate = 1 / (2 * MAX_RETRY_AFTER)  # a token every minute: Retry-After 60
    ca = await ca_api_factory(limiter=RateLimiter(rate, 1, clock=clock))
    client = CaClient(ca.url, ca.directory / "ca.crt", sleep=clock.sleep)
    await asyncio.to_thread(enroll, client, ca.token("node-1"), "node-1")
    with pytest.raises(CaRequestFailed, match="429") as refused:
        await asyncio.to_thread(enroll, client, ca.token("node-2"), "node-2")
    assert refused.value.retry_after is not None
    assert refused.value.retry_after > MAX_RETRY_AFTER
    assert clock.slept == []
