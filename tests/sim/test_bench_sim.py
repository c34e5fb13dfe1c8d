"""``python -m bench sim --quick`` reports its four figures against their anchors."""

from __future__ import annotations

from typing import Any

import pytest

from bench import sim as sim_bench
from trustmesh.sim import SimConfig


def test_the_anchor_is_a_positive_time() -> None:
    assert 0 < sim_bench.anchor_s(50) < 5


@pytest.mark.timeout(120)
def test_a_quick_run_reports_every_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    # The quick bench runs 200 nodes; the test shrinks it further to keep the suite fast.
    def small(**options: Any) -> SimConfig:
        return SimConfig(**{**options, "nodes": 40})

    monkeypatch.setattr(sim_bench, "SimConfig", small)
    results = sim_bench.run(quick=True)
    assert [r.metric for r in results] == [
        "sim_wall_s_200",
        "sim_coverage_loss30",
        "sim_heal_ms",
    ]
    for result in results:
        assert result.anchor_value > 0
    assert 0 < results[1].value <= 1
