"""The CA store on PostgreSQL, shared by replicas (issue 23). Three PostgresStore
objects on one database stand for three ``ca serve`` replicas: each has its own
connection pool, as separate processes would. The rules every store keeps run on both
stores in test_registrar.py and test_lineage_and_retries.py; these are the ones that
only replicas can break."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.pki.ca import CertificateAuthority, token_hash
from trustmesh.pki.errors import PolicyDenied, TokenRejected
from trustmesh.pki.pgstore import WRITE_LOCK, PostgresStore
from trustmesh.pki.store import IssuedCertificate

PASS = b"postgres store tests"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
REPLICAS = 3
JOIN_TIMEOUT = 60.0


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    """Signs the records the replicas store (its own SQLite store is not used)."""
    authority = CertificateAuthority.init(tmp_path / "ca", PASS, now=NOW)
    yield authority
    authority.close()


@pytest.fixture
def replicas(postgres_dsn: str) -> Iterator[list[PostgresStore]]:
    stores = [PostgresStore(postgres_dsn, max_connections=4) for _ in range(REPLICAS)]
    yield stores
    for store in stores:
        store.close()


def record(ca: CertificateAuthority, node_id: str) -> IssuedCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM)
    return ca.sign(x509.load_pem_x509_csr(pem), node_id, now=NOW)[1]


def race(attempts: list[Callable[[], str]]) -> list[str]:
    """Run every attempt in its own thread, all released at once; their outcomes."""
    start = threading.Barrier(len(attempts))
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(attempt: Callable[[], str]) -> None:
        start.wait(timeout=JOIN_TIMEOUT)
        outcome = attempt()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run, args=(attempt,)) for attempt in attempts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    assert len(outcomes) == len(attempts), "an attempt did not finish"
    return outcomes


def enroll(store: PostgresStore, token: str, cert: IssuedCertificate, cap: int | None) -> str:
    try:
        store.enroll(token_hash(token), cert, now=NOW, max_nodes=cap, actor="test")
    except (TokenRejected, PolicyDenied) as exc:
        return str(exc)
    return "ok"


def test_a_token_raced_by_fifty_clients_across_replicas_is_spent_once(
    ca: CertificateAuthority, replicas: list[PostgresStore]
) -> None:
    token = "tm_raced"
    replicas[0].add_token(token_hash(token), "node-1", NOW, NOW + timedelta(hours=1))
    records = [record(ca, "node-1") for _ in range(50)]
    outcomes = race(
        [
            lambda store=replicas[i % REPLICAS], cert=cert: enroll(store, token, cert, None)  # type: ignore[misc]
            for i, cert in enumerate(records)
        ]
    )
    assert outcomes.count("ok") == 1
    assert set(outcomes) == {"ok", "the enrollment token was already used"}
    for store in replicas:  # every replica sees the one certificate, and the spent token
        assert len(store.by_node("node-1")) == 1
        spent = store.token(token_hash(token))
        assert spent is not None and spent.used_serial == store.by_node("node-1")[0].serial


def test_the_node_cap_counts_right_across_replicas(
    ca: CertificateAuthority, replicas: list[PostgresStore]
) -> None:
    nodes = [f"node-{n}" for n in range(12)]
    for node_id in nodes:
        replicas[0].add_token(token_hash(f"tm_{node_id}"), node_id, NOW, NOW + timedelta(hours=1))
    certs = {node_id: record(ca, node_id) for node_id in nodes}
    outcomes = race(
        [
            lambda store=replicas[i % REPLICAS], node_id=node_id: enroll(  # type: ignore[misc]
                store, f"tm_{node_id}", certs[node_id], 5
            )
            for i, node_id in enumerate(nodes)
        ]
    )
    assert outcomes.count("ok") == 5
    assert all(o == "ok" or o.startswith("the mesh is full: 5 of 5") for o in outcomes)
    assert len({c.node_id for c in replicas[2].all() if c.is_live(NOW)}) == 5


def test_a_revocation_on_one_replica_is_in_every_replicas_crl(
    ca: CertificateAuthority, replicas: list[PostgresStore]
) -> None:
    first, second, third = replicas
    first.add_token(token_hash("tm_1"), "node-1", NOW, NOW + timedelta(hours=1))
    cert = first.enroll(
        token_hash("tm_1"), record(ca, "node-1"), now=NOW, max_nodes=None, actor="test"
    )
    epoch = third.revocation_epoch()
    assert second.revoke_node("node-1", NOW, "keyCompromise", actor="admin") == [cert.serial]
    assert [e.serial for e in third.crl_entries(NOW - timedelta(days=1))] == [cert.serial]
    assert first.revocation_epoch() == third.revocation_epoch() == epoch + 1
    assert third.revoke([cert.serial], NOW, "superseded", actor="admin") == []  # already
    assert third.audit(limit=1)[0].event == "revoke"


def test_replicas_starting_together_make_the_schema_once(postgres_dsn: str) -> None:
    opened: list[PostgresStore] = []

    def open_one() -> str:
        opened.append(PostgresStore(postgres_dsn, max_connections=1))
        return "ok"

    outcomes = race([open_one] * 4)
    try:
        assert outcomes == ["ok"] * 4
        assert opened[0].revocation_epoch() == 0  # one meta row, not four
    finally:
        for store in opened:
            store.close()


def test_crl_numbers_grow_across_replicas_whose_clocks_disagree(
    ca: CertificateAuthority, replicas: list[PostgresStore]
) -> None:
    """Each replica signs with its own clock; the number is the shared store's, so a
    replica an hour behind still numbers its CRL above the one signed before it, and a
    higher number never lists less (numbers and entries are read in one transaction)."""
    first, second, _ = replicas
    first.add_token(token_hash("tm_1"), "node-1", NOW, NOW + timedelta(hours=1))
    cert = first.enroll(
        token_hash("tm_1"), record(ca, "node-1"), now=NOW, max_nodes=None, actor="test"
    )
    ahead = int(NOW.timestamp() * 1000)
    one, listed_one = first.next_crl(NOW - timedelta(days=1), at_least=ahead)
    second.revoke([cert.serial], NOW, "keyCompromise", actor="admin")
    two, listed_two = second.next_crl(NOW - timedelta(days=1), at_least=ahead - 3_600_000)
    assert (one, listed_one) == (ahead, [])
    assert two == ahead + 1 and [e.serial for e in listed_two] == [cert.serial]

    def number_from(store: PostgresStore) -> Callable[[], str]:
        return lambda: str(store.next_crl(NOW, at_least=0)[0])

    numbers = race([number_from(store) for store in replicas * 4])
    assert sorted(int(n) for n in numbers) == list(range(ahead + 2, ahead + 14))  # no repeats


def test_an_enrollment_without_a_node_cap_does_not_queue_on_the_write_lock(
    ca: CertificateAuthority, replicas: list[PostgresStore], postgres_dsn: str
) -> None:
    """Another replica holds the write lock (a revocation, a rotation under way): an
    enrollment with no node cap needs only its token's row and goes on; one with a cap
    counts the nodes, so it waits for the lock."""
    first, second, _ = replicas
    for name in ("tm_1", "tm_2"):
        first.add_token(token_hash(name), f"node-{name[-1]}", NOW, NOW + timedelta(hours=1))
    with psycopg.connect(postgres_dsn) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        free = record(ca, "node-1")
        assert enroll(second, "tm_1", free, None) == "ok"
        capped = threading.Thread(target=enroll, args=(first, "tm_2", record(ca, "node-2"), 10))
        capped.start()
        with psycopg.connect(postgres_dsn, autocommit=True) as watcher:
            deadline = time.monotonic() + JOIN_TIMEOUT
            while not waiting_for_advisory_lock(watcher):  # each look is a round trip
                assert time.monotonic() < deadline, "the capped enrollment never waited"
        assert capped.is_alive()
        holder.rollback()  # the lock goes
        capped.join(timeout=JOIN_TIMEOUT)
    assert not capped.is_alive()
    assert {c.node_id for c in first.all()} == {"node-1", "node-2"}


def waiting_for_advisory_lock(connection: psycopg.Connection[Any]) -> bool:
    row = connection.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    ).fetchone()
    return row is not None and row[0] > 0
