"""The load benchmark: a quick run (50 sessions per protocol, 500 idle connection slots,
30 honest handshakes each way in 2 rounds) prints every metric with sane values, the way
``python -m bench load --json`` prints them; and its helpers measure what they say."""

from __future__ import annotations

import json
import math
import mmap
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from bench import load
from trustmesh.io.limits import ResourcePolicy

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("botd", "catalyst", "mesh", "brc103")
KEYS = {"metric", "value", "unit", "anchor", "anchor_value", "ratio", "note"}


@pytest.fixture(scope="module")
def quick() -> dict[str, dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "load", "--json", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["bench"] == "load"
    return {r["metric"]: r for r in report["results"]}


@pytest.mark.timeout(180)
def test_quick_run_reports_every_metric(quick: dict[str, dict[str, object]]) -> None:
    assert list(quick) == [
        *(f"sessions_held_{k}" for k in KINDS),
        *(f"kib_per_session_{k}" for k in KINDS),
        "flood_latency_ratio",
    ]
    for result in quick.values():
        assert set(result) == KEYS
        assert isinstance(result["note"], str)
        assert result["note"]
        value, anchor = result["value"], result["anchor_value"]
        assert isinstance(value, int | float)
        assert isinstance(anchor, int | float)
        assert math.isfinite(value)
        assert anchor > 0
        assert result["ratio"] == pytest.approx(value / anchor, abs=1e-4)


@pytest.mark.timeout(180)
def test_every_server_holds_every_quick_session(quick: dict[str, dict[str, object]]) -> None:
    for kind in KINDS:
        held = quick[f"sessions_held_{kind}"]
        assert held["anchor_value"] == load.QUICK_SESSIONS
        assert held["value"] == load.QUICK_SESSIONS, held["note"]
        assert held["ratio"] == 1.0


@pytest.mark.timeout(180)
def test_memory_per_session_is_plausible(quick: dict[str, dict[str, object]]) -> None:
    for kind in KINDS:
        cost = quick[f"kib_per_session_{kind}"]
        assert cost["unit"] == "KiB"
        value = cost["value"]
        assert isinstance(value, float)
        # The resident set moves in pages, and a heap may reuse what the warm-up freed:
        # a few sessions may show no growth, but never a megabyte each.
        assert -64 < value < 1024
        assert "server process alone" in str(cost["note"])


@pytest.mark.timeout(180)
def test_flood_tries_every_idle_slot(quick: dict[str, dict[str, object]]) -> None:
    flood = quick["flood_latency_ratio"]
    value, anchor = flood["value"], flood["anchor_value"]
    assert isinstance(value, float)
    assert isinstance(anchor, float)
    assert 0 < anchor < 1e3 * load.HONEST_TIMEOUT  # milliseconds
    assert 0 < value <= 1e3 * load.HONEST_TIMEOUT
    note = str(flood["note"])
    tries = load.QUICK_IDLE * load.QUICK_FLOOD_ROUNDS
    assert f"all tried in every round ({tries} of {tries})" in note
    assert "default ResourcePolicy" in note
    assert "refused.handshake_rate" in note  # the attacker met the per-source limits


def test_quick_is_only_for_benches_that_offer_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "aead", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "has no --quick" in proc.stderr


def test_p99_of_a_hundred_samples_sits_near_the_top() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert 99.0 <= load.p99(samples) <= 100.0
    assert load.p99([3.0]) == 3.0


def test_rss_grows_with_what_the_process_holds() -> None:
    before = load.rss_kib()
    # Fresh pages, written: heap memory freed by earlier tests may already be resident.
    block = mmap.mmap(-1, 16 * 1024 * 1024)
    block.write(b"\x01" * len(block))
    after = load.rss_kib()
    assert before > 0
    assert after - before > 8 * 1024
    block.close()


def test_raise_nofile_lifts_the_soft_limit_and_refuses_too_much() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert load.raise_nofile(64) >= soft
        if hard != resource.RLIM_INFINITY:
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
            with pytest.raises(load.BenchFailure, match="file descriptors"):
                load.raise_nofile(hard + 1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_mesh_limits_are_the_load_policy_as_overrides() -> None:
    limits = load.mesh_limits(2000)
    policy = ResourcePolicy().replace(**limits)
    assert policy == ResourcePolicy.for_load(2000)
    assert "handshake_timeout" not in limits  # only what for_load changes
