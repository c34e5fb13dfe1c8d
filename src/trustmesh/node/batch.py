"""What a node writes to its store, in batches (docs/protocols/mesh-link.md section 10).

Seen ids and anomalies from gossip, and the peer records the core keeps or forgets,
wait here and are committed together every ``FLUSH_INTERVAL``: a burst of gossip costs
one commit. The API's 202 waits for the batch that holds its message (node/api.py).
"""

from __future__ import annotations

import asyncio

from trustmesh.clock import Clock
from trustmesh.mesh.engine import SeenCache
from trustmesh.mesh.gossip import GossipMessage
from trustmesh.mesh.peers import PeerRecord
from trustmesh.mesh.store import Indicator, MeshStore

FLUSH_INTERVAL = 0.2  # seconds between store commits
PRUNE_EVERY = 300  # flushes between age-limit passes of the store


class StoreBatch:
    def __init__(
        self, store: MeshStore, seen: SeenCache, *, record_capacity: int, clock: Clock
    ) -> None:
        self.store = store
        self.seen = seen
        self.record_capacity = record_capacity
        self.clock = clock
        self._indicators: list[Indicator] = []
        # Peer records to keep (None: to forget). They can be learned again, so they
        # need not cost a commit each.
        self._records: dict[str, PeerRecord | None] = {}

    def keep_anomaly(self, message: GossipMessage) -> None:
        self._indicators.append(Indicator.from_message(message, self.clock.time_ms()))

    def keep_records(self, records: tuple[PeerRecord, ...]) -> None:
        self._records.update((r.node_id, r) for r in records)

    def forget_records(self, node_ids: tuple[str, ...]) -> None:
        self._records.update(dict.fromkeys(node_ids))

    def flush(self) -> None:
        """Commit what waits (seen ids, anomalies, peer records)."""
        seen = self.seen.take_pending()
        indicators, self._indicators = self._indicators, []
        now = self.clock.time_ms()
        if seen or indicators:
            self.store.save(seen, indicators, capacity=self.seen.capacity, now_ms=now)
        if self._records:
            records, self._records = self._records, {}
            kept = [r for r in records.values() if r is not None]
            if kept:
                self.store.save_peer_records(kept, capacity=self.record_capacity, now_ms=now)
            self.store.forget_peers([n for n, r in records.items() if r is None])

    async def run(self) -> None:
        """Flush every ``FLUSH_INTERVAL`` until cancelled."""
        ticks = 0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()
            ticks += 1
            if ticks % PRUNE_EVERY == 0:
                # Age limits pass even with no traffic (mesh/store.py; nothing new: prune only).
                now = self.clock.time_ms()
                self.store.save([], [], capacity=self.seen.capacity, now_ms=now)
