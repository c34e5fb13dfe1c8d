"""What a mesh node keeps across restarts, in SQLite: the gossip seen-cache, the anomaly
indicators it received, the newest CRL, and the signed peer records it holds.

WAL with ``synchronous=NORMAL``: a committed batch survives the process being killed
(only a power cut can lose the last one). The node API answers 202 to a gossip message
only once the batch that holds it has committed (node/api.py, group commit), so a 202
survives a kill -9. The node writes in batches, so a burst of gossip costs one commit,
not one per message.

The disk is bounded: seen ids go when their message expires and beyond ``capacity`` (the
seen-cache's); indicators go once older than ``indicator_max_age_ms`` (7 days) and beyond
``indicator_capacity`` rows (100,000), the oldest received first. Both tables' row counts
are counted at open and then kept up to date in memory, so a commit under the limits
deletes nothing and walks no index; one over them deletes just the excess, through the
index. (The counts assume the store is the file's only writer, as the node's is.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmesh.mesh.gossip import GossipMessage
from trustmesh.mesh.peers import PeerRecord
from trustmesh.pki.store import backup_database
from trustmesh.sqlitedb import open_database, transaction

DAY_MS = 24 * 3600 * 1000
DEFAULT_INDICATOR_MAX_AGE_MS = 7 * DAY_MS  # indicators older than this (received_at) go
DEFAULT_INDICATOR_CAPACITY = 100_000  # indicators kept at most, the newest received

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    message_id TEXT PRIMARY KEY,
    expiry INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expiry ON seen (expiry);
CREATE TABLE IF NOT EXISTS indicators (
    message_id TEXT PRIMARY KEY,
    origin TEXT NOT NULL,
    hash TEXT NOT NULL,
    kind TEXT NOT NULL,
    risk REAL NOT NULL,
    meta TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS indicators_received ON indicators (received_at);
CREATE INDEX IF NOT EXISTS indicators_hash ON indicators (hash);
CREATE TABLE IF NOT EXISTS crl (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    number INTEGER NOT NULL,
    der BLOB NOT NULL
);
DROP TABLE IF EXISTS peers;
CREATE TABLE IF NOT EXISTS peer_records (
    node_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS peer_records_expires ON peer_records (expires);
"""


@dataclass(frozen=True, slots=True)
class Indicator:
    """An anomaly signature received through gossip (never raw logs)."""

    message_id: str
    origin: str
    hash: str
    kind: str
    risk: float
    meta: dict[str, Any]
    timestamp: int  # when the origin made it, Unix ms
    received_at: int  # when this node took it, Unix ms

    @staticmethod
    def from_message(message: GossipMessage, received_at: int) -> Indicator:
        p = message.payload
        return Indicator(
            message.message_id,
            message.origin,
            p["hash"],
            p["kind"],
            float(p["risk"]),
            dict(p.get("meta", {})),
            message.timestamp,
            received_at,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "origin": self.origin,
            "hash": self.hash,
            "kind": self.kind,
            "risk": self.risk,
            "meta": self.meta,
            "timestamp": self.timestamp,
            "received_at": self.received_at,
        }


# The newest indicators after a time (LIMIT), given oldest first; of one hash, by its index.
_NEWEST_INDICATORS = (
    "SELECT * FROM (SELECT * FROM indicators WHERE received_at > ?"
    " ORDER BY received_at DESC, message_id LIMIT ?) ORDER BY received_at, message_id"
)
_NEWEST_OF_HASH = (
    "SELECT * FROM (SELECT * FROM indicators WHERE received_at > ? AND hash = ?"
    " ORDER BY received_at DESC, message_id LIMIT ?) ORDER BY received_at, message_id"
)


class MeshStore:
    """The node's ``mesh.db``. Indicators are kept at most ``indicator_max_age_ms`` after
    they were received, and at most ``indicator_capacity`` of them (the newest)."""

    def __init__(
        self,
        path: Path,
        *,
        indicator_max_age_ms: int = DEFAULT_INDICATOR_MAX_AGE_MS,
        indicator_capacity: int = DEFAULT_INDICATOR_CAPACITY,
    ) -> None:
        if indicator_max_age_ms < 1 or indicator_capacity < 1:
            raise ValueError("indicators need a positive age limit and capacity")
        self.path = path
        self.indicator_max_age_ms = indicator_max_age_ms
        self.indicator_capacity = indicator_capacity
        self._db = open_database(path, SCHEMA, synchronous="NORMAL", busy_timeout=5)
        # Running row counts (one count at open), so that pruning by count needs no scan.
        self._seen_rows = self._count("seen")
        self._indicator_rows = self._count("indicators")

    def _count(self, table: str) -> int:
        return int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608

    def close(self) -> None:
        self._db.close()

    def backup_to(self, path: Path) -> None:
        """A consistent copy of mesh.db, as of its last commit, in the new file ``path``,
        while the node goes on (:func:`trustmesh.pki.store.backup_database`)."""
        backup_database(self.path, path)

    def save(
        self,
        seen: Iterable[tuple[str, int]],
        indicators: Iterable[Indicator],
        *,
        capacity: int,
        now_ms: int,
    ) -> None:
        """One batch: new seen ids and indicators, then the pruning. Seen ids go once
        expired, and beyond ``capacity`` ids the soonest to expire go too (the cache is
        bounded); indicators go once older than the age limit, and beyond the capacity the
        oldest received go. Called with nothing new, it only prunes."""
        seen_rows, indicator_rows = self._seen_rows, self._indicator_rows
        with transaction(self._db) as db:
            seen_rows += db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", seen).rowcount
            indicator_rows += db.executemany(
                "INSERT OR IGNORE INTO indicators VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        i.message_id,
                        i.origin,
                        i.hash,
                        i.kind,
                        i.risk,
                        json.dumps(i.meta, sort_keys=True),
                        i.timestamp,
                        i.received_at,
                    )
                    for i in indicators
                ),
            ).rowcount
            # Each DELETE below is an index range: it reads only the rows it removes.
            seen_rows -= db.execute("DELETE FROM seen WHERE expiry <= ?", (now_ms,)).rowcount
            if seen_rows > capacity:  # the soonest to expire go
                seen_rows -= db.execute(
                    "DELETE FROM seen WHERE message_id IN (SELECT message_id FROM seen"
                    " ORDER BY expiry LIMIT ?)",
                    (seen_rows - capacity,),
                ).rowcount
            indicator_rows -= db.execute(
                "DELETE FROM indicators WHERE received_at < ?",
                (now_ms - self.indicator_max_age_ms,),
            ).rowcount
            if indicator_rows > self.indicator_capacity:  # the oldest received go
                indicator_rows -= db.execute(
                    "DELETE FROM indicators WHERE rowid IN (SELECT rowid FROM indicators"
                    " ORDER BY received_at, rowid LIMIT ?)",
                    (indicator_rows - self.indicator_capacity,),
                ).rowcount
        # Only once committed: a batch rolled back changes no count.
        self._seen_rows, self._indicator_rows = seen_rows, indicator_rows

    def seen(self) -> list[tuple[str, int]]:
        """Persisted seen ids, soonest to expire first."""
        rows = self._db.execute("SELECT message_id, expiry FROM seen ORDER BY expiry")
        return [(str(m), int(e)) for m, e in rows]

    def indicators(
        self, *, limit: int = 1000, since: int | None = None, hash: str | None = None
    ) -> list[Indicator]:
        """The newest ``limit`` indicators (received after ``since``, Unix ms; of the
        anomaly ``hash`` only, if given), oldest first."""
        after = since if since is not None else -1
        if hash is None:
            rows = self._db.execute(_NEWEST_INDICATORS, (after, limit)).fetchall()
        else:
            rows = self._db.execute(_NEWEST_OF_HASH, (after, hash, limit)).fetchall()
        return [
            Indicator(r[0], r[1], r[2], r[3], float(r[4]), json.loads(r[5]), r[6], r[7])
            for r in rows
        ]

    def indicator_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM indicators").fetchone()[0])

    def save_crl(self, number: int, der: bytes) -> None:
        with transaction(self._db) as db:
            db.execute(
                "INSERT INTO crl VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE"
                " SET number = excluded.number, der = excluded.der WHERE excluded.number > number",
                (number, der),
            )

    def crl(self) -> bytes | None:
        row = self._db.execute("SELECT der FROM crl WHERE id = 1").fetchone()
        return bytes(row[0]) if row else None

    # --- the peer table: signed peer records (mesh/peers.py) -----------------------------

    def save_peer_records(
        self, records: Iterable[PeerRecord], *, capacity: int, now_ms: int
    ) -> None:
        """Keep ``records`` (an upsert that never lowers a node's ``seq``); expired rows
        go, and beyond ``capacity`` rows the soonest to expire go too."""
        with transaction(self._db) as db:
            db.executemany(
                "INSERT INTO peer_records VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE"
                " SET seq = excluded.seq, expires = excluded.expires, record = excluded.record"
                " WHERE excluded.seq > seq",
                ((r.node_id, r.seq, r.expires, r.encode()) for r in records),
            )
            db.execute("DELETE FROM peer_records WHERE expires <= ?", (now_ms,))
            db.execute(
                "DELETE FROM peer_records WHERE node_id IN (SELECT node_id FROM peer_records"
                " ORDER BY expires DESC LIMIT -1 OFFSET ?)",
                (capacity,),
            )

    def forget_peers(self, node_ids: Iterable[str]) -> None:
        rows = [(n,) for n in node_ids]
        if rows:
            with transaction(self._db) as db:
                db.executemany("DELETE FROM peer_records WHERE node_id = ?", rows)

    def forget_peer(self, node_id: str) -> None:
        self.forget_peers([node_id])

    def peer_records(self) -> list[bytes]:
        """The records kept (encoded JSON, unchecked), the most recently signed first."""
        rows = self._db.execute("SELECT record FROM peer_records ORDER BY seq DESC, node_id")
        return [bytes(r[0]) for r in rows]
