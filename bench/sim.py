"""Simulation: wall time of ``trustmesh sim`` runs, and what the mesh does in them.

- sim_wall_s_1k: wall seconds (setup included: the CA issues every certificate) of a
  1,000-node run with one anomaly and one revocation, loss 0, latency 5..50 ms (the CLI's
  defaults). Goal: under 10 s.
- sim_wall_s_10k: the same with 10,000 nodes. Goal: under 120 s on 2 cores. Left out
  with ``--quick`` (which runs 200 nodes instead of 1,000).
  Anchor for both: the wall seconds of 1,000 P-256 ECDSA verifications
  (``cryptography``) measured in the same run, so the ratio is the run's cost in
  thousands of signature checks, and the figure per 1,000 nodes is comparable across
  machines.
- sim_coverage_loss30: anomaly coverage with 30 % of GOSSIP, IHAVE and IWANT frames lost
  (1,000 nodes; 200 with ``--quick``). Goal: 1.0. Anchor: 1.0 (the ratio is the figure).
- sim_heal_ms: ms from a partition's heal until every node holds the anomaly published
  during it (partition 20..60 s; 1,000 nodes, 200 with ``--quick``). Anchor: the message
  lifetime (1 h); goal: ratio under 1. A run that never heals reports the lifetime.
"""

from __future__ import annotations

import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.harness import Result
from trustmesh.mesh.gossip import DEFAULT_TTL_MS
from trustmesh.sim import SimConfig, simulate

ANCHOR = "1,000 P-256 ECDSA verifications (s)"


def anchor_s(count: int = 1000) -> float:
    """Seconds for ``count`` P-256 signature verifications, the median of 5 rounds."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    data = b"trustmesh sim anchor" * 16
    signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(count):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        rounds.append(time.perf_counter() - start)
    return sorted(rounds)[len(rounds) // 2]


def run(*, quick: bool = False) -> list[Result]:
    sizes = [200] if quick else [1000, 10_000]
    figure_nodes = 200 if quick else 1000
    results = []
    for nodes in sizes:
        anchor = anchor_s()
        report = simulate(SimConfig(nodes=nodes, seed=1)).report
        name = f"sim_wall_s_{nodes // 1000}k" if nodes >= 1000 else f"sim_wall_s_{nodes}"
        results.append(Result(name, report["wall_s"], "s", ANCHOR, anchor))
    lossy = simulate(SimConfig(nodes=figure_nodes, seed=1, loss=0.3, revoke=0)).report
    results.append(
        Result("sim_coverage_loss30", lossy["anomaly"]["coverage"], "fraction", "1.0", 1.0)
    )
    parted = simulate(
        SimConfig(nodes=figure_nodes, seed=1, partition_at=20_000, heal_at=60_000, revoke=0)
    ).report
    heal = parted["partition"]["heal_ms"]
    results.append(
        Result(
            "sim_heal_ms",
            float(heal if heal is not None else DEFAULT_TTL_MS),
            "ms",
            "message lifetime (ms)",
            float(DEFAULT_TTL_MS),
        )
    )
    return results
