"""The CA's database: issued certificates, enrollment and admin tokens, revocations and
an audit log.

:class:`CaStore` is the interface the CA uses; :class:`SqliteStore` implements it on
SQLite (WAL, ``synchronous=FULL``: a certificate is committed, with its audit entry,
before anyone sees it, so a crash at any point loses no issued record). Each method is
one transaction, so another database (PostgreSQL for several CA replicas) can stand in.

Every decision that depends on the database is taken inside the transaction that acts
on it: spending a token, the node cap, the currency of the certificate a rotation is
authenticated with (not revoked, not expired, not superseded), revoking every
certificate of a node. A revocation that commits first is therefore always seen by a
rotation that commits after it, and a rotation that commits first is revoked with the
rest of the node.

The schema's history is :mod:`trustmesh.pki.migrations`, shared with the PostgreSQL
store: a database is brought to the latest version when it is opened
(:meth:`SqliteStore._migrate`), in one transaction.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from trustmesh.keystore.filestore import fsync_directory
from trustmesh.pki.errors import (
    CertificateExpired,
    CertificateRevoked,
    NotAuthenticated,
    PkiError,
    PolicyDenied,
    Superseded,
    TokenRejected,
    UnknownAdminToken,
)
from trustmesh.pki.migrations import Executes, migrate, schema_version, statements
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
    reason      TEXT,
    replaces    TEXT,                      -- the serial this one replaced (a rotation)
    spki_sha256 TEXT                       -- SHA-256 of its SubjectPublicKeyInfo, hex
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
    created_at  INTEGER NOT NULL,
    id          TEXT,                      -- public name: the hash's first 16 hex digits
    expires_at  INTEGER,
    revoked_at  INTEGER
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

COLUMNS = (
    "serial, node_id, role, not_before, not_after, pem, revoked_at, reason, replaces, spki_sha256"
)
# Columns added after the first release: (table, column, type). _migrate adds them.
ADDED_COLUMNS = (
    ("certificates", "replaces", "TEXT"),
    ("certificates", "spki_sha256", "TEXT"),
    ("admin_tokens", "id", "TEXT"),
    ("admin_tokens", "expires_at", "INTEGER"),
    ("admin_tokens", "revoked_at", "INTEGER"),
)
INDEXES = """
CREATE INDEX IF NOT EXISTS certificates_replaces ON certificates (replaces);
CREATE UNIQUE INDEX IF NOT EXISTS admin_tokens_id ON admin_tokens (id);
CREATE INDEX IF NOT EXISTS certificates_crl
    ON certificates (not_after, serial, revoked_at, reason) WHERE revoked_at IS NOT NULL;
"""
# What an admin token made before tokens expired is given: a day from its creation.
LEGACY_ADMIN_TOKEN_TTL = 24 * 3600
ADMIN_TOKEN_ID_LENGTH = 16


def spki_sha256(key: CertificatePublicKeyTypes) -> str:
    """How the store names a public key: SHA-256 of its DER SubjectPublicKeyInfo, hex.
    An idempotent retry (enrollment or rotation) is recognised by it."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def admin_token_id(token_hash: str) -> str:
    """The public id of an admin token (``ca admin-token list`` and ``revoke``)."""
    return token_hash[:ADMIN_TOKEN_ID_LENGTH]


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
    replaces: int | None = None  # the serial this certificate replaced (rotation)
    spki_sha256: str | None = None  # its public key (see :func:`spki_sha256`)

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    @property
    def replaces_hex(self) -> str | None:
        return None if self.replaces is None else format(self.replaces, "x")

    def is_live(self, now: datetime) -> bool:
        """Not revoked and not expired at ``now``."""
        return self.revoked_at is None and self.not_after > now


@dataclass(frozen=True, slots=True)
class CrlEntry:
    """One revoked certificate as the CRL lists it."""

    serial: int
    revoked_at: datetime
    reason: str | None


@dataclass(frozen=True)
class Token:
    node_id: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_serial: int | None = None  # the certificate it bought


@dataclass(frozen=True)
class AdminToken:
    id: str
    label: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None

    def state(self, now: datetime) -> str:
        """``revoked``, ``expired`` or ``valid`` at ``now``."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= now else "valid"


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

    kind: str  # what it is kept in: "sqlite" or "postgresql" (the CA's /v1/health says)
    # Whether a call may wait on another machine (a database server): the CA API makes
    # such calls on worker threads, within a deadline. A local store's calls are short
    # and run where they are made (a thread hop would cost more than the call).
    remote: bool

    def close(self) -> None: ...

    def ping(self) -> None:
        """Check that the database answers; :class:`StoreUnavailable` when it does not."""

    def claim(self, ca_id: int, *, new: bool) -> None:
        """Bind the database to the CA whose issuing key ``ca_id`` names (one
        serialized transaction, so of two CAs racing for an empty database one wins).
        ``new`` (``ca init``): the database must hold no CA's records. Otherwise it must
        be bound to this CA, or to none yet (a database made before the binding)."""

    def check_unclaimed(self) -> None:
        """Refuse (before any key is made) a database that is bound to a CA or holds
        records; :meth:`claim` decides for good."""

    def add(self, cert: IssuedCertificate, *, event: str, actor: str | None, now: datetime) -> None:
        """Record an issued certificate, and an audit entry for it at ``now``."""

    def add_many(
        self, certs: Iterable[IssuedCertificate], *, event: str, actor: str | None, now: datetime
    ) -> None:
        """As :meth:`add` for each of ``certs``, all or none."""

    def enroll(
        self,
        token_hash: str,
        cert: IssuedCertificate,
        *,
        now: datetime,
        max_nodes: int | None,
        actor: str | None,
        audit: Mapping[str, object] | None = None,
    ) -> IssuedCertificate:
        """Spend the token (it must be unused, unexpired and for ``cert.node_id``), check
        the node cap, and record ``cert`` with its audit entry: all or nothing; return
        ``cert``. A token already spent on a live certificate for the same public key
        (a client retrying after a lost answer) returns that certificate instead."""

    def rotate(
        self,
        current: int,
        cert: IssuedCertificate,
        *,
        now: datetime,
        actor: str | None,
        claimed_serial: int | None = None,
        audit: Mapping[str, object] | None = None,
    ) -> IssuedCertificate:
        """Record ``cert`` as the successor of certificate ``current``, which must be a
        node certificate that is, in this same transaction, not revoked, not expired and
        the node's newest live certificate; return ``cert``. If ``current`` already has a
        live successor for the same public key (a retry), return that one instead;
        :class:`Superseded` when it has any other."""

    def get(self, serial: int) -> IssuedCertificate | None: ...
    def by_node(self, node_id: str) -> list[IssuedCertificate]: ...
    def all(self) -> list[IssuedCertificate]: ...
    def revoked(self) -> list[IssuedCertificate]: ...

    def crl_entries(self, expired_before: datetime) -> list[CrlEntry]:
        """What the CRL lists: every revoked certificate whose notAfter is not before
        ``expired_before``, oldest revocation first (no PEM is read)."""

    def next_crl(self, expired_before: datetime, *, at_least: int) -> tuple[int, list[CrlEntry]]:
        """The number of a new CRL and what it lists (as :meth:`crl_entries`), in one
        transaction: the number is above every number this store gave before, and at
        least ``at_least``; so across CA replicas a higher number never lists less than
        a lower one (both were taken in the order of the revocations they see)."""

    def revoke(
        self, serials: list[int], when: datetime, reason: str, *, actor: str | None
    ) -> list[int]:
        """Mark ``serials`` revoked (those not revoked already); return the ones marked."""

    def revoke_node(
        self, node_id: str, when: datetime, reason: str, *, actor: str | None
    ) -> list[int] | None:
        """Revoke every node certificate of ``node_id`` in one transaction (so none
        issued meanwhile escapes); the serials newly revoked, or None when the node
        never had a certificate."""

    def revocation_epoch(self) -> int:
        """A number that grows with every revocation (so CRL caches know when to renew)."""

    def add_token(
        self, token_hash: str, node_id: str, created: datetime, expires: datetime
    ) -> None:
        """Record an enrollment token."""

    def token(self, token_hash: str) -> Token | None: ...

    def tokens(self) -> dict[str, Token]:
        """Every enrollment token, by its hash."""

    def add_admin_token(
        self, token_hash: str, label: str, created: datetime, expires: datetime
    ) -> str:
        """Record an admin bearer token; return its public id."""

    def admin_token(self, token_hash: str) -> AdminToken | None:
        """A known admin token (whatever its state), else None."""

    def admin_tokens(self) -> list[AdminToken]:
        """Every admin token, oldest first."""

    def revoke_admin_token(self, token_id: str, when: datetime, *, actor: str | None) -> bool:
        """Revoke the admin token with this id; False when it was revoked already.
        :class:`UnknownCertificate` when no token has that id."""

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        """The latest entries, newest first."""

    def audit_event(
        self,
        event: str,
        *,
        detail: Mapping[str, object],
        now: datetime,
        actor: str = "cli",
        node_id: str | None = None,
    ) -> None:
        """Record an event that changes no other table (a CA renewal, a refused
        enrollment), about ``node_id`` when it concerns one."""


def backup_database(source: Path, path: Path, *, replace: bool = False) -> None:
    """Copy the SQLite database ``source`` (ca.db, mesh.db, ...) into the new file
    ``path``, consistently, while other connections and processes go on reading and
    writing it: SQLite's online backup in a single step, so the copy is the database as
    of one commit (in WAL mode writers are not held up meanwhile).

    The copy is one self-contained file (rollback journal, no ``-wal``), mode 0600, that
    passes ``PRAGMA integrity_check``; it is written under a temporary name, fsynced and
    then linked into place, so ``path`` is whole or absent, and an existing ``path`` is
    never replaced (:class:`FileExistsError`) unless ``replace``: then it is renamed
    over, so ``path`` is the old file or the new one, never a mix. To restore it, stop
    the process that owns the database and put the copy in its place, with no ``-wal``
    or ``-shm`` file of the old one beside it (docs/operations.md)."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such database")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give the backup's file name")
    if not replace and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} already exists; refusing to overwrite a backup")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # SQLite takes it
    try:
        # Opened read-write (a read-only connection cannot always open a WAL database),
        # but it only reads: one read transaction for the whole copy.
        with (
            contextlib.closing(sqlite3.connect(source, timeout=30)) as live,
            contextlib.closing(sqlite3.connect(tmp, isolation_level=None)) as copy,
        ):
            live.backup(copy)  # pages=-1: every page in one step, one snapshot
            copy.execute("PRAGMA journal_mode=DELETE")  # a single file, no -wal
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"the copy of {source} is damaged: {check}")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path appeared meanwhile, unlike rename
        fsync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


TOKEN_COLUMNS = "node_id, created_at, expires_at, used_at, used_serial"  # noqa: S105 (columns)
# Every record a CA keeps, by table: its columns, and a unique key that orders the rows
# the same in any store (SqlCaStore.records: a copy compared row by row).
RECORDS = {
    "certificates": (COLUMNS, "serial"),
    "tokens": (f"hash, {TOKEN_COLUMNS}", "hash"),
    "admin_tokens": ("hash, label, created_at, id, expires_at, revoked_at", "hash"),
    "audit": ("id, at, event, node_id, serial, actor, detail", "id"),
    "meta": ("key, value", "key"),
}


def _token(row: Sequence[Any]) -> Token:
    """A token from its TOKEN_COLUMNS."""
    node_id, created, expires, used, used_serial = row
    return Token(
        node_id=node_id,
        created_at=datetime.fromtimestamp(created, UTC),
        expires_at=datetime.fromtimestamp(expires, UTC),
        used_at=_time(used),
        used_serial=None if used_serial is None else int(used_serial, 16),
    )


def _time(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _seconds(when: datetime) -> int:
    return int(when.timestamp())


class Handle(Protocol):
    """What the store's queries run on: a SQLite connection, or a PostgreSQL one behind
    :class:`trustmesh.pki.pgstore.PostgresStore`'s adapter. The SQL is written once, for
    SQLite (``?`` placeholders, ``rowid`` for the order rows were added in)."""

    def execute(self, sql: str, args: Sequence[object] = (), /) -> Cursor: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class SqlCaStore(abc.ABC):
    """:class:`CaStore` over SQL: every decision in the transaction that acts on it.
    A subclass gives the transactions (:meth:`_write`, one at a time: SQLite's single
    writer, PostgreSQL's advisory lock) and the read connections (:meth:`_read`)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _write(self, *, shared: bool = False) -> contextlib.AbstractContextManager[Handle]:
        """One write transaction: committed when the block ends, rolled back if it
        raises; no other write transaction of this database runs meanwhile, except
        ``shared`` ones beside each other. Only a transaction whose own decisions are
        each one row's, taken by the statement that writes it, may be ``shared`` (a
        store with one writer, as SQLite, runs it alone all the same)."""

    @abc.abstractmethod
    def _read(self) -> contextlib.AbstractContextManager[Handle]:
        """A connection for reads (each statement sees what was committed before it)."""

    def ping(self) -> None:
        with self._read() as db:
            db.execute("SELECT 1").fetchone()

    def records(self, table: str) -> list[tuple[object, ...]]:
        """Every row of ``table`` (a key of RECORDS), in its key's order."""
        columns, key = RECORDS[table]
        with self._read() as db:
            rows = db.execute(f"SELECT {columns} FROM {table} ORDER BY {key}").fetchall()  # noqa: S608
        return [tuple(row) for row in rows]

    def check_unclaimed(self) -> None:
        with self._read() as db:
            self._refuse_if_taken(db)

    def claim(self, ca_id: int, *, new: bool) -> None:
        if not new:
            with self._read() as db:
                if self.bound_ca(db) == ca_id:
                    return  # bound already: no write transaction on every open
        with self._write() as db:
            if new:
                self._refuse_if_taken(db)
            bound = self.bound_ca(db)
            if bound is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('issuing_ca', ?)", (ca_id,))
            elif bound != ca_id:
                raise PkiError(
                    "the database holds the records of another CA (its issuing key is not"
                    " this CA's): check --db"
                )

    @staticmethod
    def bound_ca(db: Handle) -> int | None:
        """The CA the database is bound to (:meth:`claim`), if any."""
        row = db.execute("SELECT value FROM meta WHERE key = 'issuing_ca'").fetchone()
        return None if row is None else int(row[0])

    @classmethod
    def _refuse_if_taken(cls, db: Handle) -> None:
        if cls.bound_ca(db) is not None or cls.holds_records(db):
            raise PkiError("the database already holds a CA's records; give an empty one")

    @staticmethod
    def holds_records(db: Handle) -> bool:
        """Whether any table but meta has a row."""
        return any(
            db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None  # noqa: S608
            for table in RECORDS
            if table != "meta"
        )

    def schema_version(self) -> int:
        """The schema version the database is at (migrations.HISTORY)."""
        with self._read() as db:
            return schema_version(db)

    # --- certificates -------------------------------------------------------------------

    def add(self, cert: IssuedCertificate, *, event: str, actor: str | None, now: datetime) -> None:
        self.add_many([cert], event=event, actor=actor, now=now)

    def add_many(
        self, certs: Iterable[IssuedCertificate], *, event: str, actor: str | None, now: datetime
    ) -> None:
        """Record certificates in one transaction (one commit for a batch)."""
        with self._write() as db:
            for cert in certs:
                self._insert(db, cert, event, actor, now)

    def enroll(
        self,
        token_hash: str,
        cert: IssuedCertificate,
        *,
        now: datetime,
        max_nodes: int | None,
        actor: str | None,
        audit: Mapping[str, object] | None = None,
    ) -> IssuedCertificate:
        # The node cap counts every node, so it needs the transaction alone. Without it,
        # the only decision is the token's row (a conditional UPDATE, which waits for a
        # racing one to commit and then sees its spend), so enrollments run beside each
        # other; still never beside a rotation or a revocation, whose decisions read the
        # node's certificates, which an enrollment adds to.
        with self._write(shared=max_nodes is None) as db:
            # Spending the token is the first write: of any number of racing requests,
            # exactly one finds it unused.
            spent = db.execute(
                "UPDATE tokens SET used_at = ?, used_serial = ?"
                " WHERE hash = ? AND used_at IS NULL AND expires_at > ? AND node_id = ?",
                (_seconds(now), cert.serial_hex, token_hash, _seconds(now), cert.node_id),
            ).rowcount
            if not spent:
                earlier = self._earlier_enrollment(db, token_hash, cert, now)
                if earlier is not None:
                    self._audit(
                        db,
                        now,
                        "enroll-retry",
                        earlier.node_id,
                        earlier.serial_hex,
                        actor,
                        {"spki_sha256": earlier.spki_sha256},
                    )
                    return earlier
                raise TokenRejected(self._why_unusable(db, token_hash, cert.node_id, now))
            if max_nodes is not None and not self._is_active(db, cert.node_id, now):
                active = self._active_nodes(db, now)
                if active >= max_nodes:
                    raise PolicyDenied(f"the mesh is full: {active} of {max_nodes} nodes enrolled")
            self._insert(db, cert, "enroll", actor, now, audit)
        return cert

    def rotate(
        self,
        current: int,
        cert: IssuedCertificate,
        *,
        now: datetime,
        actor: str | None,
        claimed_serial: int | None = None,
        audit: Mapping[str, object] | None = None,
    ) -> IssuedCertificate:
        with self._write() as db:
            found = self._select_in(db, "WHERE serial = ?", (format(current, "x"),))
            if not found:
                raise NotAuthenticated("the client certificate is not one this CA issued")
            old = found[0]
            if old.role != "node":
                raise PolicyDenied(f"only node certificates rotate here, not {old.role} ones")
            if old.node_id != cert.node_id:
                raise PolicyDenied(f"certificate {old.serial_hex} is not {cert.node_id!r}'s")
            # The currency check, in the transaction that issues: a revocation (by serial
            # or by node_id) that committed after the TLS handshake is seen here.
            if old.revoked_at is not None:
                raise CertificateRevoked(
                    f"certificate {old.serial_hex} of {old.node_id!r} is revoked ({old.reason})"
                )
            if old.not_after <= now:
                raise CertificateExpired(
                    f"certificate {old.serial_hex} of {old.node_id!r} expired at"
                    f" {old.not_after.isoformat()}"
                )
            successors = self._select_in(db, "WHERE replaces = ? ORDER BY rowid", (old.serial_hex,))
            for successor in successors:
                if successor.spki_sha256 == cert.spki_sha256 and successor.is_live(now):
                    # A retry for the key already certified: the same answer again.
                    self._audit(
                        db,
                        now,
                        "rotate-retry",
                        successor.node_id,
                        successor.serial_hex,
                        actor,
                        self._rotation_detail(old, claimed_serial),
                    )
                    return successor
            if successors:
                raise Superseded(
                    f"certificate {old.serial_hex} was already replaced by"
                    f" {successors[-1].serial_hex}; rotate with the newest certificate"
                )
            newer = db.execute(
                "SELECT serial FROM certificates WHERE node_id = ? AND role = 'node'"
                " AND revoked_at IS NULL AND not_after > ? AND rowid >"
                " (SELECT rowid FROM certificates WHERE serial = ?)"
                " ORDER BY rowid DESC LIMIT 1",
                (old.node_id, _seconds(now), old.serial_hex),
            ).fetchone()
            if newer is not None:
                raise Superseded(
                    f"{old.node_id!r} holds a newer certificate ({newer[0]}) than"
                    f" {old.serial_hex}; rotate with the newest certificate"
                )
            record = replace(cert, replaces=old.serial)
            detail = {**self._rotation_detail(old, claimed_serial), **(audit or {})}
            self._insert(db, record, "rotate", actor, now, detail)
        return record

    def get(self, serial: int) -> IssuedCertificate | None:
        rows = self._select("WHERE serial = ?", (format(serial, "x"),))
        return rows[0] if rows else None

    def by_node(self, node_id: str) -> list[IssuedCertificate]:
        return self._select("WHERE node_id = ? ORDER BY not_before, rowid", (node_id,))

    def all(self) -> list[IssuedCertificate]:
        return self._select("ORDER BY not_before, rowid", ())

    def revoked(self) -> list[IssuedCertificate]:
        return self._select("WHERE revoked_at IS NOT NULL ORDER BY revoked_at", ())

    def crl_entries(self, expired_before: datetime) -> list[CrlEntry]:
        with self._read() as db:
            return self._crl_entries(db, expired_before)

    def next_crl(self, expired_before: datetime, *, at_least: int) -> tuple[int, list[CrlEntry]]:
        with self._write() as db:
            row = db.execute(
                "UPDATE meta SET value = CASE WHEN value + 1 > ? THEN value + 1 ELSE ? END"
                " WHERE key = 'crl_number' RETURNING value",
                (at_least, at_least),
            ).fetchone()
            return int(row[0]), self._crl_entries(db, expired_before)

    @staticmethod
    def _crl_entries(db: Handle, expired_before: datetime) -> list[CrlEntry]:
        rows = db.execute(
            "SELECT serial, revoked_at, reason FROM certificates"
            " WHERE revoked_at IS NOT NULL AND not_after >= ? ORDER BY revoked_at, serial",
            (_seconds(expired_before),),
        ).fetchall()
        return [
            CrlEntry(int(serial, 16), datetime.fromtimestamp(at, UTC), reason)
            for serial, at, reason in rows
        ]

    def revoke(
        self, serials: list[int], when: datetime, reason: str, *, actor: str | None
    ) -> list[int]:
        with self._write() as db:
            return self._revoke(db, [format(s, "x") for s in serials], when, reason, actor)

    def revoke_node(
        self, node_id: str, when: datetime, reason: str, *, actor: str | None
    ) -> list[int] | None:
        with self._write() as db:
            # Only node certificates: an admin or the API server may share the name.
            serials = [
                row[0]
                for row in db.execute(
                    "SELECT serial FROM certificates WHERE node_id = ? AND role = 'node'"
                    " ORDER BY rowid",
                    (node_id,),
                )
            ]
            if not serials:
                return None
            return self._revoke(db, serials, when, reason, actor)

    def revocation_epoch(self) -> int:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'revocation_epoch'").fetchone()
        return int(row[0])

    # --- tokens -------------------------------------------------------------------------

    def add_token(
        self, token_hash: str, node_id: str, created: datetime, expires: datetime
    ) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO tokens (hash, node_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (token_hash, node_id, _seconds(created), _seconds(expires)),
            )
            detail = {"expires_at": expires.isoformat()}
            self._audit(db, created, "token", node_id, None, "cli", detail)

    def tokens(self) -> dict[str, Token]:
        """Every enrollment token, by its hash."""
        with self._read() as db:
            rows = db.execute(f"SELECT hash, {TOKEN_COLUMNS} FROM tokens").fetchall()  # noqa: S608
        return {row[0]: _token(row[1:]) for row in rows}

    def token(self, token_hash: str) -> Token | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?",  # noqa: S608
                (token_hash,),
            ).fetchone()
        return None if row is None else _token(row)

    def add_admin_token(
        self, token_hash: str, label: str, created: datetime, expires: datetime
    ) -> str:
        token_id = admin_token_id(token_hash)
        with self._write() as db:
            db.execute(
                "INSERT INTO admin_tokens (hash, label, created_at, id, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (token_hash, label, _seconds(created), token_id, _seconds(expires)),
            )
            detail = {"label": label, "id": token_id, "expires_at": expires.isoformat()}
            self._audit(db, created, "admin-token", None, None, "cli", detail)
        return token_id

    def admin_token(self, token_hash: str) -> AdminToken | None:
        rows = self._admin_tokens("WHERE hash = ?", (token_hash,))
        return rows[0] if rows else None

    def admin_tokens(self) -> list[AdminToken]:
        return self._admin_tokens("ORDER BY created_at, rowid", ())

    def revoke_admin_token(self, token_id: str, when: datetime, *, actor: str | None) -> bool:
        with self._write() as db:
            row = db.execute(
                "SELECT label, revoked_at FROM admin_tokens WHERE id = ?", (token_id,)
            ).fetchone()
            if row is None:
                raise UnknownAdminToken(f"no admin token has the id {token_id!r}")
            if row[1] is not None:
                return False
            db.execute(
                "UPDATE admin_tokens SET revoked_at = ? WHERE id = ?", (_seconds(when), token_id)
            )
            detail = {"label": row[0], "id": token_id}
            self._audit(db, when, "admin-token-revoke", None, None, actor, detail)
        return True

    # --- audit --------------------------------------------------------------------------

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        with self._read() as db:
            rows = db.execute(
                "SELECT at, event, node_id, serial, actor, detail FROM audit"
                " ORDER BY id DESC LIMIT ?",
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
        self,
        event: str,
        *,
        detail: Mapping[str, object],
        now: datetime,
        actor: str = "cli",
        node_id: str | None = None,
    ) -> None:
        with self._write() as db:
            self._audit(db, now, event, node_id, None, actor, detail)

    # --- internals ----------------------------------------------------------------------

    def _insert(
        self,
        db: Handle,
        cert: IssuedCertificate,
        event: str,
        actor: str | None,
        now: datetime,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        db.execute(
            f"INSERT INTO certificates ({COLUMNS})"  # noqa: S608
            " VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?)",
            (
                cert.serial_hex,
                cert.node_id,
                cert.role,
                _seconds(cert.not_before),
                _seconds(cert.not_after),
                cert.pem,
                cert.replaces_hex,
                cert.spki_sha256,
            ),
        )
        detail = {"role": cert.role, "not_after": cert.not_after.isoformat(), **(extra or {})}
        self._audit(db, now, event, cert.node_id, cert.serial_hex, actor, detail)

    @staticmethod
    def _rotation_detail(old: IssuedCertificate, claimed: int | None) -> dict[str, object]:
        return {
            "replaces": old.serial_hex,
            "current_cert_serial": None if claimed is None else format(claimed, "x"),
        }

    def _revoke(
        self,
        db: Handle,
        serials: list[str],
        when: datetime,
        reason: str,
        actor: str | None,
    ) -> list[int]:
        marked = []
        for hexed in serials:
            row = db.execute(
                "UPDATE certificates SET revoked_at = ?, reason = ?"
                " WHERE serial = ? AND revoked_at IS NULL RETURNING node_id",
                (_seconds(when), reason, hexed),
            ).fetchone()
            if row is not None:
                marked.append(int(hexed, 16))
                self._audit(db, when, "revoke", row[0], hexed, actor, {"reason": reason})
        if marked:
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revocation_epoch'")
        return marked

    def _earlier_enrollment(
        self, db: Handle, token_hash: str, cert: IssuedCertificate, now: datetime
    ) -> IssuedCertificate | None:
        """The live certificate this token already bought for the same node and public
        key (the client lost the answer and asks again), else None."""
        row = db.execute(
            "SELECT used_serial FROM tokens WHERE hash = ? AND node_id = ? AND used_at IS NOT NULL",
            (token_hash, cert.node_id),
        ).fetchone()
        if row is None or row[0] is None:
            return None
        found = self._select_in(db, "WHERE serial = ?", (row[0],))
        if not found:
            return None
        earlier = found[0]
        if earlier.spki_sha256 != cert.spki_sha256 or not earlier.is_live(now):
            return None
        return earlier

    @staticmethod
    def _audit(
        db: Handle,
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
    def _why_unusable(db: Handle, token_hash: str, node_id: str, now: datetime) -> str:
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
    def _is_active(db: Handle, node_id: str, now: datetime) -> bool:
        return (
            db.execute(
                "SELECT 1 FROM certificates WHERE node_id = ? AND role = 'node'"
                " AND revoked_at IS NULL AND not_after > ? LIMIT 1",
                (node_id, _seconds(now)),
            ).fetchone()
            is not None
        )

    @staticmethod
    def _active_nodes(db: Handle, now: datetime) -> int:
        row = db.execute(
            "SELECT COUNT(DISTINCT node_id) FROM certificates WHERE role = 'node'"
            " AND revoked_at IS NULL AND not_after > ?",
            (_seconds(now),),
        ).fetchone()
        return int(row[0])

    def _select(self, where: str, args: tuple[object, ...]) -> list[IssuedCertificate]:
        with self._read() as db:
            return self._select_in(db, where, args)

    @staticmethod
    def _select_in(db: Handle, where: str, args: tuple[object, ...]) -> list[IssuedCertificate]:
        # ``where`` is always one of this class's constant clauses, never input.
        query = f"SELECT {COLUMNS} FROM certificates {where}"  # noqa: S608
        rows = db.execute(query, args).fetchall()
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
                replaces=None if replaces is None else int(replaces, 16),
                spki_sha256=spki,
            )
            for (serial, node_id, role, nb, na, pem, revoked_at, reason, replaces, spki) in rows
        ]

    def _admin_tokens(self, where: str, args: tuple[object, ...]) -> list[AdminToken]:
        query = (
            "SELECT id, label, created_at, expires_at, revoked_at"  # noqa: S608
            f" FROM admin_tokens {where}"
        )
        with self._read() as db:
            rows = db.execute(query, args).fetchall()
        return [
            AdminToken(
                id=token_id,
                label=label,
                created_at=datetime.fromtimestamp(created, UTC),
                expires_at=datetime.fromtimestamp(expires, UTC),
                revoked_at=_time(revoked),
            )
            for token_id, label, created, expires, revoked in rows
        ]


class SqliteStore(SqlCaStore):
    """:class:`CaStore` on one SQLite file, usable from any thread: its one connection
    is used by one thread at a time, so a read never sees another thread's write
    transaction half done."""

    kind = "sqlite"
    remote = False

    def __init__(self, path: Path) -> None:
        self.path = path
        # Waits for another process's write transaction instead of failing at once.
        self._db = open_database(path, "", synchronous="FULL", busy_timeout=30)
        self._lock = threading.RLock()
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _write(self, *, shared: bool = False) -> Iterator[Handle]:
        with self._lock, transaction(self._db) as db:  # SQLite has one writer anyway
            yield db

    def snapshot(self) -> contextlib.AbstractContextManager[Handle]:
        """One transaction over the whole database, for a consistent copy of it (other
        writers wait meanwhile): what ``trustmesh ca migrate`` reads."""
        return self._write()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Handle]:
        with self._lock:
            yield self._db

    def backup_to(self, path: Path) -> None:
        """A consistent copy of this database, as of its last commit, in the new file
        ``path``, while the CA goes on (:func:`backup_database`)."""
        backup_database(self.path, path)

    def _migrate(self) -> None:
        """Bring the database to the latest schema version (migrations.HISTORY), in one
        transaction, so a crash (or a second process opening it) never sees half of it."""
        with self._write() as db:
            migrate(db, {1: _sqlite_base, 2: _sqlite_crl_number}, now=int(time.time()))


def _sqlite_base(db: Executes) -> None:
    """Version 1: the tables; and a database of a release before this history brought
    up to them: the columns it lacks added and filled from what it holds, and their
    indexes."""
    for statement in statements(SCHEMA):
        db.execute(statement)
    for table, column, kind in ADDED_COLUMNS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    for serial, pem in db.execute(
        "SELECT serial, pem FROM certificates WHERE spki_sha256 IS NULL"
    ).fetchall():
        key = x509.load_pem_x509_certificate(pem.encode()).public_key()
        db.execute(
            "UPDATE certificates SET spki_sha256 = ? WHERE serial = ?",
            (spki_sha256(key), serial),
        )
    db.execute(
        "UPDATE admin_tokens SET id = substr(hash, 1, ?) WHERE id IS NULL",
        (ADMIN_TOKEN_ID_LENGTH,),
    )
    # Tokens made before admin tokens expired: a day from their creation.
    db.execute(
        "UPDATE admin_tokens SET expires_at = created_at + ? WHERE expires_at IS NULL",
        (LEGACY_ADMIN_TOKEN_TTL,),
    )
    for statement in statements(INDEXES):
        db.execute(statement)


def _sqlite_crl_number(db: Executes) -> None:
    """Version 2: the CRL number counter (SqlCaStore.next_crl)."""
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('crl_number', 0)")
