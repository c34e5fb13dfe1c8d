"""The CA store's schema history, one for both stores (issue 23): each store records
the same versions; a database left at an older version is brought up on open, once;
and a database a newer trustmesh migrated is refused, not written to."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from trustmesh.pki.migrations import HISTORY, LATEST, SchemaTooNew
from trustmesh.pki.pgstore import PostgresStore
from trustmesh.pki.store import SqlCaStore, SqliteStore

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
Open = Callable[[], SqlCaStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Open:
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "ca.db")
    dsn = request.getfixturevalue("postgres_dsn")
    return lambda: PostgresStore(dsn, max_connections=1)


def execute(store: SqlCaStore, sql: str) -> None:
    """Change the database behind the store's back, as another program would."""
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db:
            db.execute(sql)
    else:
        with store._write() as db:  # the PostgreSQL store's own connections
            db.execute(sql)


def history(store: SqlCaStore) -> list[tuple[int, str]]:
    with store._read() as db:
        rows = db.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        return [(int(version), name) for version, name in rows.fetchall()]


def test_both_stores_record_the_same_history(opener: Open) -> None:
    store = opener()
    try:
        assert history(store) == [(m.version, m.name) for m in HISTORY]
        assert store.schema_version() == LATEST
    finally:
        store.close()


def test_a_database_at_an_older_version_is_brought_up_once(opener: Open) -> None:
    store = opener()
    execute(store, "DELETE FROM schema_migrations WHERE version = 2")
    execute(store, "DELETE FROM meta WHERE key = 'crl_number'")
    store.close()
    again = opener()
    try:
        assert history(again)[-1][0] == 2
        assert again.next_crl(NOW, at_least=7)[0] == 7  # the counter is back
        assert len(history(again)) == len(HISTORY)
    finally:
        again.close()
    third = opener()  # nothing left to do: no version applied twice
    try:
        assert len(history(third)) == len(HISTORY)
        assert third.next_crl(NOW, at_least=0)[0] == 8
    finally:
        third.close()


def test_a_database_a_newer_trustmesh_migrated_is_refused(opener: Open) -> None:
    store = opener()
    execute(
        store,
        "INSERT INTO schema_migrations (version, name, applied_at)"
        f" VALUES ({LATEST + 1}, 'from the future', 0)",
    )
    store.close()
    with pytest.raises(SchemaTooNew, match=f"schema version {LATEST + 1}.*upgrade trustmesh"):
        opener()


def test_a_postgresql_database_without_history_gets_every_step(postgres_dsn: str) -> None:
    """A database whose tables exist but that has no history (made before it): every
    step runs, and being idempotent, keeps what is there."""
    store = PostgresStore(postgres_dsn, max_connections=1)
    store.add_token("h", "node-1", NOW, NOW)
    store.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute("DROP TABLE schema_migrations")
    again = PostgresStore(postgres_dsn, max_connections=1)
    try:
        assert again.schema_version() == LATEST
        assert set(again.tokens()) == {"h"}
    finally:
        again.close()
