"""The stream listeners under attack: BOTD (plain TCP), Catalyst (TLS 1.3) and a mesh
node's link listener (TLS 1.3), each under the small ``support.POLICY``.

Every test attacks from 127.0.0.1 and checks three things: the server stays up, what it
holds stays under the policy's caps (table places, unsent bytes, queued bytes, counted
on the server's own objects), and an honest client from 127.0.0.2 is served while the
attack runs. Each bad connection must end by its deadline, and the listener's counters
must name the limit that ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    POLICY,
    SLACK,
    SMALL_RCVBUF,
    WAIT,
    Attack,
    CoreClient,
    Honest,
    Silent,
    Watch,
    garbage,
    oversized_prefix,
    oversized_tls_record,
    trickle,
)
from targets import BotdTarget, CatalystTarget, MeshTarget, StreamTarget

from trustmesh.io.limits import ResourcePolicy
from trustmesh.tls import TlsEstablished, TlsStream

TARGETS = ["botd", "catalyst", "mesh"]
EARLY = 0.05  # a deadline may fire this much early (timer granularity)

StartTarget = Callable[..., Awaitable[StreamTarget]]


@pytest.fixture
async def start_target(tmp_path: Path) -> AsyncIterator[StartTarget]:
    """``await start_target(name, **policy_changes)``: a listener, stopped at teardown."""
    started: list[StreamTarget] = []

    async def start(name: str, **changes: Any) -> StreamTarget:
        policy = POLICY.replace(**changes) if changes else POLICY
        target: StreamTarget
        if name == "botd":
            target = await BotdTarget.start(policy)
        elif name == "catalyst":
            target = await CatalystTarget.start(tmp_path, policy)
        else:
            target = await MeshTarget.start(tmp_path, policy)
        started.append(target)
        return target

    yield start
    for target in started:
        await target.stop()


@pytest.fixture(params=TARGETS)
async def target(request: pytest.FixtureRequest, start_target: StartTarget) -> StreamTarget:
    return await start_target(request.param)


def watch(target: StreamTarget) -> Watch:
    return Watch(target.policy, target.held, target.listener, app_slack=target.app_slack)


async def still_up(target: StreamTarget) -> None:
    """The listener still accepts, and serves an honest client after the attack."""
    assert target.listener.is_serving()
    await target.honest()


# --- slow or silent before authentication ---------------------------------------------------


async def test_idle_connections_end_at_the_idle_deadline(target: StreamTarget) -> None:
    policy = target.policy
    admitted = policy.max_unauthenticated_per_source
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        await attack.open_idle(admitted + 4)
        await attack.wait_all_closed(policy.idle_timeout + SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check()
    counts = target.counts
    assert counts["idle_timeout"] == admitted
    assert counts["refused.unauthenticated_per_source"] == 4  # reset at once
    waited = sorted(c.closed_after or 0.0 for c in attack.conns)[-admitted:]
    assert min(waited) >= policy.idle_timeout - EARLY  # the deadline, not something sooner
    if isinstance(target, MeshTarget):  # operators see the counts in the node's health
        assert target.node.health()["limits"]["links"] == dict(counts)
    await still_up(target)


async def test_first_flight_then_silence_ends_at_the_handshake_deadline(
    target: StreamTarget,
) -> None:
    """A ClientHello (TLS) or a valid Init (BOTD), then nothing: the stalled handshake."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        await attack.first_flight([target.first_flight() for _ in range(4)])
        await attack.wait_all_closed(policy.handshake_timeout + SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check()
    assert target.counts["handshake_timeout"] == 4
    assert min(c.closed_after or 0.0 for c in attack.conns) >= policy.handshake_timeout - EARLY
    await still_up(target)


async def test_trickled_handshake_ends_at_the_handshake_deadline(target: StreamTarget) -> None:
    """Slowloris on a handshake: a byte every 50 ms keeps the idle deadline happy."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        conns = await attack.open(3)
        trickles = [asyncio.create_task(trickle(c, target.first_flight(), 0.05)) for c in conns]
        try:
            await attack.wait_all_closed(policy.handshake_timeout + SLACK)
        finally:
            for task in trickles:
                task.cancel()
            await asyncio.gather(*trickles, return_exceptions=True)
        await honest.wait_served()  # served while the attack runs
    w.check()
    assert target.counts["handshake_timeout"] == 3
    assert "idle_timeout" not in target.counts
    assert min(c.closed_after or 0.0 for c in attack.conns) >= policy.handshake_timeout - EARLY
    await still_up(target)


@pytest.mark.parametrize("target", ["catalyst", "mesh"], indirect=True)
async def test_tls_then_silence_ends_at_the_handshake_deadline(target: StreamTarget) -> None:
    """TLS completes with a valid certificate, then no OPEN / no HELLO: not authenticated."""
    policy = target.policy
    context = target.client_context(honest=False)
    async with watch(target) as w, Honest(target.honest) as honest:
        clients = [
            await CoreClient.open(TlsStream(context, Silent()), target.port) for _ in range(3)
        ]
        try:
            for client in clients:
                await client.until(TlsEstablished)
            for client in clients:
                await client.conn.wait_server_close(policy.handshake_timeout + SLACK)
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
        await honest.wait_served()  # served while the attack runs
    w.check()
    assert target.counts["handshake_timeout"] == 3
    assert min(c.conn.closed_after or 0.0 for c in clients) >= policy.handshake_timeout - EARLY
    await still_up(target)


# --- bad bytes ---------------------------------------------------------------------------------


async def test_garbage_ends_the_connection(target: StreamTarget) -> None:
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        async for index in honest.rounds():
            conns = await attack.first_flight(garbage(seed=index))
            await attack.wait_all_closed(policy.handshake_timeout + SLACK, conns)
        await honest.wait_served()  # served while the attack runs
    w.check()
    await still_up(target)


async def test_oversized_frame_before_authentication(target: StreamTarget) -> None:
    """A length prefix (BOTD) or a TLS record header announcing far more than the limit:
    refused on the header, without waiting for (or buffering) the body."""
    policy = target.policy
    attack_bytes = oversized_tls_record if target.tls else oversized_prefix
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        async for _ in honest.rounds():
            conns = await attack.first_flight([attack_bytes() for _ in range(2)])
            await attack.wait_all_closed(policy.handshake_timeout + SLACK, conns)
        await honest.wait_served()  # served while the attack runs
    w.check()
    assert "handshake_timeout" not in target.counts  # the parser ended them, not a timer
    assert w.peaks.queued == 0
    await still_up(target)


async def test_oversized_frame_after_authentication(target: StreamTarget) -> None:
    """An authenticated peer announces a 1 GiB frame (inside TLS where there is TLS)."""
    async with watch(target) as w, Honest(target.honest) as honest:
        async for _ in honest.rounds():
            client, tap = await target.connect(honest=False)
            async with client:
                await target.inject(client, tap, oversized_prefix(1 << 30))
                await client.until_closed(SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check()
    assert w.peaks.queued < 64 * 1024  # the announced gigabyte was never buffered
    await still_up(target)


# --- a slow reader after authentication ----------------------------------------------------------


@pytest.mark.parametrize("target", ["botd", "mesh"], indirect=True)
async def test_slow_reader_is_dropped(target: StreamTarget) -> None:
    """An authenticated peer that never reads while the server has much to send (BOTD:
    its own messages echoed; mesh: gossip the node publishes). The server drops it once
    its unsent output passes max_write_buffer or stays stalled for write_stall_timeout,
    holding no more than its caps meanwhile (for BOTD, the channel's inbox counts).
    Catalyst is not here: an established session sends only small KEEPALIVEs, and
    answers nothing a peer sends, so a slow reader has nothing to back up."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest:
        client, tap = await target.connect(honest=False, rcvbuf=SMALL_RCVBUF)
        async with client:
            server_side = target.server_side(client)
            provoking = asyncio.create_task(target.provoke(client, tap))
            try:
                async with asyncio.timeout(policy.write_stall_timeout + 2 * SLACK + 1.0):
                    await server_side.wait_closed()
            finally:
                provoking.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await provoking
            async with asyncio.timeout(WAIT):  # and the attacker sees its connection end
                await client.until_closed()
        await honest.wait_served()  # served while the attack runs
    w.check()
    counts = target.counts
    assert counts["max_write_buffer"] + counts["write_stall_timeout"] == 1, counts
    await still_up(target)


# --- floods from one address ----------------------------------------------------------------


async def test_connection_flood(target: StreamTarget) -> None:
    """120 connections at once from one address, sending nothing."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        await attack.flood(120)
        await attack.wait_all_closed(policy.idle_timeout + SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check()
    counts = target.counts
    assert counts["refused.handshake_rate"] > 0, counts
    assert counts["refused.unauthenticated_per_source"] > 0, counts
    assert 0 < counts["idle_timeout"] <= policy.max_unauthenticated_per_source + 4, counts
    assert w.peaks.attacker_unauthenticated == policy.max_unauthenticated_per_source
    await still_up(target)


async def test_handshake_flood(target: StreamTarget) -> None:
    """80 connections at once from one address, each starting a real handshake (a
    ClientHello, a signed BOTD Init) that it never finishes."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        await attack.flood(80, target.first_flight)
        await attack.wait_all_closed(policy.handshake_timeout + SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check()
    counts = target.counts
    assert counts["refused.handshake_rate"] > 0, counts
    assert 0 < counts["handshake_timeout"] <= policy.max_unauthenticated_per_source + 4, counts
    await still_up(target)


async def test_authenticated_flood_is_capped_per_source(start_target: StartTarget) -> None:
    """BOTD lets any key in: peers that authenticate with fresh keys and then hold on
    get max_per_source places from one address, no more, and never crowd out another
    address. (Catalyst and mesh links need a certificate, and keep one session per
    identity: a second one from the same identity is a collision, closed at once.)"""
    target = await start_target("botd", handshake_burst=64)  # the per-source cap, not the rate
    policy: ResourcePolicy = target.policy
    held: list[CoreClient] = []
    try:
        async with watch(target) as w, Honest(target.honest) as honest:
            for _ in range(policy.max_per_source):
                client, _ = await target.connect(honest=False)
                held.append(client)
            async with Attack(target.port) as attack:  # one more: reset at once
                await attack.open(1)
                await attack.wait_all_closed(SLACK)
            await honest.wait_served(2)  # while the attacker holds its places
        w.check()
        assert target.counts["refused.per_source"] == 1
        assert target.listener.table.per_source("127.0.0.1") == policy.max_per_source
        await still_up(target)
    finally:
        await asyncio.gather(*(c.aclose() for c in held))
