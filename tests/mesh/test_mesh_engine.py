"""The gossip engine: acceptance checks in order, fanout, duplicates, rate limits, CRLs
carried by gossip, the ihave/iwant digests, and the seen-cache."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshtools import T0_MS, MeshPki, Node, anomaly, ms

from trustmesh.errors import ProtocolError
from trustmesh.mesh.engine import (
    CLOCK_SKEW_MS,
    MAX_DIGEST,
    GossipEngine,
    Received,
    SeenCache,
)
from trustmesh.mesh.errors import (
    BadMessageId,
    BadSignature,
    ExpiredMessage,
    GossipRejected,
    MalformedMessage,
    RateLimited,
    RevokedOrigin,
    UntrustedOrigin,
)
from trustmesh.mesh.gossip import GossipMessage, crl_payload, derive_message_id
from trustmesh.mesh.trust import CrlRejected

PEERS = ("peer-a", "peer-b", "peer-c", "peer-d", "peer-e")
HOUR = 3600 * 1000


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path / "ca")
    yield mesh
    mesh.close()


@pytest.fixture
def origin(pki: MeshPki) -> Node:
    return pki.node("origin-1")


@pytest.fixture(scope="module")
def engine_pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshPki, GossipMessage]]:
    """A module-wide CA and one message from origin-1, for the property tests."""
    mesh = MeshPki(tmp_path_factory.mktemp("engine") / "ca")
    yield mesh, mesh.node("origin-1").sign(anomaly(3))
    mesh.close()


def forge(message: GossipMessage, **changes: object) -> GossipMessage:
    """``message`` with ``changes`` and the id derived from its new content (so that its
    signature, not its id, is what gives it away)."""
    changed = dataclasses.replace(message, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(
        changed,
        message_id=derive_message_id(
            changed.origin, changed.payload, changed.timestamp, changed.expiry
        ),
    )


def engine_for(pki: MeshPki, **kwargs: object) -> GossipEngine:
    return GossipEngine("me", pki.trust(), rng=random.Random(7), **kwargs)  # type: ignore[arg-type]


def take(
    engine: GossipEngine,
    message: GossipMessage,
    *,
    sender: str | None = "peer-a",
    peers: tuple[str, ...] = PEERS,
    now_ms: int = T0_MS,
) -> Received:
    return engine.receive(message, message.encode(), sender=sender, peers=peers, now_ms=now_ms)


# --- accepting and forwarding -------------------------------------------------------------


def test_a_new_message_is_accepted_and_forwarded_to_fanout_peers(
    pki: MeshPki, origin: Node
) -> None:
    engine = engine_for(pki, fanout=3)
    message = origin.sign(anomaly(1))
    got = take(engine, message, sender="peer-a", peers=(*PEERS, "origin-1"))
    assert got.new and got.message == message and got.raw == message.encode()
    assert got.origin is not None and got.origin.node_id == "origin-1"
    assert got.crl is None
    assert len(got.forward_to) == 3 and len(set(got.forward_to)) == 3
    assert set(got.forward_to) <= {"peer-b", "peer-c", "peer-d", "peer-e"}
    assert message.message_id in engine.seen
    assert engine.stats.accepted == 1 and engine.stats.forwarded == 3
    assert engine.recent_ids() == [message.message_id]


def test_with_few_peers_all_but_sender_and_origin_get_it(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki, fanout=3)
    got = take(engine, origin.sign(), sender="peer-a", peers=("peer-a", "origin-1", "peer-b"))
    assert got.forward_to == ("peer-b",)


@settings(max_examples=60, deadline=None)
@given(
    peers=st.lists(st.sampled_from([*PEERS, "origin-1", "peer-f", "peer-g"]), unique=True),
    sender=st.sampled_from([None, *PEERS]),
    fanout=st.integers(1, 6),
    seed=st.integers(0, 2**32),
)
def test_forwarding_never_goes_to_the_sender_or_the_origin(
    engine_pki: tuple[MeshPki, GossipMessage],
    peers: list[str],
    sender: str | None,
    fanout: int,
    seed: int,
) -> None:
    pki, message = engine_pki
    engine = GossipEngine("me", pki.trust(), fanout=fanout, rng=random.Random(seed))
    got = take(engine, message, sender=sender, peers=tuple(peers))
    candidates = {p for p in peers if p not in (sender, "origin-1")}
    assert set(got.forward_to) <= candidates
    assert len(set(got.forward_to)) == len(got.forward_to) == min(fanout, len(candidates))


def test_a_duplicate_is_counted_and_not_forwarded(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    message = origin.sign()
    take(engine, message, sender="peer-a")
    again = take(engine, message, sender="peer-b")
    assert again == Received(message.message_id, new=False)
    assert engine.stats.duplicates == 1 and engine.stats.accepted == 1


def test_raw_bytes_are_kept_byte_for_byte(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    message = origin.sign()
    raw = b"  " + message.encode().replace(b",", b", ") + b"\n"
    got = engine.receive_raw(raw, sender="peer-a", peers=PEERS, now_ms=T0_MS)
    assert got.raw == raw and got.message == message
    (held,) = engine.on_iwant("peer-z", [message.message_id], T0_MS)
    assert held.raw == raw and held.message == message


def test_receive_raw_counts_malformed_input(pki: MeshPki) -> None:
    engine = engine_for(pki)
    with pytest.raises(MalformedMessage):
        engine.receive_raw(b'{"message_id":1}', sender="peer-a", peers=PEERS, now_ms=T0_MS)
    assert engine.stats.rejected == {"malformed": 1}


def test_publish_is_checked_and_forwarded_like_any_message(pki: MeshPki) -> None:
    me = pki.node("me")
    engine = GossipEngine("me", pki.trust(), fanout=2, rng=random.Random(1))
    message = me.sign()
    got = engine.publish(message, message.encode(), ["me", "peer-a", "peer-b", "peer-c"], T0_MS)
    assert got.new and len(got.forward_to) == 2 and "me" not in got.forward_to
    forged = forge(me.sign(anomaly(2)), payload=anomaly(3))
    with pytest.raises(BadSignature):
        engine.publish(forged, forged.encode(), ["peer-a"], T0_MS)


def test_engine_parameters_are_checked(pki: MeshPki) -> None:
    with pytest.raises(ValueError, match="fanout"):
        GossipEngine("me", pki.trust(), fanout=0)


# --- lifetime -----------------------------------------------------------------------------


def test_an_expired_message_is_refused(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    message = origin.sign(ttl_ms=1000)
    with pytest.raises(ExpiredMessage, match="expired"):
        take(engine, message, now_ms=message.expiry)
    with pytest.raises(ExpiredMessage):
        take(engine, message, now_ms=message.expiry + HOUR)
    assert take(engine, message, now_ms=message.expiry - 1).new
    assert engine.stats.rejected == {"expired": 2}


def test_a_message_from_the_future_is_refused(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    with pytest.raises(ExpiredMessage, match="future"):
        take(engine, origin.sign(now_ms=T0_MS + CLOCK_SKEW_MS + 1))
    assert take(engine, origin.sign(now_ms=T0_MS + CLOCK_SKEW_MS)).new


def test_a_lifetime_over_the_maximum_is_refused(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki, max_ttl_ms=HOUR)
    with pytest.raises(ExpiredMessage, match="lifetime"):
        take(engine, origin.sign(ttl_ms=HOUR + 1))
    assert take(engine, origin.sign(ttl_ms=HOUR)).new


def test_a_message_that_expires_before_it_was_made_is_refused(pki: MeshPki, origin: Node) -> None:
    message = origin.sign()
    engine = engine_for(pki)
    for expiry in (message.timestamp, message.timestamp - 1):
        with pytest.raises(ExpiredMessage, match="before"):
            take(engine, dataclasses.replace(message, expiry=expiry))


def test_a_duplicate_that_has_expired_is_refused_not_counted(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    message = origin.sign(ttl_ms=1000)
    take(engine, message)
    with pytest.raises(ExpiredMessage):
        take(engine, message, now_ms=message.expiry)
    assert engine.stats.duplicates == 0


# --- signatures and origins ---------------------------------------------------------------


def test_a_bad_signature_is_refused(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    message = origin.sign(anomaly(1))
    for forged in (
        forge(message, payload=anomaly(2)),
        dataclasses.replace(message, signature=origin.sign(anomaly(2)).signature),
        # Signed by another node's key while carrying origin-1's real chain.
        dataclasses.replace(pki.node("evil").sign(origin="origin-1"), chain=origin.chain_der),
    ):
        with pytest.raises(BadSignature):
            take(engine, forged)
        assert forged.message_id not in engine.seen
    assert engine.stats.rejected == {"bad-signature": 3}
    assert engine.stats.forwarded == 0


def test_a_chain_naming_another_node_is_untrusted(pki: MeshPki, origin: Node) -> None:
    mallory = pki.node("mallory")
    engine = engine_for(pki)
    claim = mallory.sign(origin="origin-1")  # mallory's key and chain, origin-1's name
    with pytest.raises(UntrustedOrigin, match="names mallory"):
        take(engine, claim)
    # ... and the claim taught the engine nothing about origin-1.
    with pytest.raises(UntrustedOrigin, match="no certificate known"):
        take(engine, mallory.sign(origin="origin-1", with_chain=False))


def test_a_chain_from_another_ca_is_untrusted(pki: MeshPki, tmp_path: Path) -> None:
    foreign = MeshPki(tmp_path / "foreign")
    try:
        stranger = foreign.node("origin-1")
        with pytest.raises(UntrustedOrigin):
            take(engine_for(pki), stranger.sign())
    finally:
        foreign.close()


def test_without_a_chain_an_origin_is_trusted_once_its_chain_was_seen(
    pki: MeshPki, origin: Node
) -> None:
    engine = engine_for(pki)
    bare = origin.sign(anomaly(1), with_chain=False)
    with pytest.raises(UntrustedOrigin, match="send its chain"):
        take(engine, bare)
    assert bare.message_id not in engine.seen
    take(engine, origin.sign(anomaly(2)))  # with its chain
    got = take(engine, bare)
    assert got.new and got.origin is not None and got.origin.node_id == "origin-1"
    assert engine.stats.rejected == {"untrusted-origin": 1}


def test_a_revoked_origin_is_dropped_and_not_forwarded(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    take(engine, origin.sign(anomaly(1)))  # origin-1 is known, without a chain from now on
    forwarded = engine.stats.forwarded
    pki.revoke(origin)
    engine.trust.apply_crl(pki.crl())
    for message in (origin.sign(anomaly(2)), origin.sign(anomaly(3), with_chain=False)):
        with pytest.raises(RevokedOrigin):
            take(engine, message)
        assert message.message_id not in engine.seen
        assert message.message_id not in engine.recent_ids()
    assert engine.stats.forwarded == forwarded
    assert engine.stats.rejected == {"revoked": 2}


def test_received_carries_the_chain_that_verified_the_message(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    assert engine.chain_of("origin-1") == ()
    got = take(engine, origin.sign(anomaly(1)))
    assert got.chain == origin.chain_der
    assert engine.chain_of("origin-1") == origin.chain_der
    bare = take(engine, origin.sign(anomaly(2), with_chain=False))
    assert bare.chain == origin.chain_der
    # A leaf alone (its issuing CA known to the trust view) is the chain remembered.
    leaf_only = dataclasses.replace(origin.sign(anomaly(3)), chain=origin.chain_der[:1])
    assert take(engine, leaf_only).chain == origin.chain_der[:1]
    assert engine.chain_of("nobody") == ()


def test_a_refused_message_does_not_teach_the_engine_its_chain(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    forged = dataclasses.replace(pki.node("evil").sign(origin="origin-1"), chain=origin.chain_der)
    with pytest.raises(BadSignature):
        take(engine, forged)
    assert engine.chain_of("origin-1") == ()
    # The chain was valid, but no signature was proven under it: chain-less is still refused.
    with pytest.raises(UntrustedOrigin, match="send its chain"):
        take(engine, origin.sign(anomaly(1), with_chain=False))


def test_a_bad_signature_under_a_valid_new_chain_keeps_the_proven_certificate(
    pki: MeshPki, origin: Node
) -> None:
    engine = engine_for(pki)
    take(engine, origin.sign(anomaly(1)))
    renewed = pki.node("origin-1")  # a real, newer certificate for origin-1
    assert renewed.serial != origin.serial
    # Its genuine chain, but not signed with its key (an attacker replaying the chain).
    forged = dataclasses.replace(
        pki.node("mallory").sign(anomaly(2), origin="origin-1"), chain=renewed.chain_der
    )
    with pytest.raises(BadSignature):
        take(engine, forged)
    assert engine.chain_of("origin-1") == origin.chain_der
    # The proven certificate still verifies chain-less messages; the unproven one does not.
    assert take(engine, origin.sign(anomaly(3), with_chain=False)).new
    # Chain-less, a signature no known certificate fits is dropped, not taken for a
    # forgery: the sender may hold a certificate this node has not seen yet.
    with pytest.raises(UntrustedOrigin, match="send its chain"):
        take(engine, renewed.sign(anomaly(4), with_chain=False))
    assert engine.chain_of("origin-1") == origin.chain_der


def test_after_a_rotation_chain_less_messages_verify_under_both_certificates(
    pki: MeshPki, origin: Node
) -> None:
    engine = engine_for(pki)
    take(engine, origin.sign(anomaly(1)))
    renewed = pki.node("origin-1")
    got = take(engine, renewed.sign(anomaly(2)))  # proves the new certificate
    assert got.origin is not None and got.origin.serial == renewed.serial
    assert engine.chain_of("origin-1") == renewed.chain_der
    # Messages in flight, signed before the rotation, still verify (the previous one) ...
    old = take(engine, origin.sign(anomaly(3), with_chain=False))
    assert old.new and old.origin is not None and old.origin.serial == origin.serial
    assert old.chain == origin.chain_der
    # ... as do those signed after it (the latest one).
    new = take(engine, renewed.sign(anomaly(4), with_chain=False))
    assert new.new and new.origin is not None and new.origin.serial == renewed.serial
    assert new.chain == renewed.chain_der
    assert engine.stats.rejected == {}


def test_only_the_three_latest_certificates_are_kept(pki: MeshPki) -> None:
    engine = engine_for(pki)
    first, second, third, fourth = (pki.node("origin-1") for _ in range(4))
    for i, node in enumerate((first, second, third, fourth)):
        take(engine, node.sign(anomaly(i)))
    assert engine.chain_of("origin-1") == fourth.chain_der
    assert take(engine, second.sign(anomaly(10), with_chain=False)).new
    assert take(engine, third.sign(anomaly(11), with_chain=False)).new
    assert take(engine, fourth.sign(anomaly(15), with_chain=False)).new
    with pytest.raises(UntrustedOrigin, match="send its chain"):
        take(engine, first.sign(anomaly(12), with_chain=False))
    # With its chain, the oldest certificate is proven again.
    assert take(engine, first.sign(anomaly(13))).new
    assert take(engine, first.sign(anomaly(14), with_chain=False)).new


def test_a_revoked_previous_certificate_no_longer_verifies_chain_less_messages(
    pki: MeshPki, origin: Node
) -> None:
    engine = engine_for(pki)
    take(engine, origin.sign(anomaly(1)))
    renewed = pki.node("origin-1")
    take(engine, renewed.sign(anomaly(2)))
    pki.revoke(origin)
    engine.trust.apply_crl(pki.crl())
    with pytest.raises(RevokedOrigin):
        take(engine, origin.sign(anomaly(3), with_chain=False))
    assert take(engine, renewed.sign(anomaly(4), with_chain=False)).new
    assert engine.stats.rejected == {"revoked": 1}


def test_a_chain_less_message_under_an_expired_certificate_is_refused(
    pki: MeshPki, origin: Node
) -> None:
    engine = engine_for(pki)
    take(engine, origin.sign(anomaly(1)))
    later = ms(origin.cert.not_valid_after_utc) + 60_000
    with pytest.raises(UntrustedOrigin):
        take(engine, origin.sign(anomaly(2), now_ms=later), now_ms=later)
    bare = origin.sign(anomaly(3), now_ms=later, with_chain=False)
    with pytest.raises(GossipRejected):
        take(engine, bare, now_ms=later)
    assert bare.message_id not in engine.seen


# --- rate limits --------------------------------------------------------------------------


def test_a_sender_over_its_rate_is_limited_until_tokens_refill(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki, rate=2.0, burst=3)
    messages = [origin.sign(anomaly(i)) for i in range(6)]
    for message in messages[:3]:
        assert take(engine, message, sender="peer-a").new
    with pytest.raises(RateLimited):
        take(engine, messages[3], sender="peer-a")
    assert messages[3].message_id not in engine.seen
    # Another sender has its own bucket, and the node's own API has none.
    assert take(engine, messages[3], sender="peer-b").new
    assert take(engine, messages[4], sender=None).new
    # Duplicates are answered before the rate is charged.
    assert not take(engine, messages[0], sender="peer-a").new
    # Half a second refills one token at 2 per second: one more, then limited again.
    assert take(engine, messages[5], sender="peer-a", now_ms=T0_MS + 500).new
    with pytest.raises(RateLimited):
        take(engine, origin.sign(anomaly(9)), sender="peer-a", now_ms=T0_MS + 500)
    assert engine.stats.rejected == {"rate-limited": 2}


def test_forgetting_a_peer_resets_its_bucket(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki, rate=1.0, burst=1)
    take(engine, origin.sign(anomaly(1)), sender="peer-a")
    with pytest.raises(RateLimited):
        take(engine, origin.sign(anomaly(2)), sender="peer-a")
    engine.forget_peer("peer-a")
    assert take(engine, origin.sign(anomaly(3)), sender="peer-a").new


# --- CRLs carried by gossip ---------------------------------------------------------------


def test_a_crl_message_applies_the_crl_and_reports_it(pki: MeshPki, origin: Node) -> None:
    victim = pki.node("victim")
    engine = engine_for(pki)
    pki.revoke(victim)
    crl = pki.crl()
    got = take(engine, origin.sign(crl_payload(crl)))
    assert got.crl is not None and got.crl.revoked == {victim.serial}
    assert engine.trust.is_revoked(victim.serial) and engine.trust.crl_der == crl
    assert got.forward_to  # news is passed on
    with pytest.raises(RevokedOrigin):
        take(engine, victim.sign())


def test_a_stale_crl_message_is_taken_but_not_forwarded(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    crl = pki.crl()
    take(engine, origin.sign(crl_payload(crl)))
    again = take(engine, origin.sign(crl_payload(crl), now_ms=T0_MS + 1))  # the same CRL
    assert again.new and again.crl is None and again.forward_to == ()


def test_a_crl_message_with_a_forged_crl_is_refused(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    with pytest.raises(CrlRejected):
        take(engine, origin.sign(crl_payload(b"not a crl")))
    assert engine.stats.rejected == {"bad-crl": 1}


# --- digests ------------------------------------------------------------------------------


def test_ihave_lists_only_what_the_peer_is_not_known_to_hold(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki, fanout=1)
    from_a = origin.sign(anomaly(1))
    got = take(engine, from_a, sender="peer-a", peers=("peer-a", "peer-b", "peer-c"))
    (pushed_to,) = got.forward_to
    ours = pki.node("me").sign(anomaly(2))
    engine.publish(ours, ours.encode(), [], T0_MS)
    ids = [from_a.message_id, ours.message_id]
    assert engine.ihave_for("peer-a", T0_MS) == [ours.message_id]  # it sent us from_a
    assert engine.ihave_for(pushed_to, T0_MS) == [ours.message_id]  # we pushed from_a to it
    stranger = ({"peer-b", "peer-c"} - {pushed_to}).pop()
    assert engine.ihave_for(stranger, T0_MS) == ids
    assert engine.ihave_for(stranger, T0_MS) == []  # announced once
    assert engine.ihave_for("peer-new", from_a.expiry) == []  # expired messages go


def test_an_id_a_peer_announced_is_not_announced_back(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    message = origin.sign()
    take(engine, message, sender=None, peers=())
    assert engine.on_ihave("peer-b", [message.message_id], T0_MS) == []
    assert engine.ihave_for("peer-b", T0_MS) == []


def test_on_ihave_asks_only_for_unseen_ids(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    message = origin.sign()
    take(engine, message)
    assert engine.on_ihave("peer-b", [message.message_id, "x:1", "x:2"], T0_MS) == ["x:1", "x:2"]
    many = [f"x:{i}" for i in range(MAX_DIGEST + 10)]
    assert engine.on_ihave("peer-c", many, T0_MS) == many[:MAX_DIGEST]


def test_on_iwant_returns_the_messages_still_held(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    short, long = origin.sign(anomaly(1), ttl_ms=1000), origin.sign(anomaly(2))
    for message in (short, long):
        take(engine, message)
    ids = [short.message_id, "unknown:1", long.message_id]
    assert [r.raw for r in engine.on_iwant("peer-b", ids, T0_MS)] == [
        short.encode(),
        long.encode(),
    ]
    assert [r.raw for r in engine.on_iwant("peer-b", ids, short.expiry)] == [long.encode()]
    # What was sent counts as known: not announced to that peer again.
    assert engine.ihave_for("peer-b", short.expiry) == []


def test_on_iwant_gives_what_was_received_with_the_origins_chain(
    pki: MeshPki, origin: Node
) -> None:
    engine = engine_for(pki)
    full, bare = origin.sign(anomaly(1)), origin.sign(anomaly(2), with_chain=False)
    got_full, got_bare = take(engine, full), take(engine, bare)
    held = engine.on_iwant("peer-b", [full.message_id, bare.message_id], T0_MS)
    assert held == [got_full, got_bare]
    assert [r.raw for r in held] == [full.encode(), bare.encode()]
    assert [r.message for r in held] == [full, bare]
    # A message that came without its chain still carries the origin's, for peers that lack it.
    assert [r.chain for r in held] == [origin.chain_der, origin.chain_der]
    assert all(r.origin is not None and r.origin.serial == origin.serial for r in held)


def test_recent_messages_are_bounded(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki, recent_capacity=2)
    messages = [origin.sign(anomaly(i)) for i in range(3)]
    for message in messages:
        take(engine, message)
    assert engine.recent_ids() == [m.message_id for m in messages[1:]]
    assert engine.on_iwant("peer-z", [messages[0].message_id], T0_MS) == []
    assert messages[0].message_id in engine.seen  # still a duplicate if it comes again


# --- the seen-cache -----------------------------------------------------------------------


def test_the_seen_cache_is_bounded_oldest_first() -> None:
    seen = SeenCache(capacity=3)
    for i in range(5):
        seen.add(f"m{i}", 100 + i)
    assert len(seen) == 3
    assert [f"m{i}" in seen for i in range(5)] == [False, False, True, True, True]
    assert seen.take_pending() == [(f"m{i}", 100 + i) for i in range(5)]
    assert seen.take_pending() == []


def test_the_seen_cache_prunes_expired_ids() -> None:
    seen = SeenCache()
    seen.add("old", 100)
    seen.add("edge", 200)
    seen.add("new", 300)
    seen.prune(200)
    assert "old" not in seen and "edge" not in seen and "new" in seen
    assert len(seen) == 1


def test_loading_the_seen_cache_skips_expired_and_is_not_pending() -> None:
    seen = SeenCache(capacity=2)
    seen.load([("gone", 50), ("a", 150), ("b", 160), ("c", 170)], now_ms=100)
    assert "gone" not in seen and "a" not in seen and "b" in seen and "c" in seen
    assert seen.pending == []


def test_the_seen_cache_needs_room() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SeenCache(0)


def test_a_pruned_message_replayed_later_is_refused_as_expired(pki: MeshPki, origin: Node) -> None:
    seen = SeenCache()
    engine = engine_for(pki, seen=seen)
    message = origin.sign(ttl_ms=1000)
    take(engine, message)
    seen.prune(message.expiry)
    assert message.message_id not in seen
    with pytest.raises(ExpiredMessage):
        take(engine, message, now_ms=message.expiry)


def test_the_engine_records_accepted_ids_for_persistence(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    message = origin.sign()
    take(engine, message)
    assert engine.seen.take_pending() == [(message.message_id, message.expiry)]


# --- batches ---------------------------------------------------------------------------------


def test_a_batch_gives_each_frame_its_own_outcome_in_order(pki: MeshPki, origin: Node) -> None:
    engine = engine_for(pki)
    good = origin.sign(anomaly(1))
    bare = origin.sign(anomaly(2), with_chain=False)  # verifiable once `good` proved the cert
    forged = forge(origin.sign(anomaly(3)), payload=anomaly(4))
    expired = origin.sign(anomaly(5), now_ms=T0_MS - 10_000, ttl_ms=5_000)
    raws = [good.encode(), bare.encode(), b"{not json", forged.encode(), expired.encode()]
    raws.append(good.encode())  # the same message again, in the same read
    results = engine.receive_batch(raws, sender="peer-a", peers=PEERS, now_ms=T0_MS)
    assert len(results) == len(raws)
    first, second, malformed, bad, old, again = results
    assert isinstance(first, Received) and first.new and first.message_id == good.message_id
    # The bare message was screened before `good` was recorded, and still verifies: the
    # certificate `good` carried is proven by the time the batch's signatures are checked.
    assert isinstance(second, Received) and second.new
    assert isinstance(malformed, MalformedMessage)
    assert isinstance(bad, BadSignature)
    assert isinstance(old, ExpiredMessage)
    assert isinstance(again, Received) and not again.new
    assert engine.stats.accepted == 2
    assert engine.stats.duplicates == 1
    assert engine.stats.rejected == {"malformed": 1, "bad-signature": 1, "expired": 1}
    assert forged.message_id not in engine.seen
    # The batch path and the one-by-one path agree.
    single = engine_for(pki)
    assert take(single, good).new
    assert take(single, bare).new


# --- message ids belong to their origin (issue 16 item 9) ------------------------------------

MESH = ("node-1", "node-2", "node-3", "node-4", "node-5")


def spread(engines: dict[str, GossipEngine], first: str, message: GossipMessage) -> None:
    """``first`` publishes ``message``; every push is delivered, one by one, until none is
    left (fanout covers every peer, so a message reaches each engine that accepts it)."""
    queue: list[tuple[str | None, str, bytes]] = [(None, first, message.encode())]
    while queue:
        sender, to, raw = queue.pop(0)
        peers = [p for p in engines if p != to]
        try:
            got = engines[to].receive_raw(raw, sender=sender, peers=peers, now_ms=T0_MS)
        except ProtocolError:
            continue
        queue += [(to, peer, engines[to].wire_for(peer, got)) for peer in got.forward_to]


def test_an_id_taken_first_by_another_node_does_not_stop_the_origins_message(
    pki: MeshPki,
) -> None:
    node1, node2 = pki.node("node-1"), pki.node("node-2")
    engines = {
        name: GossipEngine(name, pki.trust(), fanout=len(MESH), rng=random.Random(i))
        for i, name in enumerate(MESH)
    }
    real = node1.sign(anomaly(1))
    # node-2 saw node-1's id (in an IHAVE, say) and races it with a message of its own.
    squatter = node2.sign(anomaly(2), message_id=real.message_id)
    spread(engines, "node-2", squatter)
    spread(engines, "node-1", real)
    for name, engine in engines.items():
        (held,) = engine.on_iwant("probe", [real.message_id], T0_MS)
        assert held.message == real, name
        assert engine.stats.accepted == 1, name
    assert engines["node-2"].stats.rejected == {"bad-message-id": 1}


def test_a_message_under_an_id_not_derived_from_it_is_refused_from_a_link(
    pki: MeshPki, origin: Node
) -> None:
    engine = engine_for(pki)
    real = origin.sign(anomaly(1))
    squatter = pki.node("node-2").sign(anomaly(2), message_id=real.message_id)
    chosen = origin.sign(anomaly(3), message_id="origin-1:1")  # its own node, a chosen id
    results = engine.receive_batch(
        [squatter.encode(), chosen.encode(), real.encode()],
        sender="peer-a",
        peers=PEERS,
        now_ms=T0_MS,
    )
    first, second, third = results
    assert isinstance(first, BadMessageId) and isinstance(first, MalformedMessage)
    assert isinstance(second, BadMessageId)
    assert isinstance(third, Received) and third.new and third.message == real
    assert engine.stats.rejected == {"bad-message-id": 2}
    assert "origin-1:1" not in engine.seen
    with pytest.raises(BadMessageId):
        take(engine, chosen, sender=None)  # the API and publish check it too
    # Ids are checked after the seen-cache: a bogus copy under an id already seen is a
    # plain duplicate that changes nothing (and duplicates cost no hashing).
    late = pki.node("node-3").sign(anomaly(4), message_id=real.message_id, with_chain=False)
    assert take(engine, late) == Received(real.message_id, new=False)
    (held,) = engine.on_iwant("probe", [real.message_id], T0_MS)
    assert held.message == real
