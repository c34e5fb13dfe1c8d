"""The mesh benchmark's measurements do real work: the engine verifies every message (a bad
signature or a duplicate fails the round), and a quick run reports every figure with its
anchor, the way ``python -m bench mesh --json`` prints them."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature

from bench import mesh as mesh_bench
from bench.harness import report
from trustmesh.mesh.errors import BadSignature, UntrustedOrigin
from trustmesh.mesh.gossip import decode_message

MESSAGES = 40


@pytest.fixture(scope="module")
def load(tmp_path_factory: pytest.TempPathFactory) -> mesh_bench.GossipLoad:
    return mesh_bench.gossip_load(tmp_path_factory.mktemp("mesh-bench"), MESSAGES)


def test_load_holds_distinct_signed_anomalies_with_their_chain(
    load: mesh_bench.GossipLoad,
) -> None:
    messages = [decode_message(raw) for raw in load.raws_with_chain]
    assert [m.chain for m in map(decode_message, load.raws)] == [()] * MESSAGES
    assert len({m.message_id for m in messages}) == MESSAGES
    assert [m.message_id for m in messages] == load.message_ids
    assert len({m.payload["hash"] for m in messages}) == MESSAGES
    for message, (signature, data) in zip(messages, load.signed, strict=True):
        assert message.origin == mesh_bench.ORIGIN
        assert message.kind == "anomaly"
        assert len(message.chain) == 2  # the leaf and the issuing CA
        assert load.trust.identity(message.chain, now_ms=load.now_ms).node_id == mesh_bench.ORIGIN
        assert (signature, data) == (message.signature, message.signed_bytes())


def test_rounds_measure_positive_rates(load: mesh_bench.GossipLoad) -> None:
    assert mesh_bench.engine_round(load) > 0
    assert mesh_bench.verify_round(load) > 0


def _forged(load: mesh_bench.GossipLoad) -> mesh_bench.GossipLoad:
    """The load with the last message's signature replaced by the first one's."""
    last = decode_message(load.raws_with_chain[-1])
    forged = dataclasses.replace(last, signature=load.signed[0][0])
    return dataclasses.replace(
        load,
        raws=[*load.raws[:-1], forged.encode(with_chain=False)],
        raws_with_chain=[*load.raws_with_chain[:-1], forged.encode()],
        signed=[*load.signed[:-1], (forged.signature, forged.signed_bytes())],
    )


def test_a_bad_signature_fails_both_rounds(load: mesh_bench.GossipLoad) -> None:
    forged = _forged(load)
    # Chain-less, no known certificate fits: dropped (not a proven forgery) ...
    with pytest.raises(UntrustedOrigin):
        mesh_bench.engine_round(forged)
    # ... and with its chain, a forgery.
    with pytest.raises(BadSignature):
        mesh_bench.engine_round(forged, with_chain=True)
    with pytest.raises(InvalidSignature):
        mesh_bench.verify_round(forged)


def test_a_duplicate_fails_the_engine_round(load: mesh_bench.GossipLoad) -> None:
    repeated = dataclasses.replace(load, raws=[*load.raws, load.raws[0]])
    with pytest.raises(mesh_bench.BenchFailure, match="1 duplicates"):
        mesh_bench.engine_round(repeated)


def test_quick_run_reports_every_figure_with_its_anchor() -> None:
    nodes = 4
    results = mesh_bench.run(
        messages=MESSAGES,
        verify_rounds=1,
        nodes=nodes,
        coverage_rounds=2,
        bulk_rounds=1,
        bulk_messages=8,
    )
    assert [r.metric for r in results] == [
        "gossip_verify_per_s",
        "gossip_verify_chain_per_s",
        f"coverage_ms_{nodes}",
        "coverage_msgs_per_node",
        "coverage_dups_per_node",
        "link_bulk_mib_per_s",
    ]
    verify, verify_chain, coverage, messages, duplicates, link_bulk = results
    for result in (verify, verify_chain, coverage, messages, link_bulk):
        assert result.value > 0
        assert result.anchor_value > 0
        assert math.isfinite(result.ratio)
        assert result.ratio > 0
    # Alternating rounds give paired ratios; the coverage counts have no anchor rounds.
    assert all(r.paired_ratio is not None for r in (verify, verify_chain, coverage, link_bulk))
    assert messages.paired_ratio is None and duplicates.paired_ratio is None
    # Every node but the origin took the anomaly once: at least (n - 1) / n deliveries.
    assert messages.anchor_value == pytest.approx((nodes - 1) / nodes)
    assert messages.ratio >= 1
    assert 0 <= duplicates.value < messages.value
    assert duplicates.anchor_value == messages.value
    assert 0 <= duplicates.ratio < 1
    assert link_bulk.unit == "MiB/s"
    assert "pyOpenSSL" in link_bulk.anchor
    assert "TLS_AES" in link_bulk.anchor or "CHACHA" in link_bulk.anchor  # the cipher named
    # The JSON report, as ``python -m bench mesh --json`` prints it.
    printed = json.loads(report("mesh", results, as_json=True))
    assert printed["bench"] == "mesh"
    for result, printed_result in zip(results, printed["results"], strict=True):
        assert set(printed_result) == {"metric", "value", "unit", "anchor", "anchor_value", "ratio"}
        assert printed_result["ratio"] == pytest.approx(result.ratio, abs=1e-4)
    text = report("mesh", results, as_json=False)
    assert text.splitlines()[0] == "bench mesh"
    assert all(r.metric in text for r in results)


def test_bulk_moves_every_bundle_over_a_tls_link_and_the_anchor(tmp_path: Path) -> None:
    link, cipher = mesh_bench.bulk(tmp_path, rounds=1, messages=4, size=32 * 1024)
    assert link.value > 0
    assert link.anchor_value > 0
    assert link.ratio == pytest.approx(link.value / link.anchor_value)  # one round
    assert cipher.startswith("TLS_")  # a TLS 1.3 suite, the same on both (else it fails)


def test_the_bench_offers_a_quick_run() -> None:
    """``python -m bench mesh --quick`` (the CLI passes quick=True when run() takes it)."""
    assert "quick" in inspect.signature(mesh_bench.run).parameters
