"""Lost gossip is repaired: an id pushed or announced to a peer that is not known to
hold it is announced again, 2 s later and then after twice as long each time, four
times at most; a peer that proves it holds the id (it sent or announced it) is told no
more."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtools import T0_MS, MeshPki, anomaly

from trustmesh.mesh.engine import MAX_DIGEST, REPEAT_MS, REPEATS, GossipEngine


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path / "ca")
    yield mesh
    mesh.close()


def test_a_push_is_announced_again_until_the_repeats_run_out(pki: MeshPki) -> None:
    origin = pki.node("node-o")
    engine = GossipEngine("node-a", pki.trust(), fanout=8, rng=random.Random(1))
    message = origin.sign(anomaly(1))
    received = engine.receive(message, message.encode(), sender=None, peers=["b"], now_ms=T0_MS)
    assert received.forward_to == ("b",)  # pushed: maybe lost
    assert engine.ihave_for("b", T0_MS + REPEAT_MS - 1) == []
    now, wait, announced = T0_MS + REPEAT_MS, REPEAT_MS, []
    for _ in range(REPEATS + 2):
        ids = engine.ihave_for("b", now)
        announced.append(now if ids else None)
        assert engine.ihave_for("b", now) == []  # once per due time
        wait *= 2
        now += wait
    assert [t for t in announced if t is not None] == announced[:REPEATS]
    assert announced[REPEATS:] == [None, None]


def test_a_peer_that_holds_the_message_is_told_no_more(pki: MeshPki) -> None:
    origin = pki.node("node-o")
    engine = GossipEngine("node-a", pki.trust(), fanout=8, rng=random.Random(1))
    message = origin.sign(anomaly(2))
    engine.receive(message, message.encode(), sender=None, peers=["b", "c"], now_ms=T0_MS)
    engine.on_ihave("b", [message.message_id], T0_MS + 1)  # b announced it: b holds it
    later = T0_MS + REPEAT_MS
    assert engine.ihave_for("b", later) == []
    assert engine.ihave_for("c", later) == [message.message_id]


def test_an_iwant_answer_that_is_lost_is_announced_again(pki: MeshPki) -> None:
    origin = pki.node("node-o")
    engine = GossipEngine("node-a", pki.trust(), fanout=1, rng=random.Random(1))
    message = origin.sign(anomaly(3))
    engine.receive(message, message.encode(), sender=None, peers=[], now_ms=T0_MS)
    assert engine.ihave_for("b", T0_MS) == [message.message_id]
    assert [r.message_id for r in engine.on_iwant("b", [message.message_id], T0_MS + 5)] == [
        message.message_id
    ]
    assert engine.ihave_for("b", T0_MS + 5 + REPEAT_MS) == [message.message_id]


def test_an_iwant_answer_carries_the_chain_even_to_a_peer_sent_it_before(
    pki: MeshPki,
) -> None:
    """The copy that carried the chain may be the one lost: a light copy after it would
    be refused (untrusted origin) each time the peer asks again."""
    origin = pki.node("node-o")
    engine = GossipEngine("node-a", pki.trust(), fanout=1, rng=random.Random(1))
    first, second = origin.sign(anomaly(4)), origin.sign(anomaly(5))
    for message in (first, second):
        engine.receive(message, message.encode(), sender=None, peers=[], now_ms=T0_MS)
    held = engine.on_iwant("b", [first.message_id, second.message_id], T0_MS)
    assert b'"chain"' in engine.wire_for("b", held[0])  # the first copy: with the chain
    assert b'"chain"' not in engine.wire_for("b", held[1])  # b has seen the certificate
    assert b'"chain"' in engine.wire_for("b", held[1], with_chain=True)


def test_a_backlog_beyond_one_digest_drains_over_the_next_ones(pki: MeshPki) -> None:
    origin = pki.node("node-o")
    engine = GossipEngine("node-a", pki.trust(), fanout=1, rng=random.Random(1))
    held = []
    for n in range(MAX_DIGEST + 88):
        message = origin.sign(anomaly(1000 + n))
        engine.receive(message, message.encode(), sender=None, peers=[], now_ms=T0_MS)
        held.append(message.message_id)
    first = engine.ihave_for("new", T0_MS)
    second = engine.ihave_for("new", T0_MS + 1)
    assert len(first) == MAX_DIGEST and len(second) == 88
    assert set(first) | set(second) == set(held)  # none told without being sent
