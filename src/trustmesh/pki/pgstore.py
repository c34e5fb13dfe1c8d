"""The CA store on PostgreSQL, so that several ``trustmesh ca serve`` replicas can share
one database (issue 23; needs the extra ``trustmesh[postgres]``: psycopg 3 and its pool).

The logic is :class:`~trustmesh.pki.store.SqlCaStore`'s, as on SQLite. What changes:

- **Writes are serialized across replicas.** Every write transaction first takes one
  transaction-level advisory lock, so the decisions taken in a transaction (the node
  cap, the currency of the certificate a rotation presents, revoking every certificate
  of a node) see every commit made before them, as SQLite's single writer gives in one
  process. The exception is an enrollment with no node cap: its one decision is the
  token's row, which its conditional UPDATE takes with a row lock, so it takes the lock
  shared: enrollments run beside each other, never beside a rotation or a revocation
  (whose decisions read the certificates an enrollment adds). Certificates are signed
  before the store is called, so replicas share the signing; only the short
  bookkeeping transactions queue.
- **Reads** run on pooled connections; each statement sees what was committed before it
  (READ COMMITTED), so a revocation made on one replica is in every replica's next CRL.
- **The SQL is written once, for SQLite**: this module turns its ``?`` placeholders into
  psycopg's ``%s``, and ``rowid`` (the order rows were added in) into the ``seq``
  column that PostgreSQL's tables carry for it. Times are Unix seconds in ``BIGINT``.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from trustmesh.pki.errors import PkiError, StoreUnavailable
from trustmesh.pki.migrations import Executes, migrate, statements
from trustmesh.pki.store import RECORDS, Cursor, Handle, SqlCaStore, SqliteStore

# The key of the advisory lock every write transaction takes: "tmca" in ASCII.
WRITE_LOCK = 0x746D6361
# Seconds a call waits for a pooled connection (the database down: the pool reconnects
# in the background with exponential backoff) before it fails with StoreUnavailable,
# which the API answers with a 503; and how many calls may wait at once.
POOL_TIMEOUT = 5.0
MAX_WAITING = 64
# A lost connection is made again in the background after 1, 2, 4 s..., for at most
# this long; then the next call that finds no connection starts again at once. So a
# database back after an outage of any length is used again within seconds.
RECONNECT_TIMEOUT = 8.0
# Every connection's session:
# - a transaction left idle (its replica frozen mid-way) is ended after 10 s, which
#   releases the write lock, before any other replica gives up waiting for it (15 s);
# - the server checks every 5 s that the client of a running statement is still there
#   (a replica killed while it waited for the lock is not served it later);
# - a dead peer on TCP is noticed in about 25 s;
# - autocommit: a read is one statement, with no BEGIN and COMMIT around it (writes
#   open their transaction explicitly).
SESSION = {
    "options": (
        "-c lock_timeout=15s -c idle_in_transaction_session_timeout=10s"
        " -c client_connection_check_interval=5s"
    ),
    "autocommit": True,
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    seq         BIGSERIAL UNIQUE,           -- SQLite's rowid: the order rows were added in
    serial      TEXT PRIMARY KEY,           -- lowercase hex, no leading zeros
    node_id     TEXT NOT NULL,
    role        TEXT NOT NULL DEFAULT 'node',
    not_before  BIGINT NOT NULL,            -- Unix seconds
    not_after   BIGINT NOT NULL,
    pem         TEXT NOT NULL,
    revoked_at  BIGINT,
    reason      TEXT,
    replaces    TEXT,
    spki_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS certificates_node ON certificates (node_id);
CREATE INDEX IF NOT EXISTS certificates_replaces ON certificates (replaces);
CREATE INDEX IF NOT EXISTS certificates_crl
    ON certificates (not_after, serial, revoked_at, reason) WHERE revoked_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS tokens (
    hash        TEXT PRIMARY KEY,
    node_id     TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    used_serial TEXT
);
CREATE TABLE IF NOT EXISTS admin_tokens (
    seq         BIGSERIAL UNIQUE,
    hash        TEXT PRIMARY KEY,
    label       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    id          TEXT UNIQUE,
    expires_at  BIGINT,
    revoked_at  BIGINT
);
CREATE TABLE IF NOT EXISTS audit (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    event       TEXT NOT NULL,
    node_id     TEXT,
    serial      TEXT,
    actor       TEXT,
    detail      TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key         TEXT PRIMARY KEY,
    value       BIGINT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('revocation_epoch', 0) ON CONFLICT (key) DO NOTHING
"""


# What `ca migrate` copies from a SQLite CA database: every record (store.RECORDS), each
# table's rows in the order they were added (SQLite's rowid, the audit's id), so that
# PostgreSQL's ``seq`` keeps that order.
MIGRATED_TABLES = {
    table: (columns, "id" if table == "audit" else "rowid")
    for table, (columns, _) in RECORDS.items()
}


class PostgresStore(SqlCaStore):
    """:class:`~trustmesh.pki.store.CaStore` on a PostgreSQL database (``dsn``: a libpq
    connection string or URI; the password from ``PGPASSFILE`` or the DSN)."""

    kind = "postgresql"
    remote = True

    def __init__(self, dsn: str, *, max_connections: int = 8) -> None:
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max_connections,
            timeout=POOL_TIMEOUT,
            max_waiting=MAX_WAITING,
            reconnect_timeout=RECONNECT_TIMEOUT,
            open=False,
            kwargs=SESSION,
            # A connection the server closed meanwhile (a restart) is replaced on
            # checkout instead of failing the call it was given to.
            check=ConnectionPool.check_connection,
        )
        try:
            self._pool.open(wait=True, timeout=POOL_TIMEOUT)
            with self._write() as db:  # the lock: replicas starting together migrate once
                migrate(db, {1: _base, 2: _crl_number}, now=int(time.time()))
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def _write(self, *, shared: bool = False) -> Iterator[Handle]:
        with (
            _driver_errors_as_typed(),
            self._pool.connection() as connection,
            connection.transaction(),
        ):
            lock = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
            connection.execute(f"SELECT {lock}(%s)", (WRITE_LOCK,))
            yield _Adapter(connection)

    @contextlib.contextmanager
    def _read(self) -> Iterator[Handle]:
        with _driver_errors_as_typed(), self._pool.connection() as connection:
            yield _Adapter(connection)

    def import_records(self, source: SqliteStore) -> dict[str, int]:
        """Copy every record of ``source`` into this database, which must hold none: one
        transaction on each side (a snapshot of the source, all or nothing here). The
        rows copied, by table (``trustmesh ca migrate``)."""
        copied: dict[str, int] = {}
        with (
            source.snapshot() as reader,
            self._pool.connection() as connection,
            connection.transaction(),
        ):
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            target = _Adapter(connection)
            bound = self.bound_ca(target)
            if bound is not None and bound != self.bound_ca(reader):
                raise PkiError("the target database is bound to another CA (ca init --db)")
            if self.holds_records(target):
                raise PkiError("the target database already holds records")
            connection.execute("DELETE FROM meta")
            for table, (columns, order) in MIGRATED_TABLES.items():
                query = f"SELECT {columns} FROM {table} ORDER BY {order}"  # noqa: S608
                rows = reader.execute(query).fetchall()
                marks = ", ".join(["%s"] * len(columns.split(",")))
                with connection.cursor() as cursor:
                    cursor.executemany(
                        f"INSERT INTO {table} ({columns}) VALUES ({marks})",  # noqa: S608
                        rows,
                    )
                copied[table] = len(rows)
            # The audit ids were copied: the next one follows the highest.
            connection.execute(
                "SELECT setval(pg_get_serial_sequence('audit', 'id'),"
                " GREATEST((SELECT max(id) FROM audit), 1))"
            )
        return copied


def _base(db: Executes) -> None:
    """Version 1 of migrations.HISTORY: the tables."""
    for statement in statements(SCHEMA):
        db.execute(statement)


def _crl_number(db: Executes) -> None:
    """Version 2: the CRL number counter (SqlCaStore.next_crl)."""
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('crl_number', 0) ON CONFLICT (key) DO NOTHING"
    )


# The database away or unable to take writes now: unreachable, gone mid-call, no pooled
# connection in time, too many waiting (PoolTimeout, TooManyRequests and a lock not
# granted are OperationalErrors), a standby after a failover (read-only), a transaction
# ended for being idle, a connection found closed.
UNAVAILABLE = (
    psycopg.OperationalError,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.IdleInTransactionSessionTimeout,
    psycopg.InterfaceError,
)


@contextlib.contextmanager
def _driver_errors_as_typed() -> Iterator[None]:
    """The database unreachable, gone mid-call, or not answering in time (no pooled
    connection within POOL_TIMEOUT, too many calls waiting, a lock not granted within
    the session's lock_timeout) as :class:`StoreUnavailable`. A write whose COMMIT was
    lost may have committed: the API's retries are idempotent for that reason."""
    try:
        yield
    except psycopg.DataError as exc:
        # A value PostgreSQL cannot hold (a NUL character in a node_id): the input is
        # refused, as SQLite would have stored it and found nothing.
        raise PkiError(f"a value the CA database cannot hold: {_first_line(exc)}") from None
    except UNAVAILABLE as exc:
        # The driver's words name the host and the failure, never the password.
        raise StoreUnavailable(f"the CA database is unavailable: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class _Adapter:
    """A psycopg connection as a :class:`~trustmesh.pki.store.Handle`."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def execute(self, sql: str, args: Sequence[object] = (), /) -> Cursor:
        return self._connection.execute(_postgres_sql(sql), tuple(args))


@functools.lru_cache(maxsize=256)
def _postgres_sql(sql: str) -> Any:
    """SqlCaStore's SQLite text for psycopg: ``%s`` placeholders, ``seq`` for ``rowid``.
    (Any: psycopg types a query as a LiteralString, which a rewritten one is not; every
    text comes from the store's own constants.)"""
    if "%" in sql:
        raise ValueError("the store's SQL holds a '%', which psycopg would read as a placeholder")
    return re.sub(r"\browid\b", "seq", sql).replace("?", "%s")


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def compare_stores(first: SqlCaStore, second: SqlCaStore) -> list[str]:
    """What differs between two stores' records, checked after a copy: every row of
    every table, column by column (token and admin-token hashes, audit ids, the CRL
    counters included); then as the CA reads them: every certificate, token state,
    admin token, audit entry, the revocation epoch, and the CRL entries of every revoked
    certificate, expired or not. Empty when they agree."""
    differences = [
        f"{table} rows differ" for table in RECORDS if first.records(table) != second.records(table)
    ]
    checks: dict[str, Any] = {
        "certificates": lambda store: store.all(),
        "admin tokens": lambda store: store.admin_tokens(),
        "audit": lambda store: store.audit(limit=2**62),
        "revocation epoch": lambda store: store.revocation_epoch(),
        "CRL entries": lambda store: store.crl_entries(EPOCH),
        "tokens": lambda store: store.tokens(),
    }
    for name, read in checks.items():
        if read(first) != read(second):
            differences.append(f"{name} differ")
    return differences
