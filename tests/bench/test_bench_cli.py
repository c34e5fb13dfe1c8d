"""``python -m bench`` prints the documented JSON shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_aead_bench_json_shape() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "aead", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    report = json.loads(out)
    assert report["bench"] == "aead"
    metrics = {r["metric"] for r in report["results"]}
    assert metrics == {"seal+open 1KiB", "seal+open 64KiB"}
    for result in report["results"]:
        assert set(result) == {"metric", "value", "unit", "anchor", "anchor_value", "ratio"}
        assert result["value"] > 0
        assert result["anchor_value"] > 0
        assert result["ratio"] > 0  # the median of per-round ratios, not value / anchor_value


def test_unknown_bench_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
