"""``trustmesh sim``: deterministic, and the mesh it runs (the real cores) forms, spreads
anomalies and revocations, survives loss and partitions (docs/sim.md)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from clitools import TRUSTMESH, clean_env

from trustmesh.sim import SimConfig, parse_range, simulate
from trustmesh.sim.output import summary, to_json
from trustmesh.sim.world import percentile

WALL_KEYS = ("wall_s", "setup_s")


def run(**options: Any) -> dict[str, Any]:
    return simulate(SimConfig(**options)).report


def without_wall(report: dict[str, Any]) -> str:
    return to_json({k: v for k, v in report.items() if k not in WALL_KEYS})


def test_the_same_seed_gives_the_same_json() -> None:
    options: dict[str, Any] = {"nodes": 30, "seed": 7, "loss": 0.2, "churn": 0.1}
    first, second = run(**options), run(**options)
    assert without_wall(first) == without_wall(second)
    assert without_wall(first) != without_wall(run(**{**options, "seed": 8}))


def test_a_small_mesh_forms_and_spreads_an_anomaly_and_a_revocation() -> None:
    report = run(nodes=60, seed=1, anomalies=2, revoke=2)
    formation = report["formation"]
    assert formation["connected"]
    assert formation["unconnected"] == []
    assert formation["degree"]["min"] >= 1
    assert formation["links"] * 2 == sum(
        int(d) * n for d, n in formation["degree"]["histogram"].items()
    )
    anomaly = report["anomaly"]
    assert anomaly["published"] == 2
    assert anomaly["coverage"] == 1.0
    assert 0 < anomaly["p50_ms"] <= anomaly["p99_ms"]
    assert anomaly["msgs_per_node"] > 0.9  # every node but the origin got it at least once
    revocation = report["revocation"]
    assert revocation["revoked"] == 2 and len(revocation["node_ids"]) == 2
    assert revocation["coverage"] == 1.0
    assert revocation["p99_ms"] is not None
    assert report["partition"] is None


def test_loss_30_percent_still_covers_every_node() -> None:
    """A third of GOSSIP, IHAVE and IWANT frames lost: the repeats repair every loss."""
    for seed in (1, 2, 4):
        report = run(nodes=50, seed=seed, loss=0.3, revoke=0)
        assert report["network"]["frames_lost"] > 0
        assert report["anomaly"]["coverage"] == 1.0


def test_a_healed_partition_reaches_every_node() -> None:
    report = run(nodes=60, seed=2, partition_at=20_000, heal_at=60_000, revoke=0)
    partition = report["partition"]
    assert partition["anomalies_during"] == 1
    assert partition["heal_ms"] is not None
    assert partition["heal_ms"] < 3_600_000  # within the message lifetime (1 h)
    assert report["anomaly"]["coverage"] == 1.0


def test_churned_nodes_catch_up() -> None:
    report = run(nodes=50, seed=4, churn=0.2)
    assert report["churn"]["nodes"] == 9
    assert report["anomaly"]["coverage"] == 1.0
    assert report["revocation"]["coverage"] == 1.0


def test_legacy_admission_forms_worse_than_managed() -> None:
    """The livelock of issue 17: dialling to max_links // 2 without refusal hints piles
    refusals on full nodes; the managed low mark and hints form with a fraction of them."""
    common: dict[str, Any] = {
        "nodes": 100,
        "max_links": 8,
        "seed": 1,
        "revoke": 0,
        "anomalies": 0,
        "formed_at": 15_000,
        "duration_ms": 15_000,
    }
    legacy = run(admission="legacy", **common)["formation"]
    managed = run(admission="managed", **common)["formation"]
    assert managed["connected"]
    assert legacy["refused_link_cap"] > 3 * managed["refused_link_cap"]
    assert legacy["dials"] > 3 * managed["dials"]


def test_the_cli_prints_one_json_object() -> None:
    proc = subprocess.run(
        [TRUSTMESH, "sim", "--nodes", "20", "--seed", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["nodes"] == 20 and report["seed"] == 1
    for key in ("coverage", "p50_ms", "p99_ms", "msgs_per_node"):
        assert key in report["anomaly"]
    for key in ("coverage", "p99_ms"):
        assert key in report["revocation"]
    assert "partition" in report and "wall_s" in report
    for key in ("links", "refused_link_cap", "degree", "connected", "unconnected"):
        assert key in report["formation"]


def test_the_cli_refuses_a_partition_without_a_heal(tmp_path: Path) -> None:
    proc = subprocess.run(
        [TRUSTMESH, "sim", "--nodes", "5", "--partition-at", "1000"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert proc.returncode == 2
    assert "--heal-at" in proc.stderr


def test_the_summary_names_the_figures() -> None:
    text = summary(run(nodes=12, seed=1, bootstrap=2, partition_at=20_000, heal_at=25_000))
    assert "12 nodes" in text and "coverage" in text and "after the heal" in text


def test_helpers() -> None:
    assert parse_range("5..50") == (5, 50)
    assert parse_range("7") == (7, 7)
    with pytest.raises(ValueError, match="A <= B"):
        parse_range("9..3")
    assert percentile([], 0.5) is None
    assert percentile([5, 1, 3, 2, 4], 0.5) == 3
    assert percentile(list(range(1, 101)), 0.99) == 99
    with pytest.raises(ValueError, match="heal-at"):
        SimConfig(partition_at=5)
