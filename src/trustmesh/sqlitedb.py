"""The SQLite habits every trustmesh store shares: WAL, autocommit off only inside an
explicit ``BEGIN IMMEDIATE`` transaction, and waiting for another writer instead of
failing at once."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal


def open_database(
    path: Path,
    schema: str,
    *,
    synchronous: Literal["FULL", "NORMAL"],
    busy_timeout: float,
) -> sqlite3.Connection:
    """Open (creating if need be) a WAL database and apply ``schema`` (idempotent DDL)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(schema)
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
