"""The HTTP listeners under attack: a mesh node's HTTPS API, the CA's HTTPS API, the
BRC-104 server (plain HTTP, as ``trustmesh brc103 serve`` runs it) and the BRC-103
WebSocket endpoint, each served by ``serve_app`` under the small ``support.POLICY``.

As in test_adversarial_streams.py, every test attacks from 127.0.0.1 and checks that the
server stays up, holds no more than the policy allows (counted on its connection
objects and its listener's table), serves an honest client from 127.0.0.2 meanwhile, and
ends each bad connection by its deadline, counted under the limit that ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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
    Conn,
    Honest,
    Watch,
    garbage,
    http_request,
    now,
    read_response,
    trickle,
    ws_frame,
    ws_read,
)
from targets import (
    Brc104Target,
    CaApiTarget,
    HttpTarget,
    NodeApiTarget,
    WebSocketTarget,
)

from trustmesh.brc103.peer import Peer
from trustmesh.brc103.wallet import Wallet
from trustmesh.io.brc103 import monotonic_ms
from trustmesh.io.limits import ResourcePolicy

TARGETS = ["node-api", "ca-api", "brc104", "brc103-ws"]
TLS_TARGETS = ["node-api", "ca-api"]
EARLY = 0.05  # a deadline may fire this much early (timer granularity)
ENDLESS_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"z" * 4000

StartTarget = Callable[..., Awaitable[HttpTarget]]


@pytest.fixture
async def start_target(tmp_path: Path) -> AsyncIterator[StartTarget]:
    """``await start_target(name, **policy_changes)``: a listener, stopped at teardown."""
    started: list[HttpTarget] = []

    async def start(name: str, **changes: Any) -> HttpTarget:
        policy: ResourcePolicy = POLICY.replace(**changes) if changes else POLICY
        target: HttpTarget
        if name == "node-api":
            target = await NodeApiTarget.start(tmp_path, policy)
        elif name == "ca-api":
            target = await CaApiTarget.start(tmp_path, policy)
        elif name == "brc104":
            target = await Brc104Target.start(policy)
        else:
            target = await WebSocketTarget.start(policy)
        started.append(target)
        return target

    yield start
    for target in started:
        async with asyncio.timeout(2 * WAIT):
            await target.stop()


@pytest.fixture(params=TARGETS)
async def target(request: pytest.FixtureRequest, start_target: StartTarget) -> HttpTarget:
    return await start_target(request.param)


def watch(target: HttpTarget) -> Watch:
    return Watch(target.policy, target.held, target.listener)


async def still_up(target: HttpTarget) -> None:
    assert target.listener.is_serving()
    await target.honest()


async def served_once(conn: Conn, target: HttpTarget) -> None:
    """One whole request and its answer on this connection (which stays open)."""
    await conn.send(http_request("GET", target.get_path))
    async with asyncio.timeout(WAIT):
        response = await read_response(conn.reader)
    assert response.headers.get("connection", "").lower() != "close", response


async def response_then_close(conn: Conn, within: float) -> int:
    """The status of the server's answer, then its end of the connection, both within
    ``within`` seconds of the connection's opening."""
    async with asyncio.timeout_at(conn.opened + within):
        response = await read_response(conn.reader)
    await conn.wait_server_close(within)
    return response.status


# --- slow or silent before the first request -------------------------------------------------


async def test_idle_connections_end_at_the_idle_deadline(target: HttpTarget) -> None:
    policy = target.policy
    admitted = policy.max_unauthenticated_per_source
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        await attack.open_idle(admitted + 4)
        await attack.wait_all_closed(policy.idle_timeout + SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    counts = target.counts
    assert counts["idle_timeout"] == admitted, counts
    assert counts["refused.unauthenticated_per_source"] + attack.reset_at_connect >= 4, counts
    waited = sorted(c.closed_after or 0.0 for c in attack.conns)[-admitted:]
    assert min(waited) >= policy.idle_timeout - EARLY
    await still_up(target)


@pytest.mark.parametrize("target", TLS_TARGETS, indirect=True)
async def test_tls_done_then_silence_ends_at_the_handshake_deadline(target: HttpTarget) -> None:
    """TLS completed without a client certificate, then not a byte of HTTP (before the
    fix such a connection was held for about an hour): the first request head is due
    handshake_timeout after the accept."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        await target.open(attack, 4)
        await attack.wait_all_closed(policy.handshake_timeout + SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert target.counts["handshake_timeout"] == 4, target.counts
    await still_up(target)


@pytest.mark.parametrize("target", TLS_TARGETS, indirect=True)
async def test_stalled_tls_ends_at_the_handshake_deadline(target: HttpTarget) -> None:
    """A ClientHello, then silence."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        await attack.first_flight([target.first_flight() for _ in range(4)])
        await attack.wait_all_closed(policy.handshake_timeout + SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert target.counts["handshake_timeout"] == 4
    assert min(c.closed_after or 0.0 for c in attack.conns) >= policy.handshake_timeout - EARLY
    await still_up(target)


async def test_slowloris_first_request_ends_at_the_handshake_deadline(
    target: HttpTarget,
) -> None:
    """A request head trickled a byte every 50 ms (after TLS where there is TLS): the
    first head must be complete within handshake_timeout of the accept."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        conns = await target.open(attack, 3)
        trickles = [asyncio.create_task(trickle(c, ENDLESS_HEAD, 0.05)) for c in conns]
        try:
            await attack.wait_all_closed(policy.handshake_timeout + SLACK)
        finally:
            for task in trickles:
                task.cancel()
            await asyncio.gather(*trickles, return_exceptions=True)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert target.counts["handshake_timeout"] == 3, target.counts
    assert "idle_timeout" not in target.counts
    assert min(c.closed_after or 0.0 for c in attack.conns) >= policy.handshake_timeout - EARLY
    await still_up(target)


async def test_slowloris_on_a_kept_alive_connection_ends_at_the_header_deadline(
    target: HttpTarget,
) -> None:
    """A request answered, then the next head trickled: it must be complete within
    header_timeout of its first byte."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        conns = await target.open(attack, 3)
        for conn in conns:
            await served_once(conn, target)
        started = now()
        trickles = [asyncio.create_task(trickle(c, ENDLESS_HEAD, 0.05)) for c in conns]
        try:
            async with asyncio.timeout(policy.header_timeout + SLACK):
                for conn in conns:
                    await conn.wait_server_close(WAIT)
        finally:
            for task in trickles:
                task.cancel()
            await asyncio.gather(*trickles, return_exceptions=True)
        ended = now() - started
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert target.counts["header_timeout"] == 3, target.counts
    assert ended >= policy.header_timeout - EARLY
    await still_up(target)


# --- request bodies ---------------------------------------------------------------------------


async def test_stalled_body_gets_408(target: HttpTarget) -> None:
    """A head announcing as much as the app takes, a hundred bytes of it, then nothing:
    408 once the body has made no progress for body_timeout."""
    policy = target.policy
    request = http_request("POST", "/upload", body=b"b" * 100, content_length=target.max_body)
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        conns = await target.open(attack, 3)
        for conn in conns:
            await conn.send(request)
        async with asyncio.timeout(policy.body_timeout + SLACK):
            statuses = [(await read_response(c.reader)).status for c in conns]
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert statuses == [408, 408, 408]
    await still_up(target)


async def test_oversized_body_gets_413(target: HttpTarget) -> None:
    """A body announced at a terabyte and streamed as fast as the server reads: 413
    once it passes what the app takes, with no more than that read into memory."""
    policy = target.policy
    request = http_request("POST", "/upload", content_length=10**12)
    chunk = b"b" * 65536
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        conns = await target.open(attack, 2)

        async def stream(conn: Conn) -> None:
            await conn.send(request)
            for _ in range(target.max_body // len(chunk) + 8):
                if not await conn.send(chunk):
                    return

        streams = [asyncio.create_task(stream(c)) for c in conns]
        try:
            async with asyncio.timeout(policy.body_timeout + SLACK):
                statuses = [(await read_response(c.reader)).status for c in conns]
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert statuses == [413, 413]
    await still_up(target)


@pytest.mark.parametrize("target", ["ca-api"], indirect=True)
async def test_refused_body_ends_the_connection(target: HttpTarget) -> None:
    """Once a stalled body got its 408, the connection ends (within SLACK): the client
    said it would send more, and nothing it sends now matters."""
    policy = target.policy
    request = http_request("POST", "/upload", body=b"b" * 100, content_length=target.max_body)
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        conns = await target.open(attack, 2)
        for conn in conns:
            await conn.send(request)
        statuses = await asyncio.gather(
            *(response_then_close(c, policy.body_timeout + SLACK) for c in conns)
        )
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert statuses == [408, 408]


@pytest.mark.parametrize("target", ["ca-api"], indirect=True)
async def test_trickled_body_ends(target: HttpTarget) -> None:
    """A body trickled a byte every 0.2 s (faster than body_timeout, so it always makes
    progress) should not hold its connection for ever: it ends by header_timeout +
    body_timeout after its head (a whole-body deadline, or a minimum rate)."""
    policy = target.policy
    request = http_request("POST", "/upload", content_length=100_000)
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        conns = await target.open(attack, 2)
        for conn in conns:
            await conn.send(request)
        trickles = [asyncio.create_task(trickle(c, b"b" * 100_000, 0.2)) for c in conns]
        try:
            await attack.wait_all_closed(policy.header_timeout + policy.body_timeout + SLACK)
        finally:
            for task in trickles:
                task.cancel()
            await asyncio.gather(*trickles, return_exceptions=True)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)


# --- bad bytes ---------------------------------------------------------------------------------


async def test_garbage_ends_the_connection(target: HttpTarget) -> None:
    """Bytes that are not HTTP (on the socket; inside TLS where there is TLS, too)."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        async for index in honest.rounds():
            chosen = [g for g in garbage(seed=index) if not g.startswith(b"GET")]
            conns = await attack.first_flight(chosen)
            if target.tls:
                inside = await target.open(attack, len(chosen))
                for conn, data in zip(inside, chosen, strict=False):
                    await conn.send(data)
                conns += inside
            await attack.wait_all_closed(policy.handshake_timeout + SLACK, conns)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert "handshake_timeout" not in target.counts  # each was refused on sight
    await still_up(target)


async def test_oversized_head_is_refused(target: HttpTarget) -> None:
    """A 64 KiB header line (aiohttp's limit is 8 KiB): 400, and the connection ends."""
    policy = target.policy
    request = http_request("GET", "/", [("X-Big", "h" * 65536)])
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        async for _ in honest.rounds():
            conns = await target.open(attack, 2)
            for conn in conns:
                await conn.send(request)
            for conn in conns:
                assert await response_then_close(conn, policy.handshake_timeout + SLACK) == 400
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert w.peaks.queued < 64 * 1024
    await still_up(target)


# --- a slow reader ------------------------------------------------------------------------------


async def test_slow_reader_is_dropped_at_the_write_stall_deadline(target: HttpTarget) -> None:
    """A client that asks for much and never reads (node API: pipelined health reports
    under node-2's certificate; CA API: pipelined OpenAPI documents; BRC-104: signed
    2 MiB echoes; WebSocket: 16 KiB BRC-103 echoes after a handshake): dropped once
    writing has stalled for write_stall_timeout, holding at most one response beyond
    max_write_buffer."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        (conn,) = await target.open(attack, 1, authenticated=True, rcvbuf=SMALL_RCVBUF)
        reading = asyncio.create_task(target.slow_reader(conn))
        try:
            _, gone = await target.tracked.of(conn)
            async with asyncio.timeout(policy.write_stall_timeout + 2 * SLACK + 1.0):
                await gone
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
        await honest.wait_served()  # served while the attack runs
    w.check(unsent_slack=target.biggest_response, queued_slack=target.max_body)
    assert target.counts["write_stall_timeout"] == 1, target.counts
    await still_up(target)


# --- floods from one address --------------------------------------------------------------------


async def test_connection_flood(target: HttpTarget) -> None:
    """120 TCP connections at once from one address, sending nothing."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        await attack.flood(120)
        await attack.wait_all_closed(policy.idle_timeout + SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    counts = target.counts
    assert counts["refused.handshake_rate"] > 0, counts
    assert counts["refused.unauthenticated_per_source"] > 0, counts
    assert 0 < counts["idle_timeout"] <= policy.max_unauthenticated_per_source + 4, counts
    assert w.peaks.attacker_unauthenticated == policy.max_unauthenticated_per_source
    await still_up(target)


async def test_handshake_flood(target: HttpTarget) -> None:
    """80 connections at once from one address, each starting a ClientHello (HTTPS) or
    a request head (plain HTTP) that it never finishes."""
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        await attack.flood(80, target.first_flight)
        await attack.wait_all_closed(policy.handshake_timeout + SLACK)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    counts = target.counts
    assert counts["refused.handshake_rate"] > 0, counts
    assert 0 < counts["handshake_timeout"] <= policy.max_unauthenticated_per_source + 4, counts
    await still_up(target)


@pytest.mark.parametrize("target", ["brc104"], indirect=True)
async def test_brc104_handshake_flood_is_rate_limited(target: HttpTarget) -> None:
    """BRC-103 initialRequests POSTed to /.well-known/auth as fast as one address can
    pipeline them: each costs the server curve work, so past the burst they get 429;
    the server keeps few unproven sessions for that address; others are served."""
    assert isinstance(target, Brc104Target)
    peer = Peer(Wallet.generate())
    answers: list[int] = []
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        conns = await target.open(attack, 3)

        async def flood(conn: Conn) -> None:
            for _ in range(60):
                body = peer.initiate(monotonic_ms()).to_bytes()
                await conn.send(
                    http_request(
                        "POST",
                        "/.well-known/auth",
                        [("Content-Type", "application/json")],
                        body,
                    )
                )
                async with asyncio.timeout(WAIT):
                    answers.append((await read_response(conn.reader)).status)

        await asyncio.gather(*(flood(c) for c in conns))
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert answers.count(200) <= 100 + 10  # the burst, and what the rate refilled
    assert answers.count(429) > 0, answers
    config = target.brc.peer.config
    assert len(target.brc.peer.sessions) <= config.max_unproven_sessions_per_source + 8
    await still_up(target)


# --- WebSocket frames ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["brc103-ws"], indirect=True)
@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (ws_frame(b"\x00" * 64, opcode=0x2), 1003),  # binary: not an AuthMessage
        (ws_frame(b"not json at all"), 1007),
        (ws_frame(os.urandom(64), announce=1 << 30), 1009),  # a 1 GiB frame announced
    ],
    ids=["binary", "garbage-text", "oversized"],
)
async def test_websocket_bad_frames_close_the_socket(
    target: HttpTarget, frame: bytes, code: int
) -> None:
    assert isinstance(target, WebSocketTarget)
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        async for _ in honest.rounds():
            (conn,) = await target.open(attack, 1)
            await target.upgrade(conn)
            await conn.send(frame)
            async with asyncio.timeout(SLACK):
                opcode, data = await ws_read(conn.reader)
            assert opcode == 0x8, (opcode, data)
            assert int.from_bytes(data[:2], "big") == code
            await conn.send(ws_frame(data[:2], opcode=0x8))  # the close handshake, answered
            await conn.wait_server_close(WAIT)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    assert w.peaks.queued < 64 * 1024
    await still_up(target)


@pytest.mark.parametrize("target", ["brc103-ws"], indirect=True)
async def test_websocket_handshake_flood_closes_with_1008(target: HttpTarget) -> None:
    """initialRequests on one socket faster than its handshake rate: closed with 1008."""
    assert isinstance(target, WebSocketTarget)
    peer = Peer(Wallet.generate())
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        async for _ in honest.rounds():
            (conn,) = await target.open(attack, 1)
            await target.upgrade(conn)
            for _ in range(40):
                if not await conn.send(ws_frame(peer.initiate(monotonic_ms()).to_bytes())):
                    break
            async with asyncio.timeout(WAIT):
                while True:
                    opcode, data = await ws_read(conn.reader)
                    if opcode == 0x8:
                        break
            assert int.from_bytes(data[:2], "big") == 1008
            await conn.send(ws_frame(data[:2], opcode=0x8))  # the close handshake, answered
            await conn.wait_server_close(WAIT)
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)
    await still_up(target)


@pytest.mark.parametrize("target", ["brc103-ws"], indirect=True)
async def test_websocket_close_ignored_ends_in_time(target: HttpTarget) -> None:
    """A client that sends a bad frame and then ignores the server's close frame: the
    server should not wait for its answer longer than a write stall."""
    assert isinstance(target, WebSocketTarget)
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        (conn,) = await target.open(attack, 1)
        await target.upgrade(conn)
        await conn.send(ws_frame(b"\x00" * 64, opcode=0x2))
        started = now()
        async with asyncio.timeout(policy.write_stall_timeout + SLACK):
            await conn.wait_server_close(WAIT * 3)
        assert now() - started < policy.write_stall_timeout + SLACK
        await honest.wait_served()  # served while the attack runs
    w.check(queued_slack=target.max_body)


@pytest.mark.parametrize("target", ["brc103-ws"], indirect=True)
async def test_websocket_upgraded_then_silent_ends_at_the_handshake_deadline(
    target: HttpTarget,
) -> None:
    """The upgrade, then not a frame: no BRC-103 handshake within handshake_timeout."""
    assert isinstance(target, WebSocketTarget)
    policy = target.policy
    async with watch(target) as w, Honest(target.honest) as honest, Attack(target.port) as attack:
        conns = await target.open(attack, 2)
        for conn in conns:
            await target.upgrade(conn)
        await honest.wait_served()  # served while the attack runs
        await attack.wait_all_closed(policy.handshake_timeout + SLACK)
    w.check(queued_slack=target.max_body)
