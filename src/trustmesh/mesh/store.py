"""What a mesh node keeps across restarts, in SQLite: the gossip seen-cache, the anomaly
indicators it received, the newest CRL, and the peers it has heard of.

WAL with ``synchronous=NORMAL``: a committed batch survives the process being killed
(only a power cut can lose the last one, and a lost seen-id costs one duplicate, which
the seen-cache of the next hop absorbs). The node writes in batches, so a burst of
gossip costs one commit, not one per message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmesh.mesh.gossip import GossipMessage
from trustmesh.sqlitedb import open_database, transaction

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
CREATE TABLE IF NOT EXISTS crl (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    number INTEGER NOT NULL,
    der BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    last_seen INTEGER NOT NULL
);
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


class MeshStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_database(path, SCHEMA, synchronous="NORMAL", busy_timeout=5)

    def close(self) -> None:
        self._db.close()

    def save(
        self,
        seen: Iterable[tuple[str, int]],
        indicators: Iterable[Indicator],
        *,
        capacity: int,
        now_ms: int,
    ) -> None:
        """One batch: new seen ids and indicators; expired ids go, and beyond
        ``capacity`` ids the soonest to expire go too (the cache is bounded)."""
        with transaction(self._db) as db:
            db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", seen)
            db.executemany(
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
            )
            db.execute("DELETE FROM seen WHERE expiry <= ?", (now_ms,))
            db.execute(
                "DELETE FROM seen WHERE message_id IN (SELECT message_id FROM seen"
                " ORDER BY expiry DESC LIMIT -1 OFFSET ?)",
                (capacity,),
            )

    def seen(self) -> list[tuple[str, int]]:
        """Persisted seen ids, soonest to expire first."""
        rows = self._db.execute("SELECT message_id, expiry FROM seen ORDER BY expiry")
        return [(str(m), int(e)) for m, e in rows]

    def indicators(self, *, limit: int = 1000, since: int | None = None) -> list[Indicator]:
        """The newest ``limit`` indicators (received after ``since``, Unix ms), oldest first."""
        rows = self._db.execute(
            "SELECT * FROM (SELECT * FROM indicators WHERE received_at > ?"
            " ORDER BY received_at DESC, message_id LIMIT ?) ORDER BY received_at, message_id",
            (since if since is not None else -1, limit),
        ).fetchall()
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

    def remember_peer(self, node_id: str, address: str, last_seen: int) -> None:
        with transaction(self._db) as db:
            db.execute(
                "INSERT INTO peers VALUES (?, ?, ?) ON CONFLICT (node_id) DO UPDATE"
                " SET address = excluded.address, last_seen = excluded.last_seen",
                (node_id, address, last_seen),
            )

    def forget_peer(self, node_id: str) -> None:
        with transaction(self._db) as db:
            db.execute("DELETE FROM peers WHERE node_id = ?", (node_id,))

    def known_peers(self) -> list[tuple[str, str]]:
        rows = self._db.execute("SELECT node_id, address FROM peers ORDER BY last_seen DESC")
        return [(str(n), str(a)) for n, a in rows]
