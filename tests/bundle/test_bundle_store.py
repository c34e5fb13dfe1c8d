"""The bundle store: roles, duplicates, quotas, expiry, revocation, reassembly's swap."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmesh.bundle.store import (
    BundleStore,
    SourceQuotaError,
    StoredBundle,
    StoreFullError,
)
from trustmesh.node.bundles import StoreBusyError, StoreLock


def bundle(
    bundle_id: str = "node-a:1000:0",
    *,
    role: str = "forwarding",
    source: str = "node-a",
    signer: str = "a1",
    destination: str = "dtn://node-b/inbox",
    expires_ms: int = 10_000,
    copies: int = 1,
    size: int = 100,
) -> StoredBundle:
    return StoredBundle(
        bundle_id,
        role,  # type: ignore[arg-type]
        source,
        signer,
        destination,
        1_000,
        expires_ms,
        copies,
        500,
        bytes(size),
    )


@pytest.fixture
def store(tmp_path: Path) -> BundleStore:
    return BundleStore(tmp_path / "bundles.db", max_bytes=1_000, max_source_bytes=600)


def test_a_bundle_is_kept_once_per_role_and_survives_reopening(
    store: BundleStore, tmp_path: Path
) -> None:
    assert store.add(bundle())
    assert not store.add(bundle())  # the same id in the same role: a duplicate
    assert store.add(bundle(role="inbox"))
    store.close()
    again = BundleStore(tmp_path / "bundles.db", max_bytes=1_000, max_source_bytes=600)
    assert again.get("node-a:1000:0", "forwarding") == bundle()
    assert again.bytes_used == 200 and again.source_bytes("node-a") == 200


def test_a_delivered_id_is_dropped_as_a_duplicate_even_after_the_inbox_row_went(
    store: BundleStore,
) -> None:
    inbox = bundle(role="inbox")
    assert store.add(inbox, delivered=True)
    assert store.delete(inbox.bundle_id, "inbox")
    assert not store.add(inbox, delivered=True)
    assert store.was_delivered(inbox.bundle_id) and store.holds(inbox.bundle_id)
    assert store.count("inbox") == 0


def test_quotas_refuse_with_distinct_errors_and_free_up_on_delete(store: BundleStore) -> None:
    store.add(bundle("node-a:1:0", size=500))
    with pytest.raises(SourceQuotaError, match="node-a holds 500 of its 600 bytes"):
        store.add(bundle("node-a:2:0", size=200))
    store.add(bundle("node-c:1:0", source="node-c", size=400))
    with pytest.raises(StoreFullError, match="the bundle store is full"):
        store.add(bundle("node-d:1:0", source="node-d", size=200))
    assert store.delete("node-a:1:0", "forwarding")
    store.add(bundle("node-d:1:0", source="node-d", size=200))
    assert store.bytes_used == 600


def test_expiry_purges_bundles_and_delivered_ids(store: BundleStore) -> None:
    store.add(bundle("node-a:1:0", expires_ms=2_000))
    store.add(bundle("node-a:2:0", role="inbox", expires_ms=2_000), delivered=True)
    store.add(bundle("node-a:3:0", expires_ms=9_000))
    assert sorted(store.expire(2_000)) == [("node-a:1:0", "forwarding"), ("node-a:2:0", "inbox")]
    assert not store.was_delivered("node-a:2:0")
    assert [b.bundle_id for b in store.items("forwarding")] == ["node-a:3:0"]
    assert store.bytes_used == 100


def test_bundles_of_a_revoked_signer_go(store: BundleStore) -> None:
    store.add(bundle("node-a:1:0", signer="a1"))
    store.add(bundle("node-a:2:0", signer="a2"))
    assert store.purge_signers(["a1", "ff"]) == [("node-a:1:0", "forwarding")]
    assert store.holds("node-a:2:0") and not store.holds("node-a:1:0")


def test_fragments_are_swapped_for_the_whole_bundle_in_one_step(store: BundleStore) -> None:
    for offset in (0, 50):
        store.add(bundle(f"node-a:1:0:{offset}", role="fragment", size=50))
    store.add(bundle("node-a:1:00:0", role="fragment", size=10))  # another bundle's
    parts = store.fragments_of("node-a:1:0")
    assert sorted(p.bundle_id for p in parts) == ["node-a:1:0:0", "node-a:1:0:50"]
    whole = bundle("node-a:1:0", role="inbox", size=100)
    ids = [p.bundle_id for p in parts]
    assert store.deliver_whole(whole, ids, whole_id=whole.bundle_id, expires_ms=10_000)
    assert store.count("fragment") == 1 and store.was_delivered("node-a:1:0")
    assert store.bytes_used == 110
    # A second reassembly is a duplicate:
    assert not store.deliver_whole(whole, [], whole_id=whole.bundle_id, expires_ms=10_000)


def test_spreadable_bundles_are_broadcasts_and_bundles_with_spare_copies(
    store: BundleStore,
) -> None:
    store.add(bundle("node-a:1:0", copies=1))
    store.add(bundle("node-a:2:0", copies=4))
    store.add(bundle("node-a:3:0", destination="dtn://~mesh/inbox"))
    assert sorted(b.bundle_id for b in store.spreadable(limit=10)) == ["node-a:2:0", "node-a:3:0"]
    store.set_copies("node-a:2:0", 1)
    assert [b.bundle_id for b in store.spreadable(limit=10)] == ["node-a:3:0"]
    mine = store.forwarding_for(["dtn://node-b/inbox"], limit=10)
    assert [b.bundle_id for b in mine] == ["node-a:1:0", "node-a:2:0"]


def test_a_batch_is_all_or_nothing_under_a_quota(store: BundleStore) -> None:
    rows = [bundle(f"node-a:{i}:0", size=250) for i in range(3)]
    with pytest.raises(SourceQuotaError):
        store.add_many(rows)
    assert store.bytes_used == 0 and store.count("forwarding") == 0
    assert store.add_many(rows[:2]) == [True, True]


def test_one_process_writes_a_node_s_bundle_store(tmp_path: Path) -> None:
    lock = StoreLock(tmp_path)
    with pytest.raises(StoreBusyError):
        StoreLock(tmp_path)
    lock.release()
    StoreLock(tmp_path).release()
