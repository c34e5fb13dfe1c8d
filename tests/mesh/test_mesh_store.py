"""The mesh store: the persisted seen-cache, anomaly indicators, the newest CRL and known
peers, in SQLite, across reopening."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtools import T0_MS, MeshPki, anomaly

from trustmesh.mesh.engine import SeenCache
from trustmesh.mesh.peers import PeerRecord
from trustmesh.mesh.store import Indicator, MeshStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MeshStore]:
    db = MeshStore(tmp_path / "mesh.db")
    yield db
    db.close()


def indicator(n: int, received_at: int, **meta: str | int | float | bool | None) -> Indicator:
    return Indicator(
        f"node-1:{n}", "node-1", f"{n:016x}", "test/probe", 0.25, dict(meta), 1000 + n, received_at
    )


# --- the seen-cache -----------------------------------------------------------------------


def test_seen_ids_are_saved_and_listed_soonest_to_expire_first(store: MeshStore) -> None:
    store.save([("b", 300), ("a", 200), ("c", 400)], [], capacity=10, now_ms=0)
    assert store.seen() == [("a", 200), ("b", 300), ("c", 400)]


def test_saving_drops_expired_ids(store: MeshStore) -> None:
    store.save([("old", 100), ("edge", 150), ("new", 300)], [], capacity=10, now_ms=0)
    store.save([], [], capacity=10, now_ms=150)
    assert store.seen() == [("new", 300)]


def test_saving_keeps_at_most_capacity_ids_the_longest_lived(store: MeshStore) -> None:
    store.save([(f"m{i}", 100 + i) for i in range(10)], [], capacity=4, now_ms=0)
    assert store.seen() == [(f"m{i}", 100 + i) for i in range(6, 10)]
    store.save([("late", 1000), ("early", 50)], [], capacity=4, now_ms=0)
    assert [m for m, _ in store.seen()] == ["m7", "m8", "m9", "late"]


def test_an_id_saved_twice_keeps_its_first_expiry(store: MeshStore) -> None:
    store.save([("m", 200)], [], capacity=10, now_ms=0)
    store.save([("m", 900)], [], capacity=10, now_ms=0)
    assert store.seen() == [("m", 200)]


def test_the_seen_cache_round_trips_through_the_store(tmp_path: Path) -> None:
    cache = SeenCache(capacity=3)
    for i in range(5):
        cache.add(f"m{i}", T0_MS + 1000 * i)
    with_store = MeshStore(tmp_path / "mesh.db")
    with_store.save(cache.take_pending(), [], capacity=cache.capacity, now_ms=T0_MS)
    with_store.close()
    reopened = MeshStore(tmp_path / "mesh.db")
    restored = SeenCache(capacity=3)
    restored.load(reopened.seen(), now_ms=T0_MS + 2500)  # m2 has expired by then
    reopened.close()
    assert [f"m{i}" in restored for i in range(5)] == [False, False, False, True, True]
    assert restored.pending == []


# --- indicators ---------------------------------------------------------------------------


def test_indicators_round_trip_from_a_real_message(store: MeshStore, tmp_path: Path) -> None:
    pki = MeshPki(tmp_path / "ca")
    try:
        message = pki.node("node-1").sign(anomaly(9, source="ids", hits=3, sure=False, x=None))
    finally:
        pki.close()
    saved = Indicator.from_message(message, received_at=T0_MS + 5)
    store.save([], [saved], capacity=10, now_ms=0)
    (loaded,) = store.indicators()
    assert loaded == saved
    assert loaded.meta == {"source": "ids", "hits": 3, "sure": False, "x": None}
    assert loaded.to_json() == {
        "message_id": message.message_id,
        "origin": "node-1",
        "hash": "0000000000000009",
        "kind": "test/probe",
        "risk": 0.5,
        "meta": loaded.meta,
        "timestamp": message.timestamp,
        "received_at": T0_MS + 5,
    }
    assert store.indicator_count() == 1


def test_indicators_come_oldest_first_newest_limit(store: MeshStore) -> None:
    items = [indicator(i, received_at=100 * (5 - i)) for i in range(5)]  # saved newest first
    store.save([], items, capacity=10, now_ms=0)
    assert [i.received_at for i in store.indicators()] == [100, 200, 300, 400, 500]
    assert [i.received_at for i in store.indicators(limit=2)] == [400, 500]
    assert store.indicators(limit=0) == []


def test_indicators_since_is_exclusive(store: MeshStore) -> None:
    store.save([], [indicator(i, received_at=100 * i) for i in range(5)], capacity=10, now_ms=0)
    assert [i.received_at for i in store.indicators(since=200)] == [300, 400]
    assert [i.received_at for i in store.indicators(since=200, limit=1)] == [400]
    assert store.indicators(since=400) == []
    assert len(store.indicators(since=None)) == 5


def test_indicators_of_one_hash_even_behind_the_newest_limit(store: MeshStore) -> None:
    """``hash`` picks one anomaly's indicators, however many newer ones the store holds
    (what ``node wait --anomaly`` asks for)."""
    old = indicator(0, received_at=1)
    store.save(
        [], [old, *(indicator(i, received_at=10 + i) for i in range(1, 50))], capacity=100, now_ms=0
    )
    assert old not in store.indicators(limit=10)
    assert store.indicators(hash=old.hash, limit=1) == [old]
    assert store.indicators(hash=f"{7:016x}") == [indicator(7, received_at=17)]
    assert store.indicators(hash=f"{7:016x}", since=17) == []
    assert store.indicators(hash="ab" * 8 + "' OR 1=1 --") == []  # a parameter, not SQL


def test_indicators_at_the_same_time_are_ordered_by_id(store: MeshStore) -> None:
    store.save([], [indicator(i, received_at=100) for i in (3, 1, 2)], capacity=10, now_ms=0)
    assert [i.message_id for i in store.indicators()] == ["node-1:1", "node-1:2", "node-1:3"]
    assert [i.message_id for i in store.indicators(limit=2)] == ["node-1:1", "node-1:2"]


def test_an_indicator_saved_twice_is_kept_once(store: MeshStore) -> None:
    store.save([], [indicator(1, received_at=100)], capacity=10, now_ms=0)
    store.save([], [indicator(1, received_at=999)], capacity=10, now_ms=0)
    assert [i.received_at for i in store.indicators()] == [100]
    assert store.indicator_count() == 1


def test_a_failed_batch_saves_nothing(store: MeshStore) -> None:
    def failing() -> Iterator[Indicator]:
        yield indicator(1, received_at=100)
        raise RuntimeError("the batch breaks half way")

    with pytest.raises(RuntimeError):
        store.save([("m", 200)], failing(), capacity=10, now_ms=0)
    assert store.seen() == [] and store.indicators() == []
    store.save([("m", 200)], [], capacity=10, now_ms=0)  # the store is still usable
    assert store.seen() == [("m", 200)]


# --- the CRL ------------------------------------------------------------------------------


def test_the_store_keeps_the_newest_crl_only(store: MeshStore) -> None:
    assert store.crl() is None
    store.save_crl(5, b"crl five")
    store.save_crl(3, b"crl three")
    assert store.crl() == b"crl five"
    store.save_crl(5, b"another five")
    assert store.crl() == b"crl five"
    store.save_crl(7, b"crl seven")
    assert store.crl() == b"crl seven"


# --- peers --------------------------------------------------------------------------------


def record(node_id: str, address: str, seq: int, expires: int = 10_000) -> PeerRecord:
    """A record as the store sees it: kept as its bytes, never checked (mesh/peers.py)."""
    return PeerRecord(node_id, (address,), seq, expires, b"sig", (b"cert",))


def test_peer_records_newest_first_and_never_older(store: MeshStore) -> None:
    one, two, three = (
        record(f"node-{i}", f"10.0.0.{i}:7000", s) for i, s in ((1, 100), (2, 300), (3, 200))
    )
    store.save_peer_records([one, two, three], capacity=10, now_ms=0)
    assert store.peer_records() == [two.encode(), three.encode(), one.encode()]
    moved = record("node-1", "10.0.0.9:7001", 400)
    store.save_peer_records([moved, record("node-2", "10.0.0.7:1", 250)], capacity=10, now_ms=0)
    assert store.peer_records() == [moved.encode(), two.encode(), three.encode()]
    store.forget_peer("node-2")
    store.forget_peers(["node-unknown"])
    assert store.peer_records() == [moved.encode(), three.encode()]


def test_peer_records_are_pruned_by_expiry_and_capacity(store: MeshStore) -> None:
    store.save_peer_records(
        [record(f"node-{i}", "10.0.0.1:7000", 100, expires=1000 + i) for i in range(6)],
        capacity=3,
        now_ms=0,
    )
    assert [decode(r) for r in store.peer_records()] == ["node-3", "node-4", "node-5"]
    store.save_peer_records([], capacity=3, now_ms=1004)
    assert [decode(r) for r in store.peer_records()] == ["node-5"]


def decode(raw: bytes) -> str:
    return str(json.loads(raw)["node_id"])


# --- restarts -----------------------------------------------------------------------------


def test_everything_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.db"
    first = MeshStore(path)
    first.save([("m1", 500), ("m2", 600)], [indicator(1, 100, k="v")], capacity=10, now_ms=0)
    first.save_crl(9, b"crl nine")
    first.save_peer_records([record("node-2", "10.0.0.2:7000", 100)], capacity=10, now_ms=0)
    first.close()
    second = MeshStore(path)
    try:
        assert second.seen() == [("m1", 500), ("m2", 600)]
        assert second.indicators() == [indicator(1, 100, k="v")]
        assert second.crl() == b"crl nine"
        assert second.peer_records() == [record("node-2", "10.0.0.2:7000", 100).encode()]
        second.save_crl(8, b"older")  # the number survived too
        assert second.crl() == b"crl nine"
    finally:
        second.close()


def test_two_stores_on_one_file_see_each_others_commits(tmp_path: Path) -> None:
    path = tmp_path / "mesh.db"
    writer, reader = MeshStore(path), MeshStore(path)
    try:
        writer.save([("m", 500)], [], capacity=10, now_ms=0)
        assert reader.seen() == [("m", 500)]
    finally:
        writer.close()
        reader.close()
