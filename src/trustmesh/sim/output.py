"""How a run is shown: one JSON object (same seed, same bytes but ``wall_s`` and
``setup_s``), a readable summary, and an optional SVG plot (matplotlib, optional)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from trustmesh.sim.world import SimResult


def to_json(report: dict[str, Any]) -> str:
    """Sorted keys, no spaces: byte-identical for the same seed (floats are rounded when
    the report is made)."""
    return json.dumps(report, sort_keys=True, separators=(",", ":"))


def _ms(value: Any) -> str:
    return "never" if value is None else f"{value} ms"


def summary(report: dict[str, Any]) -> str:
    formation = report["formation"]
    degree = formation["degree"]
    anomaly = report["anomaly"]
    revocation = report["revocation"]
    lines = [
        f"trustmesh sim: {report['nodes']} nodes, seed {report['seed']}, "
        f"{report['virtual_ms'] / 1000:g} s virtual in {report['wall_s']:g} s wall",
        f"formation at {formation['at_ms']} ms: {formation['links']} links, "
        f"degree min/p50/mean/max {degree['min']}/{degree['p50']}/{degree['mean']}/"
        f"{degree['max']}, {formation['dials']} dials, {formation['refused_link_cap']} refused "
        f"at the link cap, "
        + (
            f"connected (at {formation['connected_at_ms']} ms)"
            if formation["connected"]
            else f"NOT connected: {formation['components']} components, "
            f"{formation['unconnected_count']} nodes outside the largest"
        ),
        f"anomaly: {anomaly['published']} published, coverage {anomaly['coverage']}, "
        f"p50 {_ms(anomaly['p50_ms'])}, p99 {_ms(anomaly['p99_ms'])}, "
        f"{anomaly['msgs_per_node']} gossip frames per node per anomaly",
    ]
    if revocation["revoked"]:
        lines.append(
            f"revocation: {revocation['revoked']} revoked at {revocation['at_ms']} ms, "
            f"coverage {revocation['coverage']}, p50 {_ms(revocation['p50_ms'])}, "
            f"p99 {_ms(revocation['p99_ms'])}"
        )
    partition = report["partition"]
    if partition is not None:
        lines.append(
            f"partition {partition['at_ms']}..{partition['heal_at_ms']} ms: "
            f"{partition['anomalies_during']} anomalies during it, every node held them "
            f"{_ms(partition['heal_ms'])} after the heal"
        )
    if report["churn"] is not None:
        lines.append(f"churn: {report['churn']['nodes']} nodes went down and came back")
    bundles = report.get("bundles")
    if bundles is not None:
        lines.append(
            f"bundles: {bundles['delivered']} of {bundles['sent']} delivered "
            f"(ratio {bundles['delivery_ratio']}; {bundles['delivered_to_down']} of "
            f"{bundles['sent_to_down']} sent to a node that was down), "
            f"p50 {_ms(bundles['p50_ms'])}, p90 {_ms(bundles['p90_ms'])}, "
            f"max {_ms(bundles['max_ms'])}; {bundles['expired']} expired undelivered, "
            f"{bundles['refused']} refused, {bundles['stored_at_end']} copies held at the end"
        )
        broadcast = bundles["broadcast"]
        if broadcast["sent"]:
            lines.append(
                f"broadcast bundles: {broadcast['sent']} sent, coverage {broadcast['coverage']}"
                f" of the live nodes, p90 {_ms(broadcast['p90_ms'])}; "
                f"{bundles['contacts']['announced']} contact broadcasts"
            )
    final = report["final"]
    lines.append(
        f"at the end ({final['at_ms']} ms): {final['links']} links, "
        + ("connected" if final["connected"] else f"{final['components']} components")
    )
    return "\n".join(lines)


def plot(result: SimResult, path: Path) -> None:
    """Anomaly coverage over time and the delivery latency histogram, as SVG."""
    try:  # optional (the plot extra): imported here, never at module load
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib: pip install 'trustmesh[plot]' (the simulation itself "
            "runs without it)"
        ) from None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    curve = result.coverage_curve
    if curve:
        left.step([p[0] for p in curve], [p[1] for p in curve], where="post")
    left.set_xlabel("ms after publishing")
    left.set_ylabel("fraction of nodes holding the anomaly")
    left.set_ylim(0, 1.02)
    left.set_title("anomaly coverage")
    delays = [d for got in result.anomaly_delays for d in got]
    if delays:
        right.hist(delays, bins=min(50, max(5, len(set(delays)))))
    right.set_xlabel("delivery latency (ms)")
    right.set_ylabel("nodes")
    right.set_title(f"{len(delays)} deliveries")
    report = result.report
    figure.suptitle(f"trustmesh sim: {report['nodes']} nodes, seed {report['seed']}")
    figure.tight_layout()
    figure.savefig(path, format="svg")
    plt.close(figure)
