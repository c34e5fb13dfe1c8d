"""Costly junk is penalised (mesh-link.md section 6.2): a duplicate whose chain would be
checked takes a rate token first; invalid signatures, undecodable frames, bad message ids
and duplicate floods lower a peer's score, which decays with time; below the threshold
the peer is graylisted and its frames are dropped unread until a cooldown ends. Every
time is given (``now_ms``): no clock, no sleep."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshtools import T0_MS, MeshPki, Node, anomaly

from trustmesh.errors import DecodeError, ProtocolError
from trustmesh.mesh import engine as engine_module
from trustmesh.mesh.engine import GossipEngine, Received
from trustmesh.mesh.errors import BadMessageId, BadSignature, GossipRejected, RateLimited
from trustmesh.mesh.trust import TrustView

PEERS = ["peer-a", "peer-b", "peer-c"]


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path / "ca")
    yield mesh
    mesh.close()


@pytest.fixture
def origin(pki: MeshPki) -> Node:
    return pki.node("origin-1")


def batch(
    engine: GossipEngine, raws: list[bytes], *, sender: str = "peer-a", now_ms: int = T0_MS
) -> list[Received | ProtocolError]:
    return engine.receive_batch(raws, sender=sender, peers=PEERS, now_ms=now_ms)


def codes(results: list[Received | ProtocolError]) -> list[str]:
    return [
        ("new" if r.new else "dup") if isinstance(r, Received) else getattr(r, "code", "malformed")
        for r in results
    ]


class Untouchable:
    """Ids that must not be read."""

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the frame of a graylisted peer was read")


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


# --- rate: a duplicate whose chain is checked takes a token ------------------------------


def test_a_flood_of_chain_duplicates_is_rate_limited_before_the_chains_are_checked(
    pki: MeshPki, origin: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = GossipEngine("me", pki.trust(), rate=10, burst=20, rng=random.Random(1))
    message = origin.sign(anomaly(1))
    engine.seen.add(message.message_id, message.expiry)  # as after a restart: id, no cert
    # Copies of a seen message under its own (correct) id, each carrying a chain the
    # engine has to check: one from another CA, which never verifies, so it is never
    # learnt and every copy costs a chain check.
    foreign = MeshPki(tmp_path / "foreign")
    try:
        junk = dataclasses.replace(message, chain=foreign.node("origin-1").chain_der).encode()
    finally:
        foreign.close()
    checks = count_calls(monkeypatch, TrustView, "identity")
    plain = dataclasses.replace(message, chain=()).encode()  # nothing to check: no token
    assert codes(batch(engine, [plain] * 50)) == ["dup"] * 50
    results = batch(engine, [junk] * 100)
    assert codes(results) == ["dup"] * 20 + ["rate-limited"] * 80
    assert len(checks) == 20  # the chain was checked only for copies that had a token
    assert engine.stats.rejected == {"rate-limited": 80}
    assert engine.stats.duplicates == 50 + 20
    # The tokens are those of new messages: the flood used them up.
    with pytest.raises(RateLimited):
        engine.receive_raw(
            origin.sign(anomaly(2)).encode(), sender="peer-a", peers=PEERS, now_ms=T0_MS
        )
    assert not engine.is_graylisted("peer-a", T0_MS)  # an unverifiable chain is not scored


# --- the score and graylisting -----------------------------------------------------------


def test_a_peer_sending_junk_is_graylisted_and_its_frames_are_then_dropped_unread(
    pki: MeshPki, origin: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = GossipEngine("me", pki.trust(), rng=random.Random(1))
    decoded = count_calls(monkeypatch, engine_module, "decode_message")
    # Ten undecodable frames in one read: the sixth takes the score below -50 (-10 each)
    # and the other four are not even parsed.
    results = batch(engine, [b"{not json"] * 10)
    assert all(isinstance(r, DecodeError) for r in results[:6])
    assert codes(results[6:]) == ["graylisted"] * 4
    assert len(decoded) == 6
    assert engine.score("peer-a", T0_MS) == -60.0
    assert engine.is_graylisted("peer-a", T0_MS)
    assert engine.graylisted_until("peer-a", T0_MS) == T0_MS + 300_000

    # Until the cooldown ends, its gossip, IHAVEs and IWANTs go unread.
    decoded.clear()
    valid = origin.sign(anomaly(1))
    later = T0_MS + 299_999
    assert codes(batch(engine, [valid.encode()] * 3, now_ms=later)) == ["graylisted"] * 3
    with pytest.raises(GossipRejected) as refused:
        engine.receive_raw(valid.encode(), sender="peer-a", peers=PEERS, now_ms=later)
    assert refused.value.code == "graylisted"
    assert engine.on_ihave("peer-a", Untouchable(), later) == []
    assert engine.on_iwant("peer-a", Untouchable(), later) == []
    assert decoded == [] and valid.message_id not in engine.seen
    assert engine.stats.rejected["graylisted"] == 4 + 3 + 1 + 2
    # Another peer is not affected, and the score outlives the link.
    assert codes(batch(engine, [valid.encode()], sender="peer-b", now_ms=later)) == ["new"]
    engine.forget_peer("peer-a")
    assert engine.is_graylisted("peer-a", later)

    # The cooldown over, it is heard again; its score has decayed (half-life 5 min).
    end = T0_MS + 300_000
    assert engine.graylisted_until("peer-a", end) is None
    assert engine.score("peer-a", end) == pytest.approx(-30.0)
    assert codes(batch(engine, [origin.sign(anomaly(2)).encode()], now_ms=end)) == ["new"]
    assert engine.on_ihave("peer-a", ["x" * 64], end) == ["x" * 64]
    scoring = engine.scoring
    assert (scoring.invalid, scoring.threshold, scoring.cooldown_ms) == (-10.0, -50.0, 300_000)


def test_bad_signatures_and_bad_ids_lower_the_score(pki: MeshPki, origin: Node) -> None:
    engine = GossipEngine("me", pki.trust(), rng=random.Random(1))
    message = origin.sign(anomaly(1))
    forged = dataclasses.replace(message, signature=origin.sign(anomaly(2)).signature)
    squatted = dataclasses.replace(origin.sign(anomaly(3)), message_id="f" * 64)
    results = batch(engine, [forged.encode(), squatted.encode()])
    assert isinstance(results[0], BadSignature) and isinstance(results[1], BadMessageId)
    assert engine.score("peer-a", T0_MS) == -20.0
    with pytest.raises(BadSignature):  # one frame at a time, as well
        engine.receive(forged, forged.encode(), sender="peer-a", peers=PEERS, now_ms=T0_MS)
    assert engine.score("peer-a", T0_MS) == -30.0
    # A forged copy of a message seen before, under a chain it must be checked against
    # (its origin unknown, as after a restart), is a forgery too.
    restarted = GossipEngine("me", pki.trust(), rng=random.Random(1))
    restarted.seen.add(message.message_id, message.expiry)
    assert codes(batch(restarted, [forged.encode()] * 7)) == ["dup"] * 5 + ["graylisted"] * 2
    assert restarted.is_graylisted("peer-a", T0_MS)


def test_a_duplicate_flood_graylists_the_peer(pki: MeshPki, origin: Node) -> None:
    scoring = engine_module.ScoreParams(duplicate_rate=10.0, duplicate_burst=10)
    engine = GossipEngine("me", pki.trust(), rng=random.Random(1), scoring=scoring)
    message = origin.sign(anomaly(1))
    raw = message.encode()
    assert codes(batch(engine, [raw])) == ["new"]
    # 10 duplicates are free, each one beyond costs 1: the 51st beyond graylists.
    results = batch(engine, [raw] * 100)
    assert codes(results) == ["dup"] * 60 + ["graylisted"] * 40
    assert engine.score("peer-a", T0_MS) == -51.0
    # Honest duplicates, within the allowance, cost nothing.
    assert codes(batch(engine, [raw] * 10, sender="peer-b")) == ["dup"] * 10
    assert engine.score("peer-b", T0_MS) == 0.0


def test_scores_decay_are_forgotten_and_the_table_is_bounded(pki: MeshPki) -> None:
    scoring = engine_module.ScoreParams(capacity=3)
    engine = GossipEngine("me", pki.trust(), scoring=scoring)
    assert engine.score("peer-a", T0_MS) == 0.0 and engine.graylisted_until("peer-a", T0_MS) is None
    assert not engine.penalise("peer-a", -10.0, T0_MS)
    assert engine.score("peer-a", T0_MS + 300_000) == pytest.approx(-5.0)
    assert engine.score("peer-a", T0_MS + 600_000) == pytest.approx(-2.5)
    # Decayed above -0.5, it is forgotten: five half-lives take -10 to -0.31.
    assert engine.score("peer-a", T0_MS + 1_500_000) == 0.0
    assert engine.scored_peers() == []
    for n in range(5):
        engine.penalise(f"peer-{n}", -1.0, T0_MS + n)
    assert engine.scored_peers() == ["peer-2", "peer-3", "peer-4"]  # the latest penalised
    # The API's and the node's own messages have no sender, and are never scored.
    with pytest.raises(DecodeError):
        engine.receive_raw(b"junk", sender=None, peers=PEERS, now_ms=T0_MS)
    assert engine.scored_peers() == ["peer-2", "peer-3", "peer-4"]


def test_a_graylisting_lasts_its_cooldown_even_if_the_score_recovers_sooner(
    pki: MeshPki,
) -> None:
    scoring = engine_module.ScoreParams(half_life_ms=1000, cooldown_ms=60_000)
    engine = GossipEngine("me", pki.trust(), scoring=scoring)
    assert engine.penalise("peer-a", -60.0, T0_MS)
    assert not engine.penalise("peer-a", -60.0, T0_MS + 1)  # already graylisted
    assert engine.score("peer-a", T0_MS + 30_000) > -0.5  # decayed: not forgotten yet
    assert engine.graylisted_until("peer-a", T0_MS + 30_000) == T0_MS + 60_000
    assert engine.scored_peers() == ["peer-a"]


@pytest.mark.parametrize(
    "bad",
    [
        {"invalid": 1.0},
        {"threshold": 0.0},
        {"duplicate": 0.5},
        {"half_life_ms": 0},
        {"capacity": 0},
        {"cooldown_ms": -1},
    ],
)
def test_score_parameters_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        engine_module.ScoreParams(**bad)
