"""The resource policy: the connection table's admission and eviction rules, the
listener's refusals, and the descriptor limit (no spin, honest clients still served)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustmesh.io.limits import (
    LIMIT_FIELDS,
    LIMIT_HELP,
    Admission,
    ConnectionTable,
    LimitStats,
    ResourcePolicy,
    policy_from,
    source_of,
)
from trustmesh.io.listener import Listener

WAIT = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(clock: FakeClock | None = None, **limits: float) -> ConnectionTable:
    clock = clock or FakeClock()
    policy = ResourcePolicy().replace(handshake_rate=1e6, handshake_burst=10_000, **limits)
    return ConnectionTable(policy, LimitStats("test", clock), clock)


def admit(t: ConnectionTable, source: str) -> Admission:
    admission = t.admit(source)
    assert admission is not None, f"{source} refused"
    evicted: list[str] = []
    admission.evict = evicted.append
    return admission


def test_sources_count_per_address_and_per_ipv6_64() -> None:
    assert source_of(("127.0.0.2", 4000)) == "127.0.0.2"
    assert source_of(("2001:db8:1:2:aaaa::1", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of(("2001:db8:1:2:bbbb::9", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of(("::ffff:10.0.0.1", 1, 0, 0)) == "10.0.0.1"
    assert source_of("/run/sock") == "/run/sock"


def test_a_source_over_its_cap_is_refused_and_others_are_not() -> None:
    t = table(max_per_source=3, max_unauthenticated_per_source=3)
    held = [admit(t, "10.0.0.1") for _ in range(3)]
    assert t.admit("10.0.0.1") is None
    assert t.stats.counts["refused.per_source"] == 1
    assert t.admit("10.0.0.2") is not None
    held[0].release()
    assert t.admit("10.0.0.1") is not None


def test_unauthenticated_connections_are_bounded_per_source() -> None:
    t = table(max_unauthenticated_per_source=2)
    first, second = admit(t, "10.0.0.1"), admit(t, "10.0.0.1")
    assert t.admit("10.0.0.1") is None
    first.authenticated(0.0)  # a proven peer no longer counts against the bound
    assert t.admit("10.0.0.1") is not None
    assert not second.is_authenticated


def test_a_full_table_evicts_the_busiest_sources_oldest_newcomer_never_an_authenticated_one() -> (
    None
):
    t = table(
        max_unauthenticated=4, max_unauthenticated_per_source=3, max_connections=6, max_per_source=6
    )
    proven = admit(t, "10.0.0.9")
    proven.authenticated(0.0)
    flood = [admit(t, "10.0.0.1") for _ in range(3)]
    other = admit(t, "10.0.0.2")
    evicted: list[str] = []
    flood[0].evict = evicted.append
    newcomer = t.admit("10.0.0.3")  # the unauthenticated table is full: someone goes
    assert newcomer is not None
    assert len(evicted) == 1 and flood[0].released  # the flood's oldest
    assert not other.released and not proven.released
    assert t.stats.counts["evicted.unauthenticated"] == 1
    # Again an unauthenticated connection makes room (the flood's next), never the proven one.
    assert t.admit("10.0.0.4") is not None
    assert t.total == 5 and not proven.released and flood[1].released


def test_a_table_of_authenticated_connections_refuses_newcomers() -> None:
    t = table(max_connections=2, max_per_source=2)
    for _ in range(2):
        admit(t, "10.0.0.1").authenticated(0.0)
    assert t.admit("10.0.0.2") is None
    assert t.stats.counts["refused.connections"] == 1


def test_handshake_rate_per_source_on_a_fake_clock() -> None:
    clock = FakeClock()
    policy = ResourcePolicy(handshake_rate=2.0, handshake_burst=3)
    t = ConnectionTable(policy, LimitStats("test", clock), clock)
    for _ in range(3):
        admit(t, "10.0.0.1").release()
    assert t.admit("10.0.0.1") is None
    assert t.admit("10.0.0.2") is not None  # another address has its own bucket
    clock.now += 0.5  # one token back at 2 per second
    assert t.admit("10.0.0.1") is not None
    assert t.admit("10.0.0.1") is None
    assert t.stats.counts["refused.handshake_rate"] == 2


def test_release_is_idempotent_and_counts_stay_exact() -> None:
    t = table()
    a = admit(t, "10.0.0.1")
    a.release()
    a.release()
    assert (t.total, t.unauthenticated, t.per_source("10.0.0.1")) == (0, 0, 0)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def limit_log() -> Iterator[ListHandler]:
    """The limits logger's records (directly: other tests may change the tree's levels)."""
    handler = ListHandler()
    logger = logging.getLogger("trustmesh.io.limits")
    level = logger.level
    logger.setLevel(logging.WARNING)  # whatever an earlier test set on "trustmesh"
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_limit_logs_are_rate_limited_per_source(limit_log: ListHandler) -> None:
    clock = FakeClock()
    stats = LimitStats("test", clock)
    for _ in range(100):
        stats.hit("refused.per_source", "10.0.0.1")
    stats.hit("refused.per_source", "10.0.0.2")
    assert stats.counts["refused.per_source"] == 101
    assert len(limit_log.records) == 2
    clock.now += 61
    stats.hit("refused.per_source", "10.0.0.1")
    assert len(limit_log.records) == 3


def test_policy_overrides_are_checked_by_name_and_type() -> None:
    assert policy_from({"max_connections": 10.0, "max_per_source": 5}).max_connections == 10
    with pytest.raises(ValueError, match="unknown limit"):
        policy_from({"max_conections": 1})
    with pytest.raises(TypeError, match="whole number"):
        policy_from({"max_connections": 1.5})
    with pytest.raises(TypeError, match="number"):
        policy_from({"idle_timeout": "5"})
    with pytest.raises(ValueError, match="positive"):
        policy_from({"idle_timeout": 0})
    with pytest.raises(ValueError, match="at least 5"):
        policy_from({"header_timeout": 1}).check_operator_values()
    assert set(LIMIT_HELP) == set(LIMIT_FIELDS)


def test_docs_list_every_limit_with_its_default_and_flag() -> None:
    text = (Path(__file__).parents[2] / "docs" / "limits.md").read_text()
    defaults = ResourcePolicy()
    for name in LIMIT_FIELDS:
        row = f"| `{name}` | {getattr(defaults, name)} | `--{name.replace('_', '-')}` |"
        assert row in text, f"docs/limits.md lacks {row}"


# --- the listener, on real sockets --------------------------------------------------------


async def read_one_byte(host: str, port: int) -> bytes:
    """Connect and read a byte (a refused connection is reset, maybe before connect
    returns)."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            return await reader.readexactly(1)
        finally:
            writer.close()


class Echo(asyncio.Protocol):
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.admission.evict = lambda _reason: transport.abort()

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.admission.release()


async def test_a_flood_from_one_address_is_reset_while_another_is_served() -> None:
    policy = ResourcePolicy(max_per_source=4, max_unauthenticated_per_source=4)
    accepted: list[Echo] = []
    four = asyncio.Event()

    def factory(admission: Admission) -> Echo:
        accepted.append(Echo(admission))
        if len(accepted) == 4:
            four.set()
        return accepted[-1]

    listener = Listener(factory, policy, name="echo")
    await listener.listen("127.0.0.1", 0)
    flood = []
    try:
        for _ in range(4):
            flood.append(await asyncio.open_connection("127.0.0.1", listener.port))
        async with asyncio.timeout(WAIT):
            await four.wait()
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await read_one_byte("127.0.0.1", listener.port)  # reset at once
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listener.port, local_addr=("127.0.0.2", 0)
        )
        writer.write(b"hello")
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(5) == b"hello"
        writer.close()
        assert listener.stats.counts["refused.per_source"] == 1
    finally:
        for _, w in flood:
            w.close()
        listener.close()
        await listener.wait_closed()


SERVER = textwrap.dedent(
    """
    import asyncio, resource, sys, time
    from trustmesh.io.limits import ResourcePolicy
    from trustmesh.io.listener import Listener

    class Echo(asyncio.Protocol):
        def __init__(self, admission):
            self.admission = admission
        def connection_made(self, transport):
            self.transport = transport
            self.admission.evict = lambda reason: transport.abort()
        def data_received(self, data):
            self.transport.write(data)
        def connection_lost(self, exc):
            self.admission.release()

    async def main():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        policy = ResourcePolicy.for_load(1000)
        listener = Listener(Echo, policy, name="echo")
        await listener.listen("127.0.0.1", 0)
        print(listener.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu = time.process_time()
        print(cpu, dict(listener.stats.counts), flush=True)

    asyncio.run(main())
    """
)


@pytest.fixture
def descriptor_starved_server() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        assert stream is not None
        stream.close()


async def test_at_the_descriptor_limit_the_listener_evicts_and_never_spins(
    descriptor_starved_server: subprocess.Popen[str],
) -> None:
    proc = descriptor_starved_server
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    port = int(await asyncio.to_thread(proc.stdout.readline))
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(120)]
    try:
        # The server has 48 descriptors for 120 idle peers: it evicts the busiest
        # source's oldest unauthenticated ones and the honest client still gets through.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.2", 0)
        )
        writer.write(b"ping")
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(4) == b"ping"
        writer.close()
    finally:
        for _, w in idle:
            w.close()
    proc.stdin.write("\n")
    proc.stdin.flush()
    line = await asyncio.to_thread(proc.stdout.readline)
    cpu, counts = line.split(" ", 1)
    assert float(cpu) < 3.0, f"the server spun: {cpu} s of CPU"
    assert "'descriptors'" in counts, counts
    stderr = proc.stderr
    proc.kill()
    await asyncio.to_thread(proc.wait)
    logged = stderr.read()
    assert logged.count("limit descriptors") <= 2, logged[-2000:]
    assert "out of system resource" not in logged


async def test_listeners_have_a_backlog_sized_for_bursts() -> None:
    """asyncio's default backlog is 100: bursts overflowed it and cost a 1 s SYN retry."""
    listener = Listener(Echo)
    await listener.listen("127.0.0.1", 0)
    try:
        ss = await asyncio.create_subprocess_exec(
            "ss", "-ltnH", f"sport = :{listener.port}", stdout=subprocess.PIPE
        )
        out, _ = await ss.communicate()
    finally:
        listener.close()
        await listener.wait_closed()
    somaxconn = int(await asyncio.to_thread(Path("/proc/sys/net/core/somaxconn").read_text))
    send_q = int(out.split()[2])  # a listening socket's Send-Q is its backlog
    assert send_q == min(1024, somaxconn)
