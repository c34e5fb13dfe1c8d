"""PKI on PostgreSQL (``python -m bench pki --store postgres``, issue 23): enrollments per
second through 1, 2 and 3 ``trustmesh ca serve`` replicas sharing one PostgreSQL
database, each against ONE ``ca serve`` replica on SQLite, measured in the same run.

- pg_1_replica_per_s, pg_2_replicas_per_s, pg_3_replicas_per_s: POST /v1/enroll spread
  round-robin over the first 1, 2 or 3 replicas of one CA whose records are in
  PostgreSQL (``ca init --db``, its directory copied to each replica after
  ``challenge.secret`` was made, without ``root.key``, as docs/operations.md §8 says).
  Goal: pg_2_replicas_per_s, ratio >= 1.6 "on 2 cores if the cores allow, otherwise explain
  the ceiling" (docs/performance.md).

Anchor: one ``trustmesh ca serve`` process of another CA, on SQLite (its D/ca.db, WAL,
``synchronous=FULL``), started with the same flags. Every server is its own process on
127.0.0.1 with its own port, started the way an operator runs it (``TRUSTMESH_PASSPHRASE``,
``--json``, its JSON access log on stderr, here into a file), with the per-address
limits and the rate limit lifted (every client connects from 127.0.0.1, as in
``bench pki``). All four servers run for the whole run; those a round does not use idle.

PostgreSQL: a throwaway cluster of its own (``initdb`` in a temporary directory, a Unix
socket only; tests/cli/pgcluster.py's), started WITHOUT pgcluster's ``fsync=off``: its
commits are flushed, as SQLite's with ``synchronous=FULL``, so neither side skips the
durability the other pays for. Default settings otherwise (``synchronous_commit=on``).

Clients: as in ``bench pki``, 16 aiohttp sessions in this process, a fresh TLS 1.3
connection per enrollment (``force_close``), each request with its own token and a fresh
P-256 key's CSR, all made before any server starts (tokens through the Python API on the
same directory or database). A client's k-th request of a round goes to replica
``(client + k) mod n``, as a round-robin load balancer spreads new connections. Every
response is checked (200, the node_id asked for, a PEM certificate) and counted; a round
fails loudly on any miss and is bounded in time. After the run each store must hold
exactly the node certificates the clients received (the same PEM, one per node) and every
token used must be spent.

Rounds: each round measures the SQLite anchor first, then the three PostgreSQL set-ups
(in the order 1, 2, 3 and 3, 2, 1 in alternate rounds); each ratio is the median of the
per-round ratios of that set-up to the anchor round before it.

CPU: around every measured round the bench reads the CPU time of this process (the
clients), of the ``ca serve`` processes, of the PostgreSQL server's processes (from
/proc) and of the whole machine (/proc/stat), and reports, per set-up, the milliseconds
of CPU each spent per enrollment and how many of the machine's cores were busy: what
explains the ceiling on a small machine (``info()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import aiohttp

from bench.harness import Comparison, Result
from bench.pki import (
    GENEROUS_LIMIT,
    LOAD_POLICY,
    PASSPHRASE,
    ROUND_TIMEOUT,
    BenchFailure,
    Clients,
    Enrollment,
    enroll_body,
    enroll_request,
    make_csr,
)
from trustmesh.pki.ca import CertificateAuthority, token_hash
from trustmesh.pki.challenge import Challenges

if TYPE_CHECKING:
    from pgcluster import PostgresCluster

CLIENTS = 16
ENROLLMENTS_PER_CLIENT = 16  # a round: CLIENTS x ENROLLMENTS_PER_CLIENT enrollments
ROUNDS = 7
REPLICAS = (1, 2, 3)  # the PostgreSQL set-ups measured, in replicas
QUICK = {"clients": 4, "per_client": 2, "rounds": 1}
SERVE_START_TIMEOUT = 60.0  # seconds for every `ca serve` to print its first line
SERVE_STOP_TIMEOUT = 15.0  # seconds for one to exit after SIGTERM (then SIGKILL)
DATABASE = "bench_ca"
ROOT = Path(__file__).resolve().parent.parent
PGCLUSTER_DIR = ROOT / "tests" / "cli"  # pgcluster.py: the tests' throwaway server
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

_last_info: dict[str, object] | None = None


def last_info() -> dict[str, object] | None:
    """Facts about the last run (None before one): the set-up and where the CPU went."""
    return _last_info


# --- PostgreSQL ----------------------------------------------------------------------------


def _pgcluster() -> ModuleType:
    """tests/cli/pgcluster.py, imported from its place (it is not part of the package)."""
    if str(PGCLUSTER_DIR) not in sys.path:
        sys.path.append(str(PGCLUSTER_DIR))
    import pgcluster

    return pgcluster


def start_postgres() -> PostgresCluster:
    """A throwaway cluster (tests/cli/pgcluster.py) with PostgreSQL's default
    durability: commits are flushed to disk, as SQLite's are (tests turn fsync off)."""
    cluster: PostgresCluster = _pgcluster().PostgresCluster.start(durable=True)
    return cluster


def _server_facts(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn) as connection:
        facts = [
            connection.execute(f"SHOW {name}").fetchone()
            for name in ("server_version", "fsync", "synchronous_commit")
        ]
    version, fsync, sync_commit = (row[0] if row else "?" for row in facts)
    return f"PostgreSQL {version}, fsync {fsync}, synchronous_commit {sync_commit}"


# --- `trustmesh ca serve` processes -------------------------------------------------------


def trustmesh_executable() -> str:
    """The console script of the venv running the bench, else the one on PATH."""
    beside = Path(sys.executable).parent / "trustmesh"
    if beside.exists():
        return str(beside)
    found = shutil.which("trustmesh")
    if found is None:
        raise BenchFailure("the trustmesh console script is not installed")
    return found


def serve_flags() -> list[str]:
    """What every server is started with beyond its directory: the rate limit and the
    per-address connection limits lifted as for ``bench pki``'s in-process CaServer."""
    policy = LOAD_POLICY
    return [
        "--rate",
        str(GENEROUS_LIMIT),
        "--burst",
        str(int(GENEROUS_LIMIT)),
        "--max-connections",
        str(policy.max_connections),
        "--max-per-source",
        str(policy.max_per_source),
        "--max-unauthenticated",
        str(policy.max_unauthenticated),
        "--max-unauthenticated-per-source",
        str(policy.max_unauthenticated_per_source),
        "--handshake-rate",
        str(policy.handshake_rate),
        "--handshake-burst",
        str(policy.handshake_burst),
        "--backlog",
        str(policy.backlog),
    ]


@dataclass
class Replica:
    """A ``trustmesh ca serve --port 0 --json`` process; its first stdout line (JSON)
    names its URL."""

    name: str
    directory: Path
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    url: str = ""

    @classmethod
    def spawn(cls, name: str, directory: Path, db: str | None, logs: Path) -> Replica:
        command = [trustmesh_executable(), "ca", "serve", "--dir", str(directory)]
        command += ["--port", "0", "--json", *serve_flags()]
        if db is not None:
            command += ["--db", db]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTMESH_")}
        env["TRUSTMESH_PASSPHRASE"] = PASSPHRASE.decode()
        stdout, stderr = logs / f"{name}.out", logs / f"{name}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
            )
        return cls(name, directory, process, stdout, stderr)

    def wait_listening(self, deadline: float) -> None:
        """Until the first line says where it listens; BenchFailure if it exits first or
        ``deadline`` (``time.monotonic()``) passes."""
        while True:
            text = self.stdout.read_text()
            if "\n" in text:
                first = json.loads(text.split("\n", 1)[0])
                self.url = str(first["listening"])
                if first.get("warnings"):
                    raise BenchFailure(f"{self.name} warns: {first['warnings']}")
                return
            if self.process.poll() is not None:
                raise BenchFailure(f"{self.name} exited ({self.process.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise BenchFailure(f"{self.name} did not listen in time: {self.tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after SERVE_STOP_TIMEOUT."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(SERVE_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(SERVE_STOP_TIMEOUT)

    def enrollments_served(self) -> int:
        """The 200s its access log (stderr, JSON lines) records on /v1/enroll."""
        served = 0
        for line in self.stderr.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("route") == "/v1/enroll" and entry.get("status") == 200:
                    served += 1
        return served

    def tail(self) -> str:
        return self.stderr.read_text(errors="replace")[-2000:]


# --- CPU accounting -----------------------------------------------------------------------


def _proc_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from its 3rd field (state) on, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _process_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` (its threads included) and of its reaped children."""
    fields = _proc_fields(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime: fields 14 to 17 of proc(5).
    return sum(int(f) for f in fields[11:15]) / CLOCK_TICKS


def _children_cpu(parent: int) -> float:
    """CPU seconds of ``parent``'s live children (a postmaster's backends and workers)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_fields(entry)
            if fields is not None and int(fields[1]) == parent:  # ppid: field 4
                total += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
    return total


def _machine_cpu() -> float:
    """Busy CPU seconds of the whole machine (every core) since boot: all but idle and
    iowait."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass
class CpuUse:
    """CPU seconds spent over some rounds: this process (the clients), the ``ca serve``
    processes, PostgreSQL's processes, the whole machine; the wall time and the
    enrollments done."""

    clients: float = 0.0
    servers: float = 0.0
    postgres: float = 0.0
    machine: float = 0.0
    wall: float = 0.0
    enrollments: int = 0

    def per_enrollment_ms(self) -> dict[str, float]:
        n = self.enrollments or 1
        shares = {
            "clients": self.clients,
            "ca_serve": self.servers,
            "postgres": self.postgres,
            "other": max(0.0, self.machine - self.clients - self.servers - self.postgres),
            "machine": self.machine,
        }
        return {k: round(v / n * 1000, 2) for k, v in shares.items()}

    def cores_busy(self) -> float:
        return round(self.machine / self.wall, 2) if self.wall else 0.0


class CpuMeter:
    """Reads the CPU counters of everything the bench runs, before and after a round."""

    def __init__(self, servers: list[Replica], postmaster: int) -> None:
        self.servers = servers
        self.postmaster = postmaster

    def sample(self) -> tuple[float, ...]:
        mine = os.times()
        return (
            mine.user + mine.system,
            sum(_process_cpu(s.process.pid) for s in self.servers),
            _process_cpu(self.postmaster) + _children_cpu(self.postmaster),
            _machine_cpu(),
            time.monotonic(),
        )

    @staticmethod
    def add(use: CpuUse, before: tuple[float, ...], after: tuple[float, ...], n: int) -> None:
        delta = [a - b for a, b in zip(after, before, strict=True)]
        use.clients += delta[0]
        use.servers += delta[1]
        use.postgres += delta[2]
        use.machine += delta[3]
        use.wall += delta[4]
        use.enrollments += n


# --- the rig ------------------------------------------------------------------------------


@dataclass
class Target:
    """One CA as the clients see it: its servers (round-robin) and its enrollments."""

    name: str
    authority: CertificateAuthority
    replicas: list[Replica]
    clients: Clients | None = None
    enrollments: Iterator[Enrollment] = field(default_factory=lambda: iter(()))
    prepared: list[Enrollment] = field(default_factory=list)  # every one made
    received: dict[str, str] = field(default_factory=dict)  # node_id -> certificate PEM

    def prepare(self, count: int) -> None:
        """``count`` enrollments: tokens in this CA's store, P-256 CSRs."""
        first = len(self.prepared)
        for i in range(first, first + count):
            node_id = f"bench-{self.name}-{i:06d}"
            token = self.authority.create_token(node_id)
            body = enroll_body(token, node_id, make_csr(node_id))
            self.prepared.append(Enrollment(node_id, token, body))
        self.enrollments = iter(self.prepared[first:])

    async def check_health(self, kind: str) -> None:
        """Every server of this CA answers GET /v1/health: ok, its records in ``kind``."""
        assert self.clients is not None
        session = self.clients.sessions[0]
        for replica in self.replicas:
            async with (
                asyncio.timeout(ROUND_TIMEOUT),
                session.get(replica.url + "/v1/health") as resp,
            ):
                status, answer = resp.status, await resp.json()
            if status != 200 or answer.get("store") != kind or answer.get("status") != "ok":
                raise BenchFailure(f"{replica.name}'s /v1/health answered {status}: {answer}")
        self.clients.requests += len(self.replicas)  # each on a connection of its own

    def on_enrolled(self, node_id: str, certificate: str) -> None:
        if node_id in self.received:
            raise BenchFailure(f"{node_id} was enrolled twice")
        self.received[node_id] = certificate

    async def round(self, replicas: int, per_client: int) -> float:
        """Enrollments per second with ``per_client`` from every client, the k-th of
        client i to replica (i + k) mod ``replicas``."""
        assert self.clients is not None
        urls = [r.url + "/v1/enroll" for r in self.replicas[:replicas]]
        requests: list[list[Callable[[aiohttp.ClientSession], Awaitable[None]]]] = []
        for i in range(len(self.clients.sessions)):
            mine = []
            for k in range(per_client):
                enrollment = next(self.enrollments, None)
                if enrollment is None:
                    raise BenchFailure(f"{self.name}: out of prepared enrollments")
                url = urls[(i + k) % replicas]
                mine.append(enroll_request(url, enrollment, self.on_enrolled))
            requests.append(mine)
        return await self.clients.run(requests)

    def check(self) -> None:
        """Every enrollment prepared was answered with a certificate, each on its own
        connection; the store holds exactly those node certificates (the PEM the client
        received, one per node), and each token is spent on its certificate."""
        assert self.clients is not None
        if len(self.received) != len(self.prepared):
            raise BenchFailure(
                f"{self.name}: {len(self.received)} enrolled of {len(self.prepared)} prepared"
            )
        if self.clients.opened != self.clients.requests or self.clients.reused:
            raise BenchFailure(
                f"{self.name}: {self.clients.requests} requests opened"
                f" {self.clients.opened} connections and reused {self.clients.reused}"
            )
        store = self.authority.store
        nodes = {c.node_id: c for c in store.all() if c.role == "node"}
        stored = {node_id: c.pem for node_id, c in nodes.items()}
        if len(nodes) != len(self.received) or stored != self.received:
            raise BenchFailure(
                f"{self.name}: the store's node certificates are not the"
                f" {len(self.received)} the clients received"
            )
        for enrollment in self.prepared:
            token = store.token(token_hash(enrollment.token))
            cert = nodes[enrollment.node_id]
            if token is None or token.used_at is None or token.used_serial != cert.serial:
                raise BenchFailure(f"{self.name}: the token of {enrollment.node_id} is not spent")


class ReplicaRig:
    """A PostgreSQL cluster, a CA on it served by ``max(replicas)`` processes, a CA on
    SQLite served by one, and the clients."""

    def __init__(self, workdir: Path, *, clients: int, replicas: int) -> None:
        self.workdir = workdir
        self.clients_count = clients
        self.replicas_count = replicas
        self.cluster: PostgresCluster | None = None
        self.sqlite: Target | None = None
        self.postgres: Target | None = None
        self.meter: CpuMeter | None = None
        self.postgres_facts = ""
        self.dsn = ""

    def setup(self, sqlite_enrollments: int, postgres_enrollments: int) -> None:
        """Everything before the servers start: the cluster, both CAs, their tokens and
        CSRs, the replicas' directories."""
        self.cluster = start_postgres()
        dsn = self.cluster.create_database(DATABASE)
        self.postgres_facts = _server_facts(dsn)
        sqlite_ca = CertificateAuthority.init(self.workdir / "sqlite" / "ca", PASSPHRASE)
        self.sqlite = Target("sqlite", sqlite_ca, [])
        pg_ca = CertificateAuthority.init(self.workdir / "pg" / "ca", PASSPHRASE, db=dsn)
        self.postgres = Target("pg", pg_ca, [])
        self.sqlite.prepare(sqlite_enrollments)
        self.postgres.prepare(postgres_enrollments)
        Challenges.for_directory(pg_ca.directory)  # what every replica must share
        self.dsn = dsn

    def start(self) -> None:
        """Every server, at once; ready when each has printed where it listens."""
        assert self.sqlite is not None
        assert self.postgres is not None
        assert self.cluster is not None
        logs = self.workdir / "logs"
        logs.mkdir()
        self.sqlite.replicas.append(
            Replica.spawn("sqlite", self.sqlite.authority.directory, None, logs)
        )
        for i in range(1, self.replicas_count + 1):
            directory = self.workdir / "pg" / f"replica-{i}"
            shutil.copytree(
                self.postgres.authority.directory,
                directory,
                ignore=shutil.ignore_patterns("root.key"),
            )
            self.postgres.replicas.append(Replica.spawn(f"pg-{i}", directory, self.dsn, logs))
        deadline = time.monotonic() + SERVE_START_TIMEOUT
        for replica in self.servers:
            replica.wait_listening(deadline)
        self.meter = CpuMeter(self.servers, self.cluster.pid)

    async def open_clients(self) -> None:
        """The client sessions (for each CA, trusting its ca.crt), and one enrollment
        per client to every server: the warm-up."""
        assert self.sqlite is not None
        assert self.postgres is not None
        for target, kind in ((self.sqlite, "sqlite"), (self.postgres, "postgresql")):
            ca_file = target.authority.directory / "ca.crt"
            target.clients = Clients(ca_file, self.clients_count, fresh=True)
            await target.check_health(kind)
        await self.sqlite.round(1, 1)
        await self.postgres.round(self.replicas_count, self.replicas_count)

    async def close_clients(self) -> None:
        for target in (self.sqlite, self.postgres):
            if target is not None and target.clients is not None:
                await target.clients.close()

    @property
    def servers(self) -> list[Replica]:
        targets = [t for t in (self.sqlite, self.postgres) if t is not None]
        return [r for t in targets for r in t.replicas]

    def stop(self) -> None:
        """Every server, both CAs' stores, the cluster; each step even if one before it
        failed."""
        try:
            for replica in self.servers:
                with contextlib.suppress(OSError):
                    replica.stop()
            for target in (self.sqlite, self.postgres):
                if target is not None:
                    target.authority.close()
        finally:
            if self.cluster is not None:
                self.cluster.stop()


# --- the run ------------------------------------------------------------------------------


def run(
    *,
    quick: bool = False,
    clients: int = CLIENTS,
    per_client: int = ENROLLMENTS_PER_CLIENT,
    rounds: int = ROUNDS,
    replicas: tuple[int, ...] = REPLICAS,
) -> list[Result]:
    """The PostgreSQL set-ups against the SQLite replica (module docstring)."""
    global _last_info
    if quick:
        clients, per_client, rounds = QUICK["clients"], QUICK["per_client"], QUICK["rounds"]
    most = max(replicas)
    per_round = clients * per_client
    sqlite_rates: list[float] = []
    pg_rates: dict[int, list[float]] = {n: [] for n in replicas}
    cpu = {"sqlite_1": CpuUse(), **{f"pg_{n}": CpuUse() for n in replicas}}
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-pki-") as tmp:
        rig = ReplicaRig(Path(tmp), clients=clients, replicas=most)
        try:
            warm_pg = clients * most
            rig.setup(clients + rounds * per_round, warm_pg + rounds * len(replicas) * per_round)
            rig.start()
            with asyncio.Runner() as runner:
                try:
                    runner.run(rig.open_clients())
                    assert rig.sqlite is not None
                    assert rig.postgres is not None
                    assert rig.meter is not None
                    meter = rig.meter

                    def measure(target: Target, n: int, use: CpuUse) -> float:
                        before = meter.sample()
                        rate = runner.run(target.round(n, per_client))
                        meter.add(use, before, meter.sample(), per_round)
                        return rate

                    for r in range(rounds):
                        sqlite_rates.append(measure(rig.sqlite, 1, cpu["sqlite_1"]))
                        order = replicas if r % 2 == 0 else tuple(reversed(replicas))
                        for n in order:
                            pg_rates[n].append(measure(rig.postgres, n, cpu[f"pg_{n}"]))
                finally:
                    runner.run(rig.close_clients())
            rig.sqlite.check()
            rig.postgres.check()
        finally:
            rig.stop()
        served = {r.name: r.enrollments_served() for r in rig.servers}
    _check_served(rig, served)
    _last_info = {
        "store": "postgres",
        "cores": len(os.sched_getaffinity(0)),
        "postgresql": rig.postgres_facts,
        "clients": f"{clients}, a new TLS connection per enrollment, round-robin over replicas",
        "enrollments": {
            "sqlite": len(rig.sqlite.received),
            "postgresql": len(rig.postgres.received),
        },
        "served": served,
        "cpu_ms_per_enrollment": {name: use.per_enrollment_ms() for name, use in cpu.items()},
        "cores_busy": {name: use.cores_busy() for name, use in cpu.items()},
    }
    anchor = f"1 `ca serve` on SQLite ({clients} clients, new conns)"
    return [
        Result.of(
            f"pg_{n}_replica{'s' if n > 1 else ''}_per_s",
            Comparison.of(pg_rates[n], sqlite_rates),
            "enroll/s",
            anchor,
        )
        for n in replicas
    ]


def _check_served(rig: ReplicaRig, served: dict[str, int]) -> None:
    """The servers' own access logs agree with the clients: each CA's servers answered
    200 to exactly its enrollments, and every PostgreSQL replica took a share."""
    for target in (rig.sqlite, rig.postgres):
        assert target is not None
        counts = [served[r.name] for r in target.replicas]
        if sum(counts) != len(target.received) or not all(counts):
            raise BenchFailure(
                f"{target.name}: the servers logged {counts} enrollments,"
                f" the clients received {len(target.received)}"
            )
