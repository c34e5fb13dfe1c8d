"""CA replicas on PostgreSQL under faults (issue 23): ``kill -9`` of one ``ca serve``
replica while 48 enrollments are in flight across two.

What a client saw is the truth the database must agree with: every certificate a
client received is in ``ca list`` (same serial, node, PEM), no node holds two, every
token is spent once, and a token whose answer was lost (the replica died after the
commit) gives the same certificate on a retry at the surviving replica, never a second
one.

The kill is staged, so that every run covers the same cases whatever the timing:

1. All 48 clients connect. Half of the survivor's and EARLY of the victim's enroll; the
   victim's answers are later "lost" on purpose and asked again at the survivor.
2. The test locks the certificates table (SHARE: reads go on, inserts wait), and HELD,
   one of the victim's clients, enrolls: the victim's transaction spends the token and
   then waits to insert the certificate, holding its token's row.
3. The other clients send (the survivor's wait at their inserts too), the victim is
   killed by its pid, and the table lock is released: the dead replica's transaction
   rolls back, and the survivor goes on. A store that committed the spend on its own
   would leave HELD's token spent with no certificate, and HELD's retry refused.

Nothing waits on time: each stage follows what was counted, or seen in the database,
and every wait is bounded."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from catools import PASS, WAIT, CaServe, serving, succeeds
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.pki.ca import CertificateAuthority, token_hash
from trustmesh.pki.challenge import Challenges
from trustmesh.pki.pgstore import PostgresStore

CLIENTS = 48  # n-0 .. n-47: even ones go to the replica that is killed, odd ones to the other
VICTIM, SURVIVOR = 0, 1
EARLY = 4  # the victim's first clients (n-0, n-2, ...): answered before the kill
HELD = f"n-{2 * EARLY}"  # the victim's client inside its transaction when it dies
# Every client comes from 127.0.0.1: lift the per-client and per-address limits, which
# test_ca_serve_cli.py tests on their own.
UNLIMITED = (
    *("--rate", "1000", "--burst", "1000"),
    *("--handshake-rate", "1000", "--handshake-burst", "1000"),
    *("--max-per-source", "512", "--max-unauthenticated-per-source", "512"),
    *("--max-unauthenticated", "512", "--idle-timeout", str(WAIT)),
)
# What a client sees of a replica that died under it: a reset, an EOF in the middle of
# TLS, or a connection closed before the status line (http.client.RemoteDisconnected).
LOST = (OSError, http.client.HTTPException)


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]

    def error(self) -> tuple[int, str, str]:
        return self.status, self.body.get("error", ""), self.body.get("message", "")


@dataclass
class Client:
    """One node: its token, key and CSR, made before the race; what it was answered."""

    node_id: str
    token: str
    key: PrivateKey
    csr: str
    replica: int
    gate: threading.Event | None = None  # sent once this is set (None: at once)
    first: Answer | None = None  # the first request's answer (None: it failed)
    failure: str | None = None  # why the first request failed
    failed_after_kill: bool = False
    retry: Answer | None = None  # the one retry at the survivor, after a failure
    unexpected: list[str] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return json.dumps({"token": self.token, "csr": self.csr}).encode()

    @property
    def certificate(self) -> Answer | None:
        """The certificate answer this client ended with, if any."""
        for answer in (self.first, self.retry):
            if answer is not None and answer.status == 200:
                return answer
        return None


class Https:
    """Requests to the replicas, trusting the CA's root as the clients do."""

    def __init__(self, ca_cert: Path) -> None:
        self.context = ssl.create_default_context(cafile=str(ca_cert))

    def connect(self, server: CaServe) -> http.client.HTTPSConnection:
        """A connection with its TLS handshake done."""
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.port, context=self.context, timeout=WAIT
        )
        connection.connect()
        return connection

    @staticmethod
    def send(connection: http.client.HTTPSConnection, body: bytes) -> None:
        connection.request(
            "POST", "/v1/enroll", body=body, headers={"Content-Type": "application/json"}
        )

    @staticmethod
    def receive(connection: http.client.HTTPSConnection) -> Answer:
        response = connection.getresponse()
        data = response.read()
        parsed: dict[str, Any] = json.loads(data) if data else {}
        return Answer(response.status, parsed)

    def request(self, server: CaServe, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.port, context=self.context, timeout=WAIT
        )
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request("GET" if body is None else "POST", path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def enroll(self, server: CaServe, body: bytes) -> Answer:
        status, data = self.request(server, "/v1/enroll", body)
        return Answer(status, json.loads(data))


class Race:
    """The counts the kill waits for: requests sent and answers received, per replica."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.sent = [0, 0]
        self.answered = [0, 0]
        self.killing = threading.Event()  # set before SIGKILL: no failure comes earlier

    def count(self, counter: list[int], replica: int) -> None:
        with self.changed:
            counter[replica] += 1
            self.changed.notify_all()


def run_client(
    client: Client, https: Https, replicas: list[CaServe], race: Race, start: threading.Barrier
) -> None:
    """Connect, wait for every other client, send, read; after a failure at the killed
    replica, once more at the survivor with the same token and CSR. Never raises: what
    went wrong is in ``client.unexpected``."""
    try:
        connection = https.connect(replicas[client.replica])
    except Exception as exc:  # reported by the test, not lost in a thread
        client.unexpected.append(f"connecting: {exc!r}")
        start.abort()
        return
    try:
        start.wait(timeout=WAIT)  # all connected: the requests arrive together
        if client.gate is not None and not client.gate.wait(timeout=WAIT):
            client.unexpected.append("never let go")
            return
        try:
            Https.send(connection, client.body)
        finally:
            race.count(race.sent, client.replica)
        client.first = Https.receive(connection)
        race.count(race.answered, client.replica)
    except threading.BrokenBarrierError:
        client.unexpected.append("another client could not connect")
        return
    except LOST as exc:
        client.failure = repr(exc)
        client.failed_after_kill = race.killing.is_set()
    except Exception as exc:  # the same
        client.unexpected.append(f"first request: {exc!r}")
        return
    finally:
        connection.close()
    if client.first is not None:
        return
    if client.replica != VICTIM or not client.failed_after_kill:
        client.unexpected.append(f"failed without a kill: {client.failure}")
        return
    try:
        client.retry = https.enroll(replicas[SURVIVOR], client.body)
    except Exception as exc:  # the same
        client.unexpected.append(f"retry at the survivor: {exc!r}")


def make_clients(
    authority: CertificateAuthority, held: threading.Event, rest: threading.Event
) -> list[Client]:
    """Even node numbers go to the victim, odd ones to the survivor. At once: the
    victim's EARLY first and every other survivor's (n % 4 == 1); HELD when ``held`` is
    set; the others when ``rest`` is."""
    clients = []
    for n in range(CLIENTS):
        node_id = f"n-{n}"
        key = PrivateKey.generate(KeyKind.P256)
        gate = None
        if node_id == HELD:
            gate = held
        elif n % 4 == 3 or (n % 2 == 0 and n >= 2 * EARLY):
            gate = rest
        clients.append(
            Client(
                node_id=node_id,
                token=authority.create_token(node_id),
                key=key,
                csr=make_csr(key, node_id),
                replica=VICTIM if n % 2 == 0 else SURVIVOR,
                gate=gate,
            )
        )
    return clients


@dataclass(frozen=True)
class Watcher:
    """Questions about other sessions, each in a statement of its own (autocommit), so
    each sees the server's state anew."""

    connection: psycopg.Connection[Any]
    holder: int  # the backend pid of the session holding the lock

    def inserting(self) -> bool:
        """Whether a session waits for the holder, at a certificate's insert."""
        row = self.connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
            " AND query LIKE 'INSERT INTO certificates%%'",
            (self.holder,),
        ).fetchone()
        return row is not None and row[0] > 0

    def spending(self, token: str) -> bool:
        """Whether a transaction not yet committed has written the row of ``token``."""
        try:
            self.connection.execute(
                "SELECT 1 FROM tokens WHERE hash = %s FOR UPDATE NOWAIT", (token_hash(token),)
            )
        except psycopg.errors.LockNotAvailable:
            return True
        return False


@contextmanager
def certificates_locked(dsn: str) -> Iterator[Watcher]:
    """A transaction holding the certificates table in SHARE mode until the block ends:
    reads go on, an enrollment waits at its insert, inside its own transaction (after
    spending its token)."""
    with (
        psycopg.connect(dsn) as holder,
        psycopg.connect(dsn, autocommit=True) as watcher,
    ):
        holder.execute("LOCK TABLE certificates IN SHARE MODE")
        try:
            yield Watcher(watcher, holder.info.backend_pid)
        finally:
            holder.rollback()


def until(done: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Ask ``done`` until it is true, for at most ``timeout`` seconds: for a state only
    a query shows (each asks the database, so this needs no sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
    return False


def spki(key: PrivateKey) -> bytes:
    public = key.to_cryptography().public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def bounded(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=WAIT * 2)
    assert not [t.name for t in threads if t.is_alive()], "a client did not finish"


def in_threads(work: Callable[[Client], None], clients: list[Client]) -> None:
    threads = [threading.Thread(target=work, args=(c,), name=c.node_id) for c in clients]
    for thread in threads:
        thread.start()
    bounded(threads)


def test_kill_9_of_a_replica_during_48_concurrent_enrollments(
    tmp_path: Path, postgres_dsn: str
) -> None:
    first, second = tmp_path / "replica-1", tmp_path / "replica-2"
    succeeds("ca", "init", "--dir", first, "--db", postgres_dsn)
    with CertificateAuthority(first, PASS.encode(), db=postgres_dsn) as authority:
        Challenges.for_directory(first)  # the secret every replica shares (operations.md)
        held, rest = threading.Event(), threading.Event()
        clients = make_clients(authority, held, rest)
        fresh_token = authority.create_token(f"n-{CLIENTS}")
    # A replica: the same directory on another host, without the root key.
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("root.key"))
    https = Https(first / "ca.crt")

    with (
        serving(first, "--db", postgres_dsn, *UNLIMITED) as victim,
        serving(second, "--db", postgres_dsn, *UNLIMITED) as survivor,
    ):
        replicas = [victim, survivor]
        race = Race()
        start = threading.Barrier(CLIENTS)
        threads = [
            threading.Thread(
                target=run_client, args=(c, https, replicas, race, start), name=c.node_id
            )
            for c in clients
        ]
        held_client = next(c for c in clients if c.node_id == HELD)
        at_once = [
            sum(c.gate is None and c.replica == r for c in clients) for r in (VICTIM, SURVIVOR)
        ]
        everyone = [sum(c.replica == r for c in clients) for r in (VICTIM, SURVIVOR)]
        killed: int | None = None
        try:
            for thread in threads:
                thread.start()
            with race.changed:  # 1: the first wave answered
                first_wave = race.changed.wait_for(lambda: race.answered == at_once, WAIT)
            with certificates_locked(postgres_dsn) as watch:
                try:
                    held.set()  # 2: the victim in HELD's transaction, at the insert
                    holding = first_wave and until(watch.inserting)
                    spending = holding and watch.spending(held_client.token)
                    rest.set()  # 3: every other request sent, then the kill
                    with race.changed:
                        sent = race.changed.wait_for(lambda: race.sent == everyone, WAIT)
                finally:
                    race.killing.set()
                    # The pid is the server's own (the console script is the interpreter,
                    # no wrapper): once killed, nothing listens on its port (below).
                    killed = victim.kill()
            # The lock is released: the dead replica's backend finds no client and
            # rolls back; the survivor's enrollments go on, HELD's retry among them.
        finally:
            held.set()
            rest.set()
            race.killing.set()
            if killed is None:
                killed = victim.kill()
            bounded(threads)
        assert first_wave, f"answered {race.answered} of the first {at_once}"
        assert holding, f"the victim never waited inside the enrollment of {HELD}"
        # Inserting, with the spend of the token written and not committed: a store that
        # commits the spend on its own fails here (and at HELD's retry, below).
        assert spending, f"{HELD}'s certificate waited to be inserted, no spend of its token"
        assert sent, f"sent {race.sent} of {everyone}"
        assert killed == -signal.SIGKILL
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", victim.port), timeout=WAIT).close()

        # What the clients saw: the victim's answers until the kill, then lost requests,
        # each retried once at the survivor; the survivor answered all its own.
        assert {c.node_id: c.unexpected for c in clients if c.unexpected} == {}
        lost = [c for c in clients if c.first is None]
        assert held_client.first is None, f"{HELD} was answered: {held_client.first}"
        assert all(c.replica == VICTIM and c.failed_after_kill for c in lost)
        assert all(c.first.status == 200 for c in clients if c.first is not None), [
            (c.node_id, c.first) for c in clients if c.first is not None and c.first.status != 200
        ]
        # A retry of a request the victim never committed is a new enrollment; of one it
        # committed before dying, the same certificate again. Either way: a certificate.
        assert [(c.node_id, c.retry) for c in lost if c.certificate is None] == []

        # Every answer is a certificate for the client's own key and node, as stored.
        store = PostgresStore(postgres_dsn, max_connections=2)
        try:
            got: dict[str, Answer] = {}
            for c in clients:
                answer = c.certificate
                assert answer is not None
                cert = x509.load_pem_x509_certificate(answer.body["certificate"].encode())
                assert answer.body["node_id"] == c.node_id
                assert int(answer.body["serial"], 16) == cert.serial_number
                names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                assert [n.value for n in names] == [c.node_id]
                assert cert.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ) == spki(c.key)
                stored = store.get(cert.serial_number)
                assert stored is not None, f"{c.node_id}: serial {answer.body['serial']} lost"
                assert (stored.node_id, stored.pem) == (c.node_id, answer.body["certificate"])
                spent = store.token(token_hash(c.token))
                assert spent is not None and spent.used_at is not None
                assert spent.used_serial == cert.serial_number, c.node_id
                assert [r.serial for r in store.by_node(c.node_id)] == [cert.serial_number]
                got[c.node_id] = answer

            # A lost answer, on purpose: the victim answered these before it died; asked
            # again at the survivor, with the same token and key, they get the same one.
            answered = [c for c in clients if c.replica == VICTIM and c.first is not None]
            assert answered

            def again(c: Client) -> None:
                c.retry = https.enroll(survivor, c.body)

            in_threads(again, answered)
            for c in answered:
                assert c.retry is not None and c.retry.status == 200, c.retry
                assert c.retry.body["serial"] == got[c.node_id].body["serial"]
                assert c.retry.body["certificate"] == got[c.node_id].body["certificate"]

            # Every token is spent: a new key with it is refused, whichever way it went.
            refusals: dict[str, Answer] = {}

            def with_a_new_key(c: Client) -> None:
                other = make_csr(PrivateKey.generate(KeyKind.P256), c.node_id)
                body = json.dumps({"token": c.token, "csr": other}).encode()
                refusals[c.node_id] = https.enroll(survivor, body)

            in_threads(with_a_new_key, clients)
            wrong = {
                node_id: answer.error()
                for node_id, answer in refusals.items()
                if answer.error() != (400, "invalid_token", "the enrollment token was already used")
            }
            assert len(refusals) == CLIENTS and wrong == {}

            # The survivor goes on: healthy, and it enrolls a token nobody used.
            status, health = https.request(survivor, "/v1/health")
            assert status == 200 and json.loads(health)["store"] == "postgresql", health
            node_id = f"n-{CLIENTS}"
            csr = make_csr(PrivateKey.generate(KeyKind.P256), node_id)
            fresh = https.enroll(survivor, json.dumps({"token": fresh_token, "csr": csr}).encode())
            assert fresh.status == 200 and fresh.body["node_id"] == node_id, fresh
            got[node_id] = fresh

            # ca list agrees with the clients: one certificate per node, the ones they hold.
            listed = json.loads(
                succeeds("ca", "list", "--dir", second, "--db", postgres_dsn, "--json")
            )
            nodes = [row for row in listed["certificates"] if row["role"] == "node"]
            assert sorted((row["node_id"], int(row["serial"], 16)) for row in nodes) == sorted(
                (node_id, int(answer.body["serial"], 16)) for node_id, answer in got.items()
            )
            assert all(row["state"] == "valid" for row in nodes)
            assert {c.serial for c in store.all() if c.role == "node"} == {
                int(answer.body["serial"], 16) for answer in got.values()
            }
        finally:
            store.close()
        assert survivor.terminate() == 0, survivor.errors()
