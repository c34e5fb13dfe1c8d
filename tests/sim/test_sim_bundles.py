"""``trustmesh sim --bundles``: every node runs the real bundle agent (over an in-memory
store and the sim's codec), random nodes send bundles through churn, and the report's
``bundles`` section tells what became of them (docs/sim.md)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from clitools import TRUSTMESH, clean_env

from trustmesh.mesh.bundle_codec import HopLimitExceeded
from trustmesh.mesh.errors import ExpiredMessage, MalformedMessage, RevokedOrigin
from trustmesh.sim import SimConfig, simulate
from trustmesh.sim.bundles import SimBundleCodec, make, payload_of
from trustmesh.sim.output import summary, to_json

WALL_KEYS = ("wall_s", "setup_s")
NOW = 1_900_000_000_000


def run(**options: Any) -> dict[str, Any]:
    return simulate(SimConfig(**options)).report


def sane_latency(bundles: dict[str, Any], ttl_ms: int) -> None:
    assert 0 < bundles["p50_ms"] <= bundles["p90_ms"] <= bundles["max_ms"] < ttl_ms


def test_bundles_reach_their_destinations_through_churn() -> None:
    """50 nodes, 30 % of them down once for 2-10 s; a third of the bundles go to a node
    that is down then. Every one arrives: held, sprayed, and carried across once the
    node is back (its contact broadcast makes the holders dial it)."""
    report = run(nodes=50, seed=3, churn=0.3, bundles=120, bundle_to_down=0.3)
    bundles = report["bundles"]
    assert bundles["sent"] == 120
    assert bundles["delivery_ratio"] >= 0.95  # 1.0 when measured
    assert bundles["sent_to_down"] >= 15
    assert bundles["delivered_to_down"] == bundles["sent_to_down"]  # the TTL outlives downtime
    sane_latency(bundles, bundles["ttl_ms"])
    assert bundles["to_down_p50_ms"] >= 200  # they waited for their node to come back
    assert bundles["expired"] == 0 and bundles["refused"] == 0
    assert bundles["redelivered"] == 0 and bundles["misdelivered"] == 0
    assert bundles["transmissions"] >= bundles["delivered"]
    assert bundles["copies_at_end"] >= bundles["stored_at_end"]  # a row holds 1 copy or more
    broadcast = bundles["broadcast"]
    assert broadcast["sent"] == 2 and broadcast["coverage"] == 1.0
    assert 0 < broadcast["p50_ms"] <= broadcast["p90_ms"] <= broadcast["max_ms"]
    assert broadcast["stored_at_end"] >= 2 * 45  # held everywhere until they expire
    contacts = bundles["contacts"]
    assert contacts["announced"] == report["churn"]["nodes"]  # each restart announces itself
    assert contacts["delivered"] > 0
    # The rest of the run is the same mesh: it still spreads anomalies and revocations.
    assert report["anomaly"]["coverage"] == 1.0
    assert report["revocation"]["coverage"] == 1.0


def test_the_same_seed_gives_the_same_bundles() -> None:
    options: dict[str, Any] = {"nodes": 30, "seed": 5, "churn": 0.2, "bundles": 40}

    def without_wall(report: dict[str, Any]) -> str:
        return to_json({k: v for k, v in report.items() if k not in WALL_KEYS})

    assert without_wall(run(**options)) == without_wall(run(**options))


def test_a_lifetime_shorter_than_the_downtime_expires_the_bundles_to_down_nodes() -> None:
    """Each bundle lives 1.5 s, and nearly all go to a node that is down for 4 s: those
    sent less than 1.5 s before their node comes back arrive, the others expire where
    they are held and are purged; none is delivered late."""
    report = run(
        nodes=30,
        seed=2,
        churn=0.4,
        churn_down_ms=(4_000, 4_000),
        bundles=30,
        bundle_to_down=1.0,
        bundle_ttl_ms=1_500,
        bundle_broadcasts=0,
        bundles_at=(21_000, 30_000),
    )
    bundles = report["bundles"]
    assert bundles["sent"] == 30
    assert bundles["sent_to_down"] >= 25  # the others when no node was down
    assert bundles["expired"] >= 15
    assert bundles["delivered"] + bundles["expired"] == 30
    assert bundles["max_ms"] is None or bundles["max_ms"] < 1_500
    assert bundles["rows_expired"] >= bundles["expired"]  # purged from the holders' stores
    assert bundles["stored_at_end"] == 0
    assert bundles["broadcast"]["coverage"] is None


def test_without_bundles_the_report_has_none() -> None:
    report = run(nodes=10, seed=1)
    assert report["bundles"] is None
    assert "bundles:" not in summary(report)


@pytest.mark.timeout(120)
def test_three_hundred_nodes_deliver_to_nodes_that_were_down() -> None:
    """Bundles to a node that was down are delivered after it comes back: its contact
    broadcast gives every holder its record. Bundles to a node that stayed up arrive
    only if a holder links to it (see docs/sim.md, findings): the ratio is lower."""
    report = run(nodes=300, seed=1, churn=0.05, bundles=40, bundle_to_down=0.6, settle_ms=30_000)
    bundles = report["bundles"]
    assert bundles["sent_to_down"] >= 15
    assert bundles["delivered_to_down"] >= 0.9 * bundles["sent_to_down"]
    assert bundles["delivered"] >= bundles["delivered_to_down"]
    sane_latency(bundles, bundles["ttl_ms"])
    assert bundles["broadcast"]["coverage"] == 1.0
    assert bundles["redelivered"] == 0 and bundles["misdelivered"] == 0


def test_the_cli_reports_bundles() -> None:
    proc = subprocess.run(
        [TRUSTMESH, "sim", "--nodes", "20", "--seed", "1", "--bundles", "10", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    bundles = json.loads(proc.stdout)["bundles"]
    for key in (
        "sent",
        "delivered",
        "delivery_ratio",
        "p50_ms",
        "p90_ms",
        "max_ms",
        "stored_at_end",
        "refused",
        "expired",
    ):
        assert key in bundles
    assert bundles["sent"] == 10 and bundles["broadcast"]["sent"] == 2


def test_the_summary_names_the_bundle_figures() -> None:
    text = summary(run(nodes=12, seed=1, bundles=5))
    assert "bundles: " in text and "delivered" in text and "broadcast bundles: 2 sent" in text


def test_the_config_checks_the_bundle_options() -> None:
    assert SimConfig(bundles=3).broadcasts == 2
    assert SimConfig(bundles=3, bundle_broadcasts=0).broadcasts == 0
    assert not SimConfig().with_bundles
    assert SimConfig(bundle_broadcasts=1).with_bundles
    assert SimConfig(formed_at=10_000).bundle_window == (10_000, 40_000)
    with pytest.raises(ValueError, match="copies"):
        SimConfig(bundles=1, bundle_copies=0)
    with pytest.raises(ValueError, match="bundle-to-down"):
        SimConfig(bundles=1, bundle_to_down=2.0)
    with pytest.raises(ValueError, match="bundles-at"):
        SimConfig(bundles=1, bundles_at=(5, 1))


# --- the sim's codec --------------------------------------------------------------------------


def bundle(expires_in: int = 60_000, signer: str = "2a") -> bytes:
    return make(
        "node-1:1:1", "node-1", signer, "dtn://node-2/inbox", "inbox", NOW, expires_in, b"hi"
    ).data


def test_the_codec_admits_a_bundle_and_counts_the_hop() -> None:
    codec = SimBundleCodec(lambda serial: False)
    first = codec.admit(bundle(), NOW)
    assert (first.bundle_id, first.source, first.destination_node) == (
        "node-1:1:1",
        "node-1",
        "node-2",
    )
    assert (first.signer, first.expires_ms, first.broadcast) == ("2a", NOW + 60_000, False)
    assert payload_of(first.data) == b"hi"
    second = codec.admit(first.data, NOW)
    assert second.data.split(b"\x1e")[0].endswith(b"\x1f2")  # two hops
    assert codec.reassemble([first.data], NOW) is None


def test_the_codec_refuses_what_the_real_one_would() -> None:
    codec = SimBundleCodec(lambda serial: serial == 0x2A, hop_limit=1)
    with pytest.raises(ExpiredMessage):
        codec.admit(bundle(expires_in=5), NOW + 5)
    with pytest.raises(RevokedOrigin):
        codec.admit(bundle(), NOW)
    once = codec.admit(bundle(signer="2b"), NOW)
    with pytest.raises(HopLimitExceeded):
        codec.admit(once.data, NOW)
    with pytest.raises(MalformedMessage):
        codec.admit(b"not a bundle", NOW)
    broadcast = make("a:1:1", "a", "1", "dtn://~mesh/inbox", "inbox", NOW, 10, b"").data
    assert codec.admit(broadcast, NOW).broadcast
