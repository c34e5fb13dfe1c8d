"""The bundle store: what a node holds for delivery or forwarding, in SQLite.

WAL with ``synchronous=FULL``: a bundle whose ``add`` returned survives kill -9 and a
power cut, so that a node acknowledges custody (a 201, a BUNDLE_ACK) only once it can no
longer lose the bundle. Each row is one bundle in one role:

- ``inbox``: delivered here, kept until the application acknowledges it (DELETE);
- ``forwarding``: held for another node, until the next hop took custody or it expires;
- ``fragment``: a fragment addressed here, kept until its bundle is whole.

``delivered`` remembers the ids delivered here until they expire, so a duplicate that
arrives after the application acknowledged the original is still dropped.

The disk is bounded by quotas on bytes, for the whole store and for each source node; a
bundle over either is refused with :class:`StoreFullError` or :class:`SourceQuotaError`.
Running totals are counted at open and kept in memory (the store is its file's only
writer), so a check walks no index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trustmesh.errors import ProtocolError
from trustmesh.sqlitedb import open_database, transaction

Role = Literal["inbox", "forwarding", "fragment"]
ROLES: tuple[Role, ...] = ("inbox", "forwarding", "fragment")

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_SOURCE_BYTES = 32 * 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    bundle_id TEXT NOT NULL,
    role TEXT NOT NULL,
    source TEXT NOT NULL,
    signer TEXT NOT NULL,
    destination TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    copies INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (bundle_id, role)
);
CREATE INDEX IF NOT EXISTS bundles_expires ON bundles (expires_ms);
CREATE INDEX IF NOT EXISTS bundles_role ON bundles (role, received_at);
CREATE INDEX IF NOT EXISTS bundles_destination ON bundles (destination, role);
CREATE INDEX IF NOT EXISTS bundles_signer ON bundles (signer);
CREATE TABLE IF NOT EXISTS delivered (
    bundle_id TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS delivered_expires ON delivered (expires_ms);
"""


class StoreError(ProtocolError):
    """The store cannot take a bundle (the request was well formed)."""


class StoreFullError(StoreError):
    """The node's bundle store is at its byte quota (HTTP 507)."""


class SourceQuotaError(StoreError):
    """The source node's share of the store is used up (HTTP 429)."""


@dataclass(frozen=True, slots=True)
class StoredBundle:
    bundle_id: str  # the text form, <source>:<creation ms>:<seq>[:<offset>]
    role: Role
    source: str  # the source's node_id
    signer: str  # the serial (hex) of the certificate that signed it: revoked, it goes
    destination: str  # the destination EID's text
    created_ms: int  # Unix ms
    expires_ms: int  # Unix ms
    copies: int  # spray-and-wait copies held (forwarding); 1 otherwise
    received_at: int  # Unix ms
    data: bytes  # the bundle, as received (signed)

    @property
    def size(self) -> int:
        return len(self.data)


_COLUMNS = (
    "bundle_id, role, source, signer, destination, created_ms, expires_ms, copies,"
    " received_at, data"
)


def _row(values: tuple[object, ...]) -> StoredBundle:
    return StoredBundle(*values)  # type: ignore[arg-type]


class BundleStore:
    """A node's ``bundles.db``; see the module docstring. Not thread-safe: one owner."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_source_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
        durable: bool = True,
    ) -> None:
        """``durable=False`` (the simulator's in-memory stores) skips the fsyncs."""
        if max_bytes < 1 or max_source_bytes < 1:
            raise ValueError("the bundle quotas must be positive")
        self.max_bytes = max_bytes
        self.max_source_bytes = max_source_bytes
        if durable:
            self._db = open_database(Path(path), SCHEMA, synchronous="FULL", busy_timeout=5)
        else:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.executescript(SCHEMA)
        self.bytes_used = 0
        self._by_source: dict[str, int] = {}
        for source, used in self._db.execute(
            "SELECT source, sum(length(data)) FROM bundles GROUP BY source"
        ):
            self._by_source[source] = int(used)
            self.bytes_used += int(used)

    def close(self) -> None:
        self._db.close()

    # --- writes (each one transaction, durable when it returns) --------------------------

    def add(self, bundle: StoredBundle, *, delivered: bool = False) -> bool:
        """Keep ``bundle``; False if this id is held in this role already (or, with
        ``delivered``, was delivered before: the duplicate is dropped). ``delivered``
        also records the id as delivered, in the same transaction. Raises
        :class:`StoreFullError` or :class:`SourceQuotaError` over a quota."""
        self._check_quota(bundle.source, bundle.size)
        with transaction(self._db) as db:
            if (
                delivered
                and db.execute(
                    "SELECT 1 FROM delivered WHERE bundle_id = ?", (bundle.bundle_id,)
                ).fetchone()
            ):
                return False
            added = self._insert(db, bundle)
            if delivered:
                db.execute(
                    "INSERT OR IGNORE INTO delivered VALUES (?, ?)",
                    (bundle.bundle_id, bundle.expires_ms),
                )
        if added:  # counted once committed: a failed commit leaves the totals true
            self._take(bundle.source, bundle.size)
        return added

    def add_many(self, bundles: Iterable[StoredBundle]) -> list[bool]:
        """Several bundles in one transaction (one fsync); quotas as :meth:`add`. On a
        quota error nothing is kept."""
        rows = list(bundles)
        self._check_quota_many(rows)
        with transaction(self._db) as db:
            added = [self._insert(db, bundle) for bundle in rows]
        for row, new in zip(rows, added, strict=True):
            if new:
                self._take(row.source, row.size)
        return added

    def deliver_whole(
        self,
        whole: StoredBundle | None,
        fragment_ids: Iterable[str],
        *,
        whole_id: str,
        expires_ms: int,
    ) -> bool:
        """Reassembled (or given up): the fragments go, ``whole_id`` is recorded as
        delivered, and ``whole`` (if any) goes to the inbox, in one transaction. False
        if ``whole_id`` was delivered before."""
        ids = list(fragment_ids)
        with transaction(self._db) as db:
            freed = [gone for bundle_id in ids if (gone := self._delete(db, bundle_id, "fragment"))]
            duplicate = db.execute(
                "SELECT 1 FROM delivered WHERE bundle_id = ?", (whole_id,)
            ).fetchone()
            added = not duplicate and whole is not None and self._insert(db, whole)
            db.execute("INSERT OR IGNORE INTO delivered VALUES (?, ?)", (whole_id, expires_ms))
        for source, size in freed:
            self._release(source, size)
        if added and whole is not None:
            self._take(whole.source, whole.size)
        return not duplicate

    def mark_delivered(self, bundle_id: str, expires_ms: int) -> None:
        """Record a delivery that keeps no inbox row (a mesh service consumed it)."""
        with transaction(self._db) as db:
            db.execute("INSERT OR IGNORE INTO delivered VALUES (?, ?)", (bundle_id, expires_ms))

    def delete(self, bundle_id: str, role: Role) -> bool:
        with transaction(self._db) as db:
            gone = self._delete(db, bundle_id, role)
        if gone is None:
            return False
        self._release(*gone)
        return True

    def set_copies(self, bundle_id: str, copies: int) -> None:
        with transaction(self._db) as db:
            db.execute(
                "UPDATE bundles SET copies = ? WHERE bundle_id = ? AND role = 'forwarding'",
                (copies, bundle_id),
            )

    def expire(self, now_ms: int) -> list[tuple[str, Role]]:
        """Purge every bundle whose lifetime ended, and the delivered ids of those; return
        the (id, role) pairs purged."""
        with transaction(self._db) as db:
            gone = [
                (str(bundle_id), role, str(source), int(size))
                for bundle_id, role, source, size in db.execute(
                    "SELECT bundle_id, role, source, length(data) FROM bundles"
                    " WHERE expires_ms <= ?",
                    (now_ms,),
                )
            ]
            db.execute("DELETE FROM bundles WHERE expires_ms <= ?", (now_ms,))
            db.execute("DELETE FROM delivered WHERE expires_ms <= ?", (now_ms,))
        for _, _, source, size in gone:
            self._release(source, size)
        return [(bundle_id, role) for bundle_id, role, _, _ in gone]

    def purge_signers(self, serials: Iterable[str]) -> list[tuple[str, Role]]:
        """Drop every bundle signed by one of these certificates (revoked)."""
        gone: list[tuple[str, Role, str, int]] = []
        with transaction(self._db) as db:
            for serial in serials:
                gone += [
                    (str(i), r, str(s), int(n))
                    for i, r, s, n in db.execute(
                        "DELETE FROM bundles WHERE signer = ?"
                        " RETURNING bundle_id, role, source, length(data)",
                        (serial,),
                    )
                ]
        for _, _, source, size in gone:
            self._release(source, size)
        return [(bundle_id, role) for bundle_id, role, _, _ in gone]

    # --- reads ---------------------------------------------------------------------------

    def get(self, bundle_id: str, role: Role) -> StoredBundle | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM bundles WHERE bundle_id = ? AND role = ?",  # noqa: S608
            (bundle_id, role),
        ).fetchone()
        return _row(row) if row is not None else None

    def holds(self, bundle_id: str) -> bool:
        """Held here in any role, or delivered here before."""
        return bool(
            self._db.execute("SELECT 1 FROM bundles WHERE bundle_id = ?", (bundle_id,)).fetchone()
            or self._db.execute(
                "SELECT 1 FROM delivered WHERE bundle_id = ?", (bundle_id,)
            ).fetchone()
        )

    def was_delivered(self, bundle_id: str) -> bool:
        return bool(
            self._db.execute("SELECT 1 FROM delivered WHERE bundle_id = ?", (bundle_id,)).fetchone()
        )

    def items(self, role: Role, *, limit: int = 1000) -> list[StoredBundle]:
        """The bundles in ``role``, oldest received first."""
        return [
            _row(row)
            for row in self._db.execute(
                f"SELECT {_COLUMNS} FROM bundles WHERE role = ?"  # noqa: S608
                " ORDER BY received_at, bundle_id LIMIT ?",
                (role, limit),
            )
        ]

    def forwarding_for(self, destinations: Iterable[str], *, limit: int) -> list[StoredBundle]:
        """Bundles held for forwarding to any of ``destinations`` (EID texts)."""
        out: list[StoredBundle] = []
        for destination in destinations:
            out += [
                _row(row)
                for row in self._db.execute(
                    f"SELECT {_COLUMNS} FROM bundles"  # noqa: S608
                    " WHERE destination = ? AND role = 'forwarding'"
                    " ORDER BY received_at LIMIT ?",
                    (destination, limit - len(out)),
                )
            ]
            if len(out) >= limit:
                break
        return out

    def spreadable(self, *, limit: int) -> list[StoredBundle]:
        """Held bundles any peer may take, the newest first: broadcasts (``dtn://~``),
        and bundles with copies to spare."""
        return [
            _row(row)
            for row in self._db.execute(
                f"SELECT {_COLUMNS} FROM bundles WHERE role = 'forwarding'"  # noqa: S608
                " AND (copies > 1 OR destination LIKE 'dtn://~%')"
                " ORDER BY received_at DESC LIMIT ?",
                (limit,),
            )
        ]

    def destinations(self, *, limit: int) -> list[str]:
        """The singleton destinations (EID texts) of held bundles, the newest first."""
        rows = self._db.execute(
            "SELECT destination FROM bundles WHERE role = 'forwarding'"
            " AND destination NOT LIKE 'dtn://~%'"
            " GROUP BY destination ORDER BY max(received_at) DESC LIMIT ?",
            (limit,),
        )
        return [str(destination) for (destination,) in rows]

    def holds_for(self, node_id: str) -> bool:
        """Whether a bundle for ``node_id`` is held for forwarding."""
        prefix = f"dtn://{node_id}/"
        return bool(
            self._db.execute(
                "SELECT 1 FROM bundles WHERE role = 'forwarding' AND destination >= ?"
                " AND destination < ? LIMIT 1",
                (prefix, prefix[:-1] + "0"),  # '0' sorts right after '/'
            ).fetchone()
        )

    def forwarding(self) -> Iterator[StoredBundle]:
        """Every bundle held for forwarding, oldest received first."""
        for row in self._db.execute(
            f"SELECT {_COLUMNS} FROM bundles WHERE role = 'forwarding'"  # noqa: S608
            " ORDER BY received_at, bundle_id"
        ):
            yield _row(row)

    def fragments_of(self, prefix: str) -> list[StoredBundle]:
        """The fragments held of the bundle whose id is ``prefix`` (no offset)."""
        return [
            _row(row)
            for row in self._db.execute(
                f"SELECT {_COLUMNS} FROM bundles"  # noqa: S608
                " WHERE role = 'fragment' AND bundle_id >= ? AND bundle_id < ?",
                (prefix + ":", prefix + ";"),  # ';' sorts right after ':'
            )
        ]

    def count(self, role: Role) -> int:
        return int(
            self._db.execute("SELECT count(*) FROM bundles WHERE role = ?", (role,)).fetchone()[0]
        )

    def source_bytes(self, source: str) -> int:
        return self._by_source.get(source, 0)

    # --- internals -----------------------------------------------------------------------

    def _check_quota(self, source: str, size: int) -> None:
        if self.bytes_used + size > self.max_bytes:
            raise StoreFullError(
                f"the bundle store is full ({self.bytes_used} of {self.max_bytes} bytes"
                f" used; a bundle of {size} bytes does not fit)"
            )
        if self._by_source.get(source, 0) + size > self.max_source_bytes:
            raise SourceQuotaError(
                f"{source} holds {self._by_source.get(source, 0)} of its"
                f" {self.max_source_bytes} bytes here; a bundle of {size} bytes does not fit"
            )

    def _check_quota_many(self, rows: list[StoredBundle]) -> None:
        total = sum(row.size for row in rows)
        if self.bytes_used + total > self.max_bytes:
            raise StoreFullError(
                f"the bundle store is full ({self.bytes_used} of {self.max_bytes} bytes used)"
            )
        by_source: dict[str, int] = {}
        for row in rows:
            by_source[row.source] = by_source.get(row.source, 0) + row.size
        for source, size in by_source.items():
            self._check_quota(source, size)

    def _insert(self, db: sqlite3.Connection, bundle: StoredBundle) -> bool:
        added = db.execute(
            "INSERT OR IGNORE INTO bundles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                bundle.bundle_id,
                bundle.role,
                bundle.source,
                bundle.signer,
                bundle.destination,
                bundle.created_ms,
                bundle.expires_ms,
                bundle.copies,
                bundle.received_at,
                bundle.data,
            ),
        ).rowcount
        return bool(added)

    def _delete(self, db: sqlite3.Connection, bundle_id: str, role: Role) -> tuple[str, int] | None:
        """Delete a row; its (source, size), to release once committed."""
        row = db.execute(
            "DELETE FROM bundles WHERE bundle_id = ? AND role = ? RETURNING source, length(data)",
            (bundle_id, role),
        ).fetchone()
        return (str(row[0]), int(row[1])) if row is not None else None

    def _take(self, source: str, size: int) -> None:
        self.bytes_used += size
        self._by_source[source] = self._by_source.get(source, 0) + size

    def _release(self, source: str, size: int) -> None:
        self.bytes_used -= size
        left = self._by_source.get(source, 0) - size
        if left > 0:
            self._by_source[source] = left
        else:
            self._by_source.pop(source, None)
