"""The CA's database: issued certificates, enrollment and admin tokens, revocations and
an audit log.

:class:`CaStore` is the interface the CA uses; :class:`SqliteStore` implements it on
SQLite (WAL, ``synchronous=FULL``: a certificate is committed, with its audit entry,
before anyone sees it, so a crash at any point loses no issued record). Each method is
one transaction, so another database (PostgreSQL for several CA replicas) can stand in.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from trustmesh.pki.errors import PolicyDenied, TokenRejected
from trustmesh.sqlitedb import open_database, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    serial      TEXT PRIMARY KEY,          -- lowercase hex, no leading zeros
    node_id     TEXT NOT NULL,             -- the node (or admin or server) it names
    role        TEXT NOT NULL DEFAULT 'node',  -- node | admin | server
    not_before  INTEGER NOT NULL,          -- Unix seconds
    not_after   INTEGER NOT NULL,
    pem         TEXT NOT NULL,
    revoked_at  INTEGER,                   -- NULL while valid
    reason      TEXT
);
CREATE INDEX IF NOT EXISTS certificates_node ON certificates (node_id);
CREATE TABLE IF NOT EXISTS tokens (        -- enrollment tokens, by SHA-256 only
    hash        TEXT PRIMARY KEY,
    node_id     TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_serial TEXT
);
CREATE TABLE IF NOT EXISTS admin_tokens (  -- bearer tokens for the admin API, by SHA-256
    hash        TEXT PRIMARY KEY,
    label       TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    event       TEXT NOT NULL,             -- issue | enroll | rotate | revoke | token | ...
    node_id     TEXT,
    serial      TEXT,
    actor       TEXT,                      -- who asked: a client address, admin, cli
    detail      TEXT                       -- JSON
);
CREATE TABLE IF NOT EXISTS meta (
    key         TEXT PRIMARY KEY,
    value       INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revocation_epoch', 0);
"""

COLUMNS = "serial, node_id, role, not_before, not_after, pem, revoked_at, reason"


@dataclass(frozen=True)
class IssuedCertificate:
    serial: int
    node_id: str
    role: str
    not_before: datetime
    not_after: datetime
    pem: str
    revoked_at: datetime | None
    reason: str | None

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


@dataclass(frozen=True)
class Token:
    node_id: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    event: str
    node_id: str | None
    serial: str | None
    actor: str | None
    detail: dict[str, object]


class CaStore(Protocol):
    """What the CA keeps. Every method is atomic."""

    def close(self) -> None: ...

    def add(self, cert: IssuedCertificate, *, event: str, actor: str | None, now: datetime) -> None:
        """Record an issued certificate, and an audit entry for it at ``now``."""

    def enroll(
        self,
        token_hash: str,
        cert: IssuedCertificate,
        *,
        now: datetime,
        max_nodes: int | None,
        actor: str | None,
    ) -> None:
        """Spend the token (it must be unused, unexpired and for ``cert.node_id``), check
        the node cap, and record ``cert`` with its audit entry: all or nothing."""

    def get(self, serial: int) -> IssuedCertificate | None: ...
    def by_node(self, node_id: str) -> list[IssuedCertificate]: ...
    def all(self) -> list[IssuedCertificate]: ...
    def revoked(self) -> list[IssuedCertificate]: ...

    def revoke(
        self, serials: list[int], when: datetime, reason: str, *, actor: str | None
    ) -> list[int]:
        """Mark ``serials`` revoked (those not revoked already); return the ones marked."""

    def revocation_epoch(self) -> int:
        """A number that grows with every revocation (so CRL caches know when to renew)."""

    def add_token(
        self, token_hash: str, node_id: str, created: datetime, expires: datetime
    ) -> None:
        """Record an enrollment token."""

    def token(self, token_hash: str) -> Token | None: ...

    def add_admin_token(self, token_hash: str, label: str, created: datetime) -> None:
        """Record an admin bearer token."""

    def admin_token_label(self, token_hash: str) -> str | None:
        """The label of a known admin token, else None."""

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        """The latest entries, newest first."""

    def audit_event(
        self, event: str, *, detail: Mapping[str, object], now: datetime, actor: str = "cli"
    ) -> None:
        """Record an event that changes no other table (a CA renewal)."""


def _time(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _seconds(when: datetime) -> int:
    return int(when.timestamp())


class SqliteStore:
    """:class:`CaStore` on one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Waits for another process's write transaction instead of failing at once.
        self._db = open_database(path, SCHEMA, synchronous="FULL", busy_timeout=30)

    def close(self) -> None:
        self._db.close()

    # --- certificates -------------------------------------------------------------------

    def add(self, cert: IssuedCertificate, *, event: str, actor: str | None, now: datetime) -> None:
        with transaction(self._db) as db:
            self._insert(db, cert, event, actor, now)

    def enroll(
        self,
        token_hash: str,
        cert: IssuedCertificate,
        *,
        now: datetime,
        max_nodes: int | None,
        actor: str | None,
    ) -> None:
        with transaction(self._db) as db:
            # Spending the token is the first write: of any number of racing requests,
            # exactly one finds it unused.
            spent = db.execute(
                "UPDATE tokens SET used_at = ?, used_serial = ?"
                " WHERE hash = ? AND used_at IS NULL AND expires_at > ? AND node_id = ?",
                (_seconds(now), cert.serial_hex, token_hash, _seconds(now), cert.node_id),
            ).rowcount
            if not spent:
                raise TokenRejected(self._why_unusable(db, token_hash, cert.node_id, now))
            if max_nodes is not None and not self._is_active(db, cert.node_id, now):
                active = self._active_nodes(db, now)
                if active >= max_nodes:
                    raise PolicyDenied(f"the mesh is full: {active} of {max_nodes} nodes enrolled")
            self._insert(db, cert, "enroll", actor, now)

    def get(self, serial: int) -> IssuedCertificate | None:
        rows = self._select("WHERE serial = ?", (format(serial, "x"),))
        return rows[0] if rows else None

    def by_node(self, node_id: str) -> list[IssuedCertificate]:
        return self._select("WHERE node_id = ? ORDER BY not_before", (node_id,))

    def all(self) -> list[IssuedCertificate]:
        return self._select("ORDER BY not_before", ())

    def revoked(self) -> list[IssuedCertificate]:
        return self._select("WHERE revoked_at IS NOT NULL ORDER BY revoked_at", ())

    def revoke(
        self, serials: list[int], when: datetime, reason: str, *, actor: str | None
    ) -> list[int]:
        marked = []
        with transaction(self._db) as db:
            for serial in serials:
                hexed = format(serial, "x")
                row = db.execute(
                    "UPDATE certificates SET revoked_at = ?, reason = ?"
                    " WHERE serial = ? AND revoked_at IS NULL RETURNING node_id",
                    (_seconds(when), reason, hexed),
                ).fetchone()
                if row is not None:
                    marked.append(serial)
                    self._audit(db, when, "revoke", row[0], hexed, actor, {"reason": reason})
            if marked:
                db.execute(
                    "UPDATE meta SET value = value + 1 WHERE key = 'revocation_epoch'",
                )
        return marked

    def revocation_epoch(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'revocation_epoch'").fetchone()
        return int(row[0])

    # --- tokens -------------------------------------------------------------------------

    def add_token(
        self, token_hash: str, node_id: str, created: datetime, expires: datetime
    ) -> None:
        with transaction(self._db) as db:
            db.execute(
                "INSERT INTO tokens (hash, node_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (token_hash, node_id, _seconds(created), _seconds(expires)),
            )
            detail = {"expires_at": expires.isoformat()}
            self._audit(db, created, "token", node_id, None, "cli", detail)

    def token(self, token_hash: str) -> Token | None:
        row = self._db.execute(
            "SELECT node_id, created_at, expires_at, used_at FROM tokens WHERE hash = ?",
            (token_hash,),
        ).fetchone()
        if row is None:
            return None
        node_id, created, expires, used = row
        return Token(
            node_id=node_id,
            created_at=datetime.fromtimestamp(created, UTC),
            expires_at=datetime.fromtimestamp(expires, UTC),
            used_at=_time(used),
        )

    def add_admin_token(self, token_hash: str, label: str, created: datetime) -> None:
        with transaction(self._db) as db:
            db.execute(
                "INSERT INTO admin_tokens (hash, label, created_at) VALUES (?, ?, ?)",
                (token_hash, label, _seconds(created)),
            )
            self._audit(db, created, "admin-token", None, None, "cli", {"label": label})

    def admin_token_label(self, token_hash: str) -> str | None:
        row = self._db.execute(
            "SELECT label FROM admin_tokens WHERE hash = ?", (token_hash,)
        ).fetchone()
        return None if row is None else str(row[0])

    # --- audit --------------------------------------------------------------------------

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        rows = self._db.execute(
            "SELECT at, event, node_id, serial, actor, detail FROM audit ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            AuditEntry(
                at=datetime.fromtimestamp(at, UTC),
                event=event,
                node_id=node_id,
                serial=serial,
                actor=actor,
                detail=json.loads(detail) if detail else {},
            )
            for at, event, node_id, serial, actor, detail in rows
        ]

    def audit_event(
        self, event: str, *, detail: Mapping[str, object], now: datetime, actor: str = "cli"
    ) -> None:
        with transaction(self._db) as db:
            self._audit(db, now, event, None, None, actor, detail)

    # --- internals ----------------------------------------------------------------------

    def _insert(
        self,
        db: sqlite3.Connection,
        cert: IssuedCertificate,
        event: str,
        actor: str | None,
        now: datetime,
    ) -> None:
        db.execute(
            f"INSERT INTO certificates ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",  # noqa: S608
            (
                cert.serial_hex,
                cert.node_id,
                cert.role,
                _seconds(cert.not_before),
                _seconds(cert.not_after),
                cert.pem,
            ),
        )
        detail = {"role": cert.role, "not_after": cert.not_after.isoformat()}
        self._audit(db, now, event, cert.node_id, cert.serial_hex, actor, detail)

    @staticmethod
    def _audit(
        db: sqlite3.Connection,
        when: datetime,
        event: str,
        node_id: str | None,
        serial: str | None,
        actor: str | None,
        detail: Mapping[str, object],
    ) -> None:
        db.execute(
            "INSERT INTO audit (at, event, node_id, serial, actor, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (_seconds(when), event, node_id, serial, actor, json.dumps(detail)),
        )

    @staticmethod
    def _why_unusable(db: sqlite3.Connection, token_hash: str, node_id: str, now: datetime) -> str:
        row = db.execute(
            "SELECT node_id, expires_at, used_at FROM tokens WHERE hash = ?", (token_hash,)
        ).fetchone()
        if row is None:
            return "unknown enrollment token"
        if row[2] is not None:
            return "the enrollment token was already used"
        if row[1] <= _seconds(now):
            return "the enrollment token has expired"
        return f"the enrollment token is for another node_id, not {node_id!r}"

    @staticmethod
    def _is_active(db: sqlite3.Connection, node_id: str, now: datetime) -> bool:
        return (
            db.execute(
                "SELECT 1 FROM certificates WHERE node_id = ? AND role = 'node'"
                " AND revoked_at IS NULL AND not_after > ? LIMIT 1",
                (node_id, _seconds(now)),
            ).fetchone()
            is not None
        )

    @staticmethod
    def _active_nodes(db: sqlite3.Connection, now: datetime) -> int:
        row = db.execute(
            "SELECT COUNT(DISTINCT node_id) FROM certificates WHERE role = 'node'"
            " AND revoked_at IS NULL AND not_after > ?",
            (_seconds(now),),
        ).fetchone()
        return int(row[0])

    def _select(self, where: str, args: tuple[object, ...]) -> list[IssuedCertificate]:
        # ``where`` is always one of this class's constant clauses, never input.
        query = f"SELECT {COLUMNS} FROM certificates {where}"  # noqa: S608
        rows = self._db.execute(query, args).fetchall()
        return [
            IssuedCertificate(
                serial=int(serial, 16),
                node_id=node_id,
                role=role,
                not_before=datetime.fromtimestamp(nb, UTC),
                not_after=datetime.fromtimestamp(na, UTC),
                pem=pem,
                revoked_at=_time(revoked_at),
                reason=reason,
            )
            for serial, node_id, role, nb, na, pem, revoked_at, reason in rows
        ]
