"""The BRC-103 benchmark's measurements do real work: every handshake and round trip goes
through the JSON wire form and the peers' checks (a forged signature fails the round), and
a quick run reports every figure with its bsv-sdk anchor, as ``python -m bench brc103``
prints them."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from bench import brc103 as brc103_bench
from bench.harness import report
from trustmesh.brc103.errors import MessageSignatureError
from trustmesh.brc103.messages import AuthMessage, MessageType
from trustmesh.brc103.peer import Peer
from trustmesh.brc103.wallet import Wallet


def test_handshake_authenticates_both_sides() -> None:
    wallet_a, wallet_b = Wallet.generate(), Wallet.generate()
    a, b = brc103_bench.handshake(wallet_a, wallet_b)
    ours = a.session(identity_key=wallet_b.identity_key)
    theirs = b.session(identity_key=wallet_a.identity_key)
    assert ours.is_authenticated
    assert theirs.is_authenticated
    assert ours.peer_nonce == theirs.session_nonce
    assert theirs.peer_nonce == ours.session_nonce


def test_a_forged_initial_response_fails_the_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wire hop is where the bench's messages can be tampered with: a flipped signature
    byte in the initialResponse is refused by A's signature check."""
    real = brc103_bench._wire

    def tamper(message: AuthMessage) -> AuthMessage:
        parsed = real(message)
        if parsed.message_type is MessageType.INITIAL_RESPONSE:
            assert parsed.signature is not None
            parsed.signature = parsed.signature[:-1] + bytes([parsed.signature[-1] ^ 1])
        return parsed

    monkeypatch.setattr(brc103_bench, "_wire", tamper)
    with pytest.raises(MessageSignatureError):
        brc103_bench.handshake(Wallet.generate(), Wallet.generate())


def test_new_peer_handshakes_recompute_the_shared_point() -> None:
    wallet_a, wallet_b = Wallet.generate(), Wallet.generate()
    brc103_bench.handshake(wallet_a, wallet_b)
    assert wallet_b.public_key in wallet_a._shared
    brc103_bench.forget_each_other(wallet_a, wallet_b)
    assert wallet_b.public_key not in wallet_a._shared
    assert wallet_a.public_key not in wallet_b._shared
    assert wallet_a.public_key in wallet_a._shared  # its own point, for the nonce HMACs
    brc103_bench.handshake(wallet_a, wallet_b)
    assert wallet_b.public_key in wallet_a._shared


def test_rounds_measure_positive_rates() -> None:
    assert brc103_bench.handshake_round(0.02) > 0
    assert brc103_bench.handshake_round(0.02, first_contact=True) > 0
    assert brc103_bench.roundtrip_round(0.02) > 0


def test_a_round_trip_that_loses_its_payload_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Peer.create_general

    def truncating(self: Peer, payload: bytes, **kwargs: Any) -> AuthMessage:
        return real(self, payload[:-1], **kwargs)

    monkeypatch.setattr(Peer, "create_general", truncating)
    with pytest.raises(brc103_bench.BenchFailure, match="not delivered intact"):
        brc103_bench.roundtrip_round(0.01)


def test_quick_run_reports_every_figure_with_its_anchor() -> None:
    results = brc103_bench.run(round_time=0.02, rounds=1)
    assert [r.metric for r in results] == [
        "handshakes_per_s",
        "handshakes_new_peer_per_s",
        "general_roundtrip_per_s",
    ]
    for result in results:
        assert result.value > 0
        assert result.anchor_value > 0
        assert math.isfinite(result.ratio)
        assert result.anchor.startswith("bsv-sdk")
    printed = json.loads(report("brc103", results, as_json=True))
    assert printed["bench"] == "brc103"
    for result, printed_result in zip(results, printed["results"], strict=True):
        assert set(printed_result) == {"metric", "value", "unit", "anchor", "anchor_value", "ratio"}
        assert result.paired_ratio is not None
        assert printed_result["ratio"] == pytest.approx(result.paired_ratio, abs=1e-4)
    text = report("brc103", results, as_json=False)
    assert text.splitlines()[0] == "bench brc103"
    assert all(r.metric in text for r in results)
