"""The mesh store keeps the disk bounded: indicators are pruned by age and by count, seen
ids by expiry and by count, from running counts (mesh-link.md section 10.2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trustmesh.mesh import store as store_module
from trustmesh.mesh.store import Indicator, MeshStore

DAY = 24 * 3600 * 1000
T0 = 1_767_225_600_000  # a fixed "now", Unix ms


def indicator(n: int, received_at: int) -> Indicator:
    return Indicator(f"id-{n:06d}", "node-1", f"{n:016x}", "test/probe", 0.5, {}, n, received_at)


def ids(store: MeshStore) -> list[str]:
    return [i.message_id for i in store.indicators(limit=10_000)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "mesh.db"


@pytest.fixture
def store(path: Path) -> Iterator[MeshStore]:
    db = MeshStore(path)
    yield db
    db.close()


def test_the_defaults_are_seven_days_and_100000_indicators(store: MeshStore) -> None:
    assert store_module.DEFAULT_INDICATOR_MAX_AGE_MS == 7 * DAY
    assert store_module.DEFAULT_INDICATOR_CAPACITY == 100_000
    assert store.indicator_max_age_ms == 7 * DAY
    assert store.indicator_capacity == 100_000


def test_indicators_older_than_seven_days_are_pruned_by_default(store: MeshStore) -> None:
    store.save([], [indicator(1, T0), indicator(2, T0 + DAY)], capacity=10, now_ms=T0 + DAY)
    store.save([], [], capacity=10, now_ms=T0 + 7 * DAY)  # exactly 7 days old: kept
    assert ids(store) == ["id-000001", "id-000002"]
    store.save([], [indicator(3, T0 + 7 * DAY + 1)], capacity=10, now_ms=T0 + 7 * DAY + 1)
    assert ids(store) == ["id-000002", "id-000003"]
    assert store.indicator_count() == 2


def test_a_store_pushed_past_its_indicator_capacity_keeps_the_newest(path: Path) -> None:
    store = MeshStore(path, indicator_capacity=50, indicator_max_age_ms=DAY)
    try:
        for batch in range(4):  # 4 batches of 30, received in order
            items = [indicator(30 * batch + i, T0 + 30 * batch + i) for i in range(30)]
            store.save([], items, capacity=10, now_ms=T0 + 200)
            assert store.indicator_count() == min(50, 30 * (batch + 1))
        assert ids(store) == [f"id-{n:06d}" for n in range(70, 120)]
        # Pushed past the age limit as well: only those received in the last day stay.
        store.save([], [indicator(500, T0 + DAY + 100)], capacity=10, now_ms=T0 + DAY + 100)
        assert ids(store) == [f"id-{n:06d}" for n in range(100, 120)] + ["id-000500"]
    finally:
        store.close()


def test_the_running_count_survives_reopening_and_duplicates(path: Path) -> None:
    first = MeshStore(path)
    first.save([], [indicator(n, T0 + n) for n in range(8)], capacity=10, now_ms=T0)
    first.save([], [indicator(n, T0 + n) for n in range(8)], capacity=10, now_ms=T0)  # ignored
    first.close()
    second = MeshStore(path, indicator_capacity=5)  # counted at open: 8, over the limit
    try:
        second.save([], [], capacity=10, now_ms=T0)
        assert ids(second) == [f"id-{n:06d}" for n in range(3, 8)]
        second.save([], [indicator(3, T0 + 3), indicator(9, T0 + 9)], capacity=10, now_ms=T0)
        assert ids(second) == [f"id-{n:06d}" for n in (4, 5, 6, 7, 9)]
    finally:
        second.close()


def test_a_failed_batch_leaves_the_counts_alone(path: Path) -> None:
    store = MeshStore(path, indicator_capacity=3)
    try:

        def failing() -> Iterator[Indicator]:
            yield from (indicator(n, T0 + n) for n in range(3))
            raise RuntimeError("the batch breaks half way")

        with pytest.raises(RuntimeError):
            store.save([("m", T0 + 1)], failing(), capacity=1, now_ms=T0)
        store.save([], [indicator(n, T0 + n) for n in range(3)], capacity=1, now_ms=T0)
        assert ids(store) == ["id-000000", "id-000001", "id-000002"]  # nothing pruned
    finally:
        store.close()


def test_the_seen_table_past_its_capacity_keeps_the_longest_lived_without_a_scan(
    path: Path,
) -> None:
    store = MeshStore(path)
    try:
        store.save([(f"m{i:03d}", T0 + 1000 + i) for i in range(300)], [], capacity=100, now_ms=T0)
        assert [m for m, _ in store.seen()] == [f"m{i:03d}" for i in range(200, 300)]
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        store.save([("new", T0 + 5000)], [], capacity=100, now_ms=T0)
        store._db.set_trace_callback(None)
        assert [m for m, _ in store.seen()] == [f"m{i:03d}" for i in range(201, 300)] + ["new"]
        # No OFFSET walk over the capacity, no count(*): the excess only.
        assert not [s for s in statements if "OFFSET" in s or "count(" in s]
    finally:
        store.close()


def test_indicator_limits_must_be_positive(path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        MeshStore(path, indicator_capacity=0)
    with pytest.raises(ValueError, match="positive"):
        MeshStore(path, indicator_max_age_ms=0)
