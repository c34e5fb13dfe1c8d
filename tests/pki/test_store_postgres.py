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
from trustmesh.pki.errors import PkiError, PolicyDenied, StoreUnavailable, TokenRejected
from trustmesh.pki.pgstore import WRITE_LOCK, PostgresStore
from trustmesh.pki.store import IssuedCertificate, SqliteStore

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


def test_enrollments_without_a_node_cap_run_beside_each_other(
    ca: CertificateAuthority, replicas: list[PostgresStore], postgres_dsn: str
) -> None:
    """Another enrollment holds the write lock shared: an enrollment with no node cap
    goes on beside it; one with a cap counts the nodes, so it waits for the lock."""
    first, second, _ = replicas
    for name in ("tm_1", "tm_2"):
        first.add_token(token_hash(name), f"node-{name[-1]}", NOW, NOW + timedelta(hours=1))
    with psycopg.connect(postgres_dsn) as holder:
        holder.execute("SELECT pg_advisory_xact_lock_shared(%s)", (WRITE_LOCK,))
        assert enroll(second, "tm_1", record(ca, "node-1"), None) == "ok"
        capped = threading.Thread(target=enroll, args=(first, "tm_2", record(ca, "node-2"), 10))
        capped.start()
        wait_until_blocked(postgres_dsn, "advisory")
        assert capped.is_alive()
        holder.rollback()  # the lock goes
        capped.join(timeout=JOIN_TIMEOUT)
    assert not capped.is_alive()
    assert {c.node_id for c in first.all()} == {"node-1", "node-2"}


def test_revoking_a_node_waits_for_its_enrollment_in_flight(
    ca: CertificateAuthority, replicas: list[PostgresStore], postgres_dsn: str
) -> None:
    """An enrollment has spent its token and waits to insert its certificate (the
    certificates table is held); revoking the node on another replica waits for it and
    revokes the certificate it adds, instead of missing it."""
    first, second, _ = replicas
    first.add_token(token_hash("tm_1"), "node-1", NOW, NOW + timedelta(hours=1))
    cert = record(ca, "node-1")
    revoked: list[list[int] | None] = []
    with psycopg.connect(postgres_dsn) as holder:
        holder.execute("LOCK TABLE certificates IN SHARE MODE")
        enrolling = threading.Thread(target=enroll, args=(first, "tm_1", cert, None))
        enrolling.start()
        wait_until_blocked(postgres_dsn, "relation")  # in its transaction, at its insert
        revoking = threading.Thread(
            target=lambda: revoked.append(
                second.revoke_node("node-1", NOW, "keyCompromise", actor="admin")
            )
        )
        revoking.start()
        wait_until_blocked(postgres_dsn, "advisory")  # behind the enrollment's lock
        holder.rollback()
    for thread in (enrolling, revoking):
        thread.join(timeout=JOIN_TIMEOUT)
        assert not thread.is_alive()
    assert revoked == [[cert.serial]]
    stored = first.get(cert.serial)
    assert stored is not None and stored.revoked_at is not None


def wait_until_blocked(dsn: str, locktype: str) -> None:
    """Until some session waits for a lock of ``locktype`` (bounded)."""
    with psycopg.connect(dsn, autocommit=True) as watcher:
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not waiting_for(watcher, locktype):  # each look is a round trip
            assert time.monotonic() < deadline, f"nothing waited for a {locktype} lock"


def waiting_for(connection: psycopg.Connection[Any], locktype: str) -> bool:
    row = connection.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = %s AND NOT granted", (locktype,)
    ).fetchone()
    return row is not None and row[0] > 0


def test_a_read_only_database_is_unavailable_not_an_error(
    ca: CertificateAuthority, postgres_dsn: str
) -> None:
    """A standby after a failover takes no writes: a 503 to retry (on the new primary),
    not a 500."""
    store = PostgresStore(postgres_dsn, max_connections=1)
    try:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            name = admin.execute("SELECT current_database()").fetchone()
            assert name is not None
            admin.execute(f'ALTER DATABASE "{name[0]}" SET default_transaction_read_only = on')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(StoreUnavailable, match="ReadOnlySqlTransaction"):
            store.add_token(token_hash("tm_1"), "node-1", NOW, NOW + timedelta(hours=1))
    finally:
        store.close()


def test_ca_migrate_refuses_a_database_bound_to_another_ca(
    tmp_path: Path, postgres_dsn: str
) -> None:
    CertificateAuthority.init(tmp_path / "bound", PASS, db=postgres_dsn).close()
    CertificateAuthority.init(tmp_path / "other", PASS).close()
    source, target = SqliteStore(tmp_path / "other" / "ca.db"), PostgresStore(postgres_dsn)
    try:
        with pytest.raises(PkiError, match="bound to another CA"):
            target.import_records(source)
    finally:
        source.close()
        target.close()
