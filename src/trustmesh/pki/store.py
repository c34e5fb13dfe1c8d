"""The CA's database: every certificate it issued and every revocation (SQLite, WAL,
``synchronous=FULL``: an issued certificate or a revocation survives a crash)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    serial      TEXT PRIMARY KEY,          -- lowercase hex, no leading zeros
    node_id     TEXT NOT NULL,
    not_before  INTEGER NOT NULL,          -- Unix seconds
    not_after   INTEGER NOT NULL,
    pem         TEXT NOT NULL,
    revoked_at  INTEGER,                   -- NULL while valid
    reason      TEXT
);
CREATE INDEX IF NOT EXISTS certificates_node ON certificates (node_id);
"""


COLUMNS = "serial, node_id, not_before, not_after, pem, revoked_at, reason"


@dataclass(frozen=True)
class IssuedCertificate:
    serial: int
    node_id: str
    not_before: datetime
    not_after: datetime
    pem: str
    revoked_at: datetime | None
    reason: str | None

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


def _time(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class CaStore:
    """SQLite behind a small interface, so that another database can stand in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add(
        self, serial: int, node_id: str, not_before: datetime, not_after: datetime, pem: str
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO certificates (serial, node_id, not_before, not_after, pem)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    format(serial, "x"),
                    node_id,
                    int(not_before.timestamp()),
                    int(not_after.timestamp()),
                    pem,
                ),
            )

    def get(self, serial: int) -> IssuedCertificate | None:
        rows = self._select("WHERE serial = ?", (format(serial, "x"),))
        return rows[0] if rows else None

    def by_node(self, node_id: str) -> list[IssuedCertificate]:
        return self._select("WHERE node_id = ? ORDER BY not_before", (node_id,))

    def all(self) -> list[IssuedCertificate]:
        return self._select("ORDER BY not_before", ())

    def revoked(self) -> list[IssuedCertificate]:
        return self._select("WHERE revoked_at IS NOT NULL ORDER BY revoked_at", ())

    def revoke(self, serials: list[int], when: datetime, reason: str) -> list[int]:
        """Mark ``serials`` revoked (those not revoked already); return the ones marked."""
        marked = []
        with self._transaction() as db:
            for serial in serials:
                cursor = db.execute(
                    "UPDATE certificates SET revoked_at = ?, reason = ?"
                    " WHERE serial = ? AND revoked_at IS NULL",
                    (int(when.timestamp()), reason, format(serial, "x")),
                )
                if cursor.rowcount:
                    marked.append(serial)
        return marked

    def _select(self, where: str, args: tuple[object, ...]) -> list[IssuedCertificate]:
        # ``where`` is always one of this class's constant clauses, never input.
        query = f"SELECT {COLUMNS} FROM certificates {where}"  # noqa: S608
        rows = self._db.execute(query, args).fetchall()
        return [
            IssuedCertificate(
                serial=int(serial, 16),
                node_id=node_id,
                not_before=datetime.fromtimestamp(nb, UTC),
                not_after=datetime.fromtimestamp(na, UTC),
                pem=pem,
                revoked_at=_time(revoked_at),
                reason=reason,
            )
            for serial, node_id, nb, na, pem, revoked_at, reason in rows
        ]
