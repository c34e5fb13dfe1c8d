"""The DTN benchmark does real work (every bundle is kept durably, decoded strictly,
admitted with its signature checked; pyd3tn encodes the same bytes), and a quick run of
``python -m bench dtn --json --quick`` reports every figure with its anchor."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from pyd3tn import bundle7  # type: ignore[import-untyped]

from bench import dtn as dtn_bench
from trustmesh.bundle.bib import read_signature
from trustmesh.bundle.codec import decode_bundle
from trustmesh.bundle.store import BundleStore
from trustmesh.mesh.bundle_codec import MAX_WIRE_BUNDLE
from trustmesh.mesh.errors import BadSignature

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = 6


@pytest.fixture(scope="module")
def load(tmp_path_factory: pytest.TempPathFactory) -> dtn_bench.DtnLoad:
    return dtn_bench.dtn_load(tmp_path_factory.mktemp("dtn-bench"), BUNDLES)


def test_quick_run_reports_every_figure_with_its_anchor() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "dtn", "--json", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    report = json.loads(out)
    assert report["bench"] == "dtn"
    results = report["results"]
    assert [r["metric"] for r in results] == [
        "bundles_persisted_per_s",
        "bundle_encode_decode_per_s",
        "bundle_admit_per_s",
    ]
    for result in results:
        assert set(result) == {"metric", "value", "unit", "anchor", "anchor_value", "ratio"}
        assert result["value"] > 0
        assert result["anchor_value"] > 0
        assert result["anchor"]
        assert math.isfinite(result["ratio"]) and result["ratio"] > 0  # per-round, paired


def test_the_load_holds_distinct_signed_1k_bundles_as_the_receiver_keeps_them(
    load: dtn_bench.DtnLoad,
) -> None:
    assert len(load.signed) == len(load.rows) == len(load.signatures) == BUNDLES
    assert len({row.bundle_id for row in load.rows}) == BUNDLES
    for raw, row in zip(load.signed, load.rows, strict=True):
        sent = decode_bundle(raw, max_size=MAX_WIRE_BUNDLE)
        kept = decode_bundle(row.data, max_size=MAX_WIRE_BUNDLE)
        assert len(sent.payload) == dtn_bench.PAYLOAD_SIZE
        assert kept.payload == sent.payload
        assert sent.hop_count is not None and kept.hop_count is not None
        assert kept.hop_count.count == sent.hop_count.count + 1  # admitted: the hop counts
        assert row.source == dtn_bench.ORIGIN
        assert row.role == "forwarding"


def test_each_store_round_keeps_every_bundle_and_the_anchor_the_same_bytes(
    load: dtn_bench.DtnLoad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dtn_bench.store_round(tmp_path, load.rows) > 0
    assert dtn_bench.sqlite_round(tmp_path, load.rows) > 0
    assert list(tmp_path.iterdir()) == []  # each round removes its database
    # Kept, not just timed: stop the rounds' cleanup and read both databases back.
    monkeypatch.setattr(dtn_bench, "_remove_database", lambda path: None)
    dtn_bench.store_round(tmp_path, load.rows)
    dtn_bench.sqlite_round(tmp_path, load.rows)
    (store_path,) = tmp_path.glob("store-*.db")
    (anchor_path,) = tmp_path.glob("sqlite-*.db")
    store = BundleStore(store_path)
    try:
        assert [store.get(row.bundle_id, "forwarding") for row in load.rows] == load.rows
    finally:
        store.close()
    db = sqlite3.connect(anchor_path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        held = dict(db.execute("SELECT bundle_id, data FROM bundles"))
    finally:
        db.close()
    assert held == {row.bundle_id: row.data for row in load.rows}


def test_a_duplicate_fails_the_store_round(load: dtn_bench.DtnLoad, tmp_path: Path) -> None:
    with pytest.raises(dtn_bench.BenchFailure, match="duplicate"):
        dtn_bench.store_round(tmp_path, [*load.rows, load.rows[0]])


def test_pyd3tn_and_we_encode_the_same_bundle() -> None:
    payload = bytes(range(256)) * 4
    ours, theirs = dtn_bench.codec_pair(payload)
    assert bytes(theirs) == ours.encode()
    assert decode_bundle(bytes(theirs), max_size=MAX_WIRE_BUNDLE) == ours
    assert bundle7.Bundle.parse(ours.encode()).payload_block.data == payload


def test_admit_and_its_anchor_check_every_signature(load: dtn_bench.DtnLoad) -> None:
    dtn_bench.admit_all(load, load.signed)
    dtn_bench.verify_all(load, load.signatures)
    # The first bundle's signature swapped for the second's: both refuse it.
    first = decode_bundle(load.signed[0], max_size=MAX_WIRE_BUNDLE)
    second = decode_bundle(load.signed[1], max_size=MAX_WIRE_BUNDLE)
    bib = read_signature(first).block
    other = read_signature(second).block
    forged = first.with_block(dataclasses.replace(other, number=bib.number)).encode()
    with pytest.raises(BadSignature):
        dtn_bench.admit_all(load, [forged])
    with pytest.raises(InvalidSignature):
        dtn_bench.verify_all(load, [(load.signatures[1][0], load.signatures[0][1])])
