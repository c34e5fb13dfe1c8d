"""``trustmesh sim``: the mesh at scale, on a virtual clock (docs/sim.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from trustmesh.sim import SimConfig, parse_range, simulate
from trustmesh.sim.config import ADMISSIONS, CRYPTO_MODES
from trustmesh.sim.output import plot, summary, to_json


class _Range(click.ParamType):  # type: ignore[type-arg]
    name = "A..B"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_range(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command()
@click.option(
    "--nodes", type=click.IntRange(2), default=100, show_default=True, help="Nodes in the mesh."
)
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same run.")
@click.option(
    "--loss",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Probability that a GOSSIP, IHAVE or IWANT frame is dropped (links stay up).",
)
@click.option(
    "--latency-ms",
    type=_Range(),
    default="5..50",
    show_default=True,
    help="One-way latency, uniform in A..B ms, drawn per write.",
)
@click.option("--partition-at", type=click.IntRange(0), help="Split the mesh in two halves (ms).")
@click.option("--heal-at", type=click.IntRange(0), help="Heal the partition (ms).")
@click.option(
    "--churn",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Fraction of the non-bootstrap nodes that go down once after formation and return.",
)
@click.option(
    "--revoke", type=click.IntRange(0), default=1, show_default=True, help="Nodes to revoke."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write coverage over time and a latency histogram as SVG (needs matplotlib).",
)
@click.option(
    "--bootstrap",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="The first nodes: every node's bootstrap list (never revoked or churned).",
)
@click.option(
    "--max-links",
    type=click.IntRange(1, 1024),
    default=12,
    show_default=True,
    help="The high mark: links a node holds at most.",
)
@click.option(
    "--dial-target",
    type=click.IntRange(1),
    help="The low mark (default: the core's, max_links // 3; legacy: max_links // 2).",
)
@click.option(
    "--admission",
    type=click.Choice(ADMISSIONS),
    default="managed",
    show_default=True,
    help="legacy: the policy before issue 17 (dial target max_links // 2, address-book "
    "order, no room/spare/open hints, no eviction, no rotation), to compare.",
)
@click.option(
    "--anomalies",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Anomalies to publish, 200 ms apart, each from a random node.",
)
@click.option("--anomaly-at", type=click.IntRange(0), help="First anomaly (ms).")
@click.option("--revoke-at", type=click.IntRange(0), help="The revocation (ms).")
@click.option(
    "--join-ms",
    type=click.IntRange(0),
    default=5_000,
    show_default=True,
    help="Non-bootstrap nodes start at random times in 0..join-ms.",
)
@click.option(
    "--formed-at",
    type=click.IntRange(1),
    default=20_000,
    show_default=True,
    help="When formation is judged; the anomalies follow by default.",
)
@click.option("--duration", "duration_ms", type=click.IntRange(1), help="Stop at this ms.")
@click.option(
    "--crypto",
    type=click.Choice(CRYPTO_MODES),
    default="shared",
    show_default=True,
    help="shared: each chain and signature is checked by OpenSSL once for all nodes; "
    "full: every node checks everything itself.",
)
@click.option(
    "--bundles",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Unicast bundles to send, each from a random up node to a random other node "
    "(with --bundles or --bundle-broadcasts, every node runs a bundle agent).",
)
@click.option(
    "--bundle-broadcasts",
    type=click.IntRange(0),
    help="Broadcast bundles (dtn://~mesh/inbox) to send [default: 2 with --bundles, else 0].",
)
@click.option(
    "--bundle-ttl",
    "bundle_ttl_ms",
    type=click.IntRange(1),
    default=600_000,
    show_default=True,
    help="Each bundle's lifetime (ms).",
)
@click.option(
    "--bundle-copies",
    type=click.IntRange(1, 255),
    default=8,
    show_default=True,
    help="Spray-and-wait copies a bundle starts with.",
)
@click.option(
    "--bundle-size",
    type=click.IntRange(0, 60_000),
    default=256,
    show_default=True,
    help="Payload bytes of each bundle.",
)
@click.option(
    "--bundles-at",
    type=_Range(),
    help="Send the bundles at random times in A..B ms [default: from --formed-at over the "
    "churn window and the longest downtime].",
)
@click.option(
    "--bundle-to-down",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Share of the unicasts sent to a node that is down at the time (when one is).",
)
@click.option("--progress", is_flag=True, help="A line on stderr every 5 s of virtual time.")
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Processes that issue the certificates (from 2,000 nodes).",
)
def sim(
    as_json: bool,
    plot_path: Path | None,
    latency_ms: tuple[int, int],
    progress: bool,
    **options: Any,
) -> int:
    """Simulate a mesh on a virtual clock with the real node, link and gossip cores.

    \b
    Real certificates from a real CA, real signatures, real frames; the network, TLS,
    churn and partitions are modelled (docs/sim.md). Times are virtual milliseconds.
    The mesh forms from the bootstrap nodes, anomalies are published from random nodes,
    the CA revokes nodes, random nodes send bundles (--bundles), and the run ends when
    every node holds everything (or at the end of the scenario plus two minutes).
    """
    try:
        config = SimConfig(latency_ms=latency_ms, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    result = simulate(config, progress=_progress if progress else None)
    if plot_path is not None:
        try:
            plot(result, plot_path)
        except RuntimeError as exc:  # matplotlib is missing
            raise click.ClickException(str(exc)) from None
    click.echo(to_json(result.report) if as_json else summary(result.report))
    return 0


def _progress(line: str) -> None:
    click.echo(line, err=True)
