"""The sans-IO node core (trustmesh.mesh.node) on a fake clock: each policy it holds,
without a socket or a task. Links are plain objects; time is an int of Unix ms."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from meshtools import T0, T0_MS, MeshPki, Node, anomaly

from trustmesh.mesh.engine import GossipEngine
from trustmesh.mesh.gossip import crl_payload
from trustmesh.mesh.link import CloseCode, GossipFrame, LinkClosed, LinkUp, PeersFrame
from trustmesh.mesh.node import (
    Action,
    CloseLink,
    Dial,
    FetchCrl,
    KeepAnomaly,
    NodeCore,
    NodeIdentity,
    NodeSettings,
    Notify,
    Renew,
    SendCrl,
    SendGossip,
    SendIHave,
    SendPeers,
)
from trustmesh.mesh.peers import PeerBook
from trustmesh.mesh.renewal import RETRY_MAX_MS, RETRY_MIN_MS
from trustmesh.sansio import ConnectionClosed

_ports = count(40000)
BOOT = "127.0.0.1:7000"


@dataclass(eq=False)
class FakeLink:
    """A driver's link handle: hashable by identity, with the facts the core reads."""

    peer: Node | None = None
    dialler_port: int = field(default_factory=lambda: next(_ports))

    @property
    def serial(self) -> int | None:
        return self.peer.serial if self.peer is not None else None


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path / "ca")
    yield mesh
    mesh.close()


def identity_of(node: Node) -> NodeIdentity:
    cert = node.cert
    return NodeIdentity(
        node.key,
        node.chain_der,
        int(cert.not_valid_before_utc.timestamp() * 1000),
        int(cert.not_valid_after_utc.timestamp() * 1000),
        cert.serial_number,
    )


def make_core(pki: MeshPki, me: Node, **settings: Any) -> NodeCore[FakeLink]:
    trust = pki.trust()
    engine = GossipEngine(me.node_id, trust, rng=random.Random(1))
    values: dict[str, Any] = {"bootstrap": (BOOT,), "max_links": 6, **settings}
    return NodeCore(
        NodeSettings(me.node_id, f"127.0.0.1:{next(_ports)}", **values),
        identity_of(me),
        trust,
        engine,
        PeerBook(trust, me.node_id),
        rng=random.Random(7),
    )


def of(kind: type[Any], actions: list[Action[FakeLink]]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def link_up(
    core: NodeCore[FakeLink],
    peer: Node,
    *,
    address: str | None = None,
    now: int = T0_MS,
    crl_number: int = -1,
) -> tuple[FakeLink, list[Action[FakeLink]]]:
    link = FakeLink(peer)
    core.link_opened(link, initiator=address is not None, address=address)
    listen = f"127.0.0.1:{next(_ports)}"
    return link, core.link_event(link, LinkUp(peer.node_id, listen, crl_number, 30), now)


def test_start_dials_the_bootstrap_and_never_itself(pki: MeshPki) -> None:
    me = pki.node("node-a")
    core = make_core(pki, me, bootstrap=(BOOT,))
    own = core.settings.advertise
    core.settings = NodeSettings(me.node_id, own, (BOOT, own), max_links=6)
    actions = core.start(T0_MS)
    assert of(Dial, actions) == [Dial(BOOT)]
    assert of(SendPeers, actions) == []  # no links yet; our record is signed
    assert core.record is not None and core.record.addresses == (own,)


def test_an_address_that_turns_out_to_be_ours_is_never_dialled_again(pki: MeshPki) -> None:
    """Our bootstrap list may name us under another form (localhost, another interface):
    the dial reaches our own certificate, the link refuses itself, and that address is
    not dialled again (it was, with a backoff, forever)."""
    me = pki.node("node-a")
    alias = "localhost:7000"
    core = make_core(pki, me, bootstrap=(alias,))
    assert of(Dial, core.start(T0_MS)) == [Dial(alias)]
    link = FakeLink(me)  # TLS showed our own certificate
    core.link_opened(link, initiator=True, address=alias)
    closed = LinkClosed(f"{CloseCode.REFUSED}: a link to ourselves", error=True)
    core.link_event(link, closed, T0_MS)
    core.dial_failed(alias, "a link to ourselves", T0_MS)
    for later in range(T0_MS, T0_MS + 120_000, 1_000):
        assert of(Dial, core.handle_timer(later)) == []


def test_the_low_mark_is_a_third_of_the_cap_and_dials_stop_there(pki: MeshPki) -> None:
    me = pki.node("node-a")
    core = make_core(pki, me, max_links=9)
    assert core.dial_target == 3
    core.start(T0_MS)
    peers = [pki.node(f"node-{i}") for i in range(5)]
    for peer in peers[:3]:
        link_up(core, peer)
    assert of(Dial, core.handle_timer(T0_MS + 10_000)) == []  # at the low mark: no dial
    for peer in peers[3:]:  # inbound links are still taken, up to the cap
        _, actions = link_up(core, peer)
        assert of(CloseLink, actions) == []
    assert len(core.links) == 5 and core.room == 4


def test_at_the_cap_a_new_link_gets_peers_with_room_then_link_cap(pki: MeshPki) -> None:
    me = pki.node("node-a")
    core = make_core(pki, me, max_links=3)
    core.start(T0_MS)
    a, b, c, late = (pki.node(f"node-{n}") for n in "bcde")
    for peer in (a, b, c):
        link, _ = link_up(core, peer)
        records = (peer_record(pki, peer),)
        core.link_event(link, PeersFrame((), records, room=2 if peer is b else 0), T0_MS)
    refused, actions = link_up(core, late)
    close = of(CloseLink, actions)
    assert close == [CloseLink(refused, CloseCode.LINK_CAP, "at the cap of 3 links")]
    (peers,) = of(SendPeers, actions)
    assert peers.link is refused and peers.room == 0
    assert peers.open_ids == ("node-c",)  # the one that said it has room
    assert actions.index(peers) < actions.index(close[0])  # PEERS goes before CLOSE
    assert late.node_id not in core.links and core.stats.refused_at_cap == 1


def peer_record(pki: MeshPki, node: Node) -> dict[str, Any]:
    from trustmesh.mesh.peers import own_record

    record = own_record(
        node.key,
        node.node_id,
        [f"127.0.0.1:{next(_ports)}"],
        previous=None,
        now_ms=T0_MS,
        not_after_ms=int(node.cert.not_valid_after_utc.timestamp() * 1000),
        chain=node.chain_der,
    )
    assert record is not None
    return record.to_json()


def test_a_refusal_hint_is_dialled_first(pki: MeshPki) -> None:
    me = pki.node("node-a")
    core = make_core(pki, me, max_links=12, dial_target=1, bootstrap=())
    core.start(T0_MS)
    boot = pki.node("node-boot")
    others = [pki.node(f"node-{i}") for i in range(8)]
    link, _ = link_up(core, boot, address=BOOT)
    frame = PeersFrame((), tuple(peer_record(pki, n) for n in others), open=("node-5",))
    assert of(Dial, core.link_event(link, frame, T0_MS)) == []  # at its dial target
    refusal = LinkClosed("link-cap: full", error=True, by_peer=True, code=CloseCode.LINK_CAP)
    actions = core.link_event(link, refusal, T0_MS)
    # Only the node said to have room: the others are likely full.
    assert of(Dial, actions) == [Dial(address_of(core, others[5]))]
    # The hint is used up, and another is dialled.
    dials = of(Dial, core.dial_failed(address_of(core, others[5]), "refused", T0_MS))
    assert len(dials) == 1 and dials != [Dial(address_of(core, others[5]))]


def test_each_refusal_in_a_row_waits_longer_and_a_clean_end_resets(pki: MeshPki) -> None:
    me, peer = pki.node("node-a"), pki.node("node-b")
    core = make_core(pki, me, bootstrap=(BOOT,))
    core.start(T0_MS)
    now = T0_MS
    waits = []
    for refusals in (1, 2, 3):
        link, _ = link_up(core, peer, address=BOOT, now=now)
        closed = LinkClosed("link-cap: full", error=True, by_peer=True, code=CloseCode.LINK_CAP)
        core.link_event(link, closed, now)
        cooldown = core.cooldown_of(BOOT)
        assert cooldown is not None and cooldown[1] == refusals
        waits.append(cooldown[0] - now)
        assert of(Dial, core.handle_timer(cooldown[0] - 1)) == []  # not before it ends
        assert of(Dial, core.handle_timer(cooldown[0])) == [Dial(BOOT)]
        now = cooldown[0]
    assert waits[0] < waits[1] < waits[2]
    link, _ = link_up(core, peer, address=BOOT, now=now)
    core.link_event(link, LinkClosed("bye", code=CloseCode.SHUTDOWN), now + 10_000)
    assert core.cooldown_of(BOOT) is None  # a link that ran its course


def test_a_failed_dial_backs_off_and_says_so_for_a_bootstrap(pki: MeshPki) -> None:
    core = make_core(pki, pki.node("node-a"))
    assert of(Dial, core.start(T0_MS)) == [Dial(BOOT)]
    actions = core.dial_failed(BOOT, "connection refused", T0_MS)
    (note,) = of(Notify, actions)
    assert note.event == "link.dial_failed" and note.fields["address"] == BOOT
    retry = core.next_deadline()
    assert retry is not None and T0_MS + 500 <= retry <= T0_MS + 600
    assert of(Dial, core.handle_timer(retry)) == [Dial(BOOT)]


def test_a_collision_keeps_the_link_dialled_by_the_smaller_node_id(pki: MeshPki) -> None:
    small, big = pki.node("node-a"), pki.node("node-b")
    for me, other, kept_direction in ((small, big, True), (big, small, False)):
        core = make_core(pki, me)
        core.start(T0_MS)
        outbound, _ = link_up(core, other, address=BOOT)
        inbound, actions = link_up(core, other)
        # node-a's own dial wins on node-a; on node-b, node-a's dial is the inbound one.
        keep = outbound if kept_direction else inbound
        drop = inbound if kept_direction else outbound
        assert core.links[other.node_id] is keep
        closes = of(CloseLink, actions)
        assert [c.link for c in closes] == [drop] and closes[0].code == CloseCode.DUPLICATE


def test_a_crl_cuts_off_revoked_links_up_or_coming_up_and_is_passed_on(pki: MeshPki) -> None:
    me, good, bad = pki.node("node-a"), pki.node("node-b"), pki.node("node-c")
    core = make_core(pki, me)
    core.start(T0_MS)
    good_link, _ = link_up(core, good)
    bad_link, _ = link_up(core, bad)
    coming = FakeLink(bad)  # TLS is up, HELLO is not
    core.link_opened(coming, initiator=False, address=None)
    pki.revoke(bad)
    actions: list[Action[FakeLink]] = []
    assert core.apply_crl(pki.crl(), "CA", T0_MS, actions) is not None
    closed = {c.link for c in of(CloseLink, actions) if c.code == CloseCode.REVOKED}
    assert closed == {bad_link, coming}
    assert bad.node_id not in core.links and bad.node_id in core.revoked_nodes
    assert bad.node_id not in core.peers
    assert [a.link for a in of(SendCrl, actions)] == [good_link]


def test_crl_polls_are_jittered_and_one_at_a_time(pki: MeshPki) -> None:
    core = make_core(pki, pki.node("node-a"), crl_interval_ms=60_000, bootstrap=())
    core.start(T0_MS)
    first = core.next_crl_poll
    assert first is not None and T0_MS <= first < T0_MS + 60_000  # anywhere in one interval
    core.handle_timer(first)
    core.crl_fetched(None, first, sign=None)
    polls = []
    now = first
    for _ in range(20):
        due = core.next_crl_poll
        assert due is not None and 45_000 <= due - now <= 75_000
        polls.append(due - now)
        actions = core.handle_timer(due)
        assert of(FetchCrl, actions) == [FetchCrl()]
        assert of(FetchCrl, core.handle_timer(due + 100_000)) == []  # one in flight
        now = due + 100_000
        core.crl_fetched(None, now, sign=None)  # a 304: nothing new
    assert len(set(polls)) > 10  # spread, not in lockstep


def test_a_fetched_crl_is_gossiped_signed_by_us(pki: MeshPki) -> None:
    me, peer, bad = pki.node("node-a"), pki.node("node-b"), pki.node("node-c")
    core = make_core(pki, me)
    core.start(T0_MS)
    link, _ = link_up(core, peer)
    pki.revoke(bad)
    der = pki.crl()
    actions = core.crl_fetched(der, T0_MS, sign=lambda d: me.sign(crl_payload(d)))
    assert [a.link for a in of(SendGossip, actions)] == [link]
    assert core.trust.is_revoked(bad.serial)


def test_renewal_is_asked_at_two_thirds_and_retried_after_a_failure(pki: MeshPki) -> None:
    me = pki.node("node-a")
    core = make_core(pki, me, bootstrap=())
    core.start(T0_MS)
    due = core.renewal.due_ms
    identity = identity_of(me)
    assert due == identity.not_before_ms + (identity.not_after_ms - identity.not_before_ms) * 2 // 3
    assert of(Renew, core.handle_timer(due - 1)) == []
    assert of(Renew, core.handle_timer(due)) == [Renew()]
    assert of(Renew, core.handle_timer(due + 1)) == []  # in flight
    core.renew_failed("CA down", due + 1)
    retry = core.renewal.next_ms()
    assert retry is not None and RETRY_MIN_MS <= retry - (due + 1) <= RETRY_MAX_MS
    assert of(Renew, core.handle_timer(retry)) == [Renew()]
    link, _ = link_up(core, pki.node("node-b"), now=retry)
    actions = core.renewed(identity, retry + 1)
    assert [a.link for a in of(SendPeers, actions)] == [link]  # a record with the new chain
    assert core.renewal.next_ms() == core.renewal.due_ms


def test_gossip_is_batched_forwarded_and_a_forgery_ends_the_link(pki: MeshPki) -> None:
    me, origin, relay, other = (pki.node(f"node-{n}") for n in "abcd")
    core = make_core(pki, me)
    core.start(T0_MS)
    relay_link, _ = link_up(core, relay)
    other_link, _ = link_up(core, other)
    message = origin.sign(anomaly(1))
    assert core.link_event(relay_link, GossipFrame(message.encode()), T0_MS) == []
    assert core.gossip_pending
    actions = core.drain_gossip(T0_MS)
    assert not core.gossip_pending
    assert [a.link for a in of(SendGossip, actions)] == [other_link]
    assert [a.message.message_id for a in of(KeepAnomaly, actions)] == [message.message_id]
    # A signature of another message: it verifies against nothing here.
    forged = replace(origin.sign(anomaly(2)), signature=origin.sign(anomaly(4)).signature)
    core.link_event(other_link, GossipFrame(forged.encode()), T0_MS)
    closes = of(CloseLink, core.drain_gossip(T0_MS))
    assert [c.link for c in closes] == [other_link]
    assert closes[0].code == CloseCode.BAD_SIGNATURE


def test_digests_go_out_each_interval_to_peers_that_lack_a_message(pki: MeshPki) -> None:
    me, origin, peer = pki.node("node-a"), pki.node("node-b"), pki.node("node-c")
    core = make_core(pki, me, digest_interval_ms=1_000)
    core.start(T0_MS)
    message = origin.sign(anomaly(3))
    core.publish(message, message.encode(), T0_MS)
    _, actions = link_up(core, peer)
    assert [a.ids for a in of(SendIHave, actions)] == [(message.message_id,)]  # at link up
    assert of(SendIHave, core.handle_timer(T0_MS + 1_000)) == []  # told once


def test_a_closed_link_makes_room_and_tops_up(pki: MeshPki) -> None:
    core = make_core(pki, pki.node("node-a"), bootstrap=(BOOT,))
    core.start(T0_MS)
    peer = pki.node("node-b")
    link, _ = link_up(core, peer, address=BOOT)
    actions = core.link_event(link, ConnectionClosed("reset", error=True), T0_MS + 5)
    assert peer.node_id not in core.links
    assert core.peers[peer.node_id].status == "disconnected"
    assert any(isinstance(a, Notify) and a.event == "link.down" for a in actions)


def test_at_the_cap_an_inbound_peer_with_spare_links_makes_room(pki: MeshPki) -> None:
    me = pki.node("node-a")
    core = make_core(pki, me, max_links=3)
    core.start(T0_MS)
    dialled, rich, poor = (pki.node(f"node-{n}") for n in "bcd")
    ours, _ = link_up(core, dialled, address=BOOT)  # we chose it: never evicted
    rich_link, _ = link_up(core, rich)
    link_up(core, poor)
    core.link_event(ours, PeersFrame((), room=0, spare=8), T0_MS)
    core.link_event(rich_link, PeersFrame((), room=0, spare=2), T0_MS)
    newcomer = pki.node("node-e")
    link, actions = link_up(core, newcomer)
    closes = of(CloseLink, actions)
    assert [(c.link, c.code) for c in closes] == [(rich_link, CloseCode.REPLACED)]
    assert core.links[newcomer.node_id] is link and rich.node_id not in core.links
    assert core.stats.evicted == 1 and core.stats.refused_at_cap == 0
    # The evicted link's own close changes nothing more.
    core.link_event(rich_link, LinkClosed("replaced", code=CloseCode.REPLACED), T0_MS)
    assert set(core.links) == {dialled.node_id, poor.node_id, newcomer.node_id}
    # No inbound peer has spare links now: the next newcomer is refused.
    _, actions = link_up(core, pki.node("node-f"))
    assert [c.code for c in of(CloseLink, actions)] == [CloseCode.LINK_CAP]


def test_peers_hear_when_we_fill_up_or_have_room_again(pki: MeshPki) -> None:
    core = make_core(pki, pki.node("node-a"), max_links=3, dial_target=1)
    core.start(T0_MS)
    first, _ = link_up(core, pki.node("node-b"))
    _, actions = link_up(core, pki.node("node-c"))  # one spare link now
    assert hints_in(actions) == [(1, 1)] * 2
    _, actions = link_up(core, pki.node("node-d"))  # full
    assert hints_in(actions) == [(0, 2)] * 3
    actions = core.link_event(first, ConnectionClosed("reset", error=True), T0_MS)
    assert hints_in(actions) == [(1, 1)] * 2  # room again


def hints_in(actions: list[Action[FakeLink]]) -> list[tuple[int, int]]:
    """(room, spare) of each PEERS frame that carries only those two."""
    return [(a.room, a.spare) for a in of(SendPeers, actions) if not a.records]


def test_with_nobody_known_one_bootstrap_address_is_dialled_at_a_time(pki: MeshPki) -> None:
    boots = ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003")
    core = make_core(pki, pki.node("node-a"), bootstrap=boots, max_links=12)
    (first,) = of(Dial, core.start(T0_MS))  # not all three: they are ways in
    assert first.address in boots
    assert of(Dial, core.handle_timer(T0_MS + 1_000)) == []  # one in flight
    (second,) = of(Dial, core.dial_failed(first.address, "refused", T0_MS + 1_000))
    assert second.address in boots and second.address != first.address
    # Once the book knows peers, they fill the dial target; the bootstrap waits.
    boot_link, _ = link_up(core, pki.node("node-boot"), address=second.address)
    others = tuple(peer_record(pki, pki.node(f"node-{i}")) for i in range(6))
    actions = core.link_event(boot_link, PeersFrame((), others), T0_MS + 2_000)
    dials = of(Dial, actions)
    assert len(dials) == core.dial_target - 1
    assert not {d.address for d in dials} & set(boots)


def test_a_slot_given_to_another_is_replaced_without_a_cooldown(pki: MeshPki) -> None:
    core = make_core(pki, pki.node("node-a"), max_links=6, bootstrap=())
    core.start(T0_MS)
    known = [pki.node(f"node-{i}") for i in range(4)]
    first, _ = link_up(core, known[0], address="127.0.0.1:7101")
    link_up(core, known[1], address="127.0.0.1:7102")  # at the dial target of 2
    records = tuple(peer_record(pki, n) for n in known[2:])
    assert of(Dial, core.link_event(first, PeersFrame((), records), T0_MS)) == []
    link_up(core, known[2], address="127.0.0.1:7103")  # one spare link
    replaced = LinkClosed("replaced: making room", by_peer=True, code=CloseCode.REPLACED)
    actions = core.link_event(first, replaced, T0_MS + 10_000)  # after a link's course
    # Still at the dial target, yet one dial: back to the three links it held. The
    # peer that gave our slot away is not held against its address.
    assert [d.address for d in of(Dial, actions)] == [address_of(core, known[3])]
    assert core.cooldown_of("127.0.0.1:7101") is None
    assert of(Dial, core.handle_timer(T0_MS + 11_000)) == []  # one replacement only


def test_rotation_dials_one_more_then_gives_up_the_oldest_outbound_link(
    pki: MeshPki,
) -> None:
    core = make_core(pki, pki.node("node-a"), max_links=6, bootstrap=(), rotate_interval_ms=60_000)
    core.start(T0_MS)
    peers = [pki.node(f"node-{i}") for i in range(4)]
    oldest, _ = link_up(core, peers[0], address="127.0.0.1:7201", now=T0_MS)
    link_up(core, peers[1], address="127.0.0.1:7202", now=T0_MS + 10)
    records = tuple(peer_record(pki, n) for n in peers[2:])
    core.link_event(oldest, PeersFrame((), records), T0_MS + 20)
    dials: list[Dial] = []
    now = T0_MS + 20
    while not dials:  # digest ticks until the rotation comes due (30 to 90 s)
        due = core.next_deadline()
        assert due is not None and due <= T0_MS + 91_000
        now = due
        dials = of(Dial, core.handle_timer(now))
    (dial,) = dials
    (chosen,) = [n for n in peers[2:] if address_of(core, n) == dial.address]
    newest = FakeLink(chosen)
    core.link_opened(newest, initiator=True, address=dial.address)
    actions = core.link_event(newest, LinkUp(chosen.node_id, dial.address, -1, 30), now + 5)
    assert of(CloseLink, actions) == []  # not before the new link has lasted
    closes = of(CloseLink, core.handle_timer(now + 1_005))
    assert [(c.link, c.code) for c in closes] == [(oldest, CloseCode.REPLACED)]
    assert core.stats.rotated == 1


def address_of(core: NodeCore[FakeLink], node: Node) -> str:
    record = core.book.get(node.node_id)
    assert record is not None
    return record.addresses[0]


def test_open_hints_count_only_from_a_node_we_dialled(pki: MeshPki) -> None:
    core = make_core(pki, pki.node("node-a"), max_links=12, bootstrap=())
    core.start(T0_MS)
    others = [pki.node(f"node-{i}") for i in range(8)]
    inbound, _ = link_up(core, pki.node("node-in"))  # it linked to us
    frame = PeersFrame((), tuple(peer_record(pki, n) for n in others), open=("node-5",))
    dials = of(Dial, core.link_event(inbound, frame, T0_MS))
    # Its records are taken, but its hint steers nothing: random dials fill the target.
    assert len(dials) == core.dial_target - 1


def test_replaced_soon_after_hello_clears_no_cooldown_and_dials_nothing_more(
    pki: MeshPki,
) -> None:
    """Members that link and at once give the slot away ('replaced') must not keep a
    node redialling them without a pause, nor push it past its dial target."""
    core = make_core(pki, pki.node("node-a"), max_links=12, bootstrap=())
    core.start(T0_MS)
    for i in range(4):
        link_up(core, pki.node(f"node-{i}"), address=f"127.0.0.1:{7300 + i}")
    trap = "127.0.0.1:7399"
    core.dial_failed(trap, "refused", T0_MS)  # one failure on record
    link, _ = link_up(core, pki.node("node-x"), address=trap, now=T0_MS + 2_000)
    replaced = LinkClosed("replaced", by_peer=True, code=CloseCode.REPLACED)
    actions = core.link_event(link, replaced, T0_MS + 2_050)
    assert of(Dial, actions) == []  # at its target: no replacement for a short link
    cooldown = core.cooldown_of(trap)
    assert cooldown is not None and cooldown[1] == 1  # the record of failures stays


def test_a_link_that_links_to_us_and_gives_its_slot_away_gets_no_replacement(
    pki: MeshPki,
) -> None:
    core = make_core(pki, pki.node("node-a"), max_links=12, bootstrap=())
    core.start(T0_MS)
    for i in range(4):
        link_up(core, pki.node(f"node-{i}"), address=f"127.0.0.1:{7400 + i}")
    inbound, _ = link_up(core, pki.node("node-x"))
    replaced = LinkClosed("replaced", by_peer=True, code=CloseCode.REPLACED)
    assert of(Dial, core.link_event(inbound, replaced, T0_MS + 60_000)) == []


def test_queued_gossip_of_an_evicted_peer_is_dropped(pki: MeshPki) -> None:
    me, origin = pki.node("node-a"), pki.node("node-o")
    core = make_core(pki, me, max_links=2)
    core.start(T0_MS)
    link_up(core, pki.node("node-b"), address=BOOT)  # ours: never evicted
    rich = pki.node("node-c")
    rich_link, _ = link_up(core, rich)
    core.link_event(rich_link, PeersFrame((), room=0, spare=3), T0_MS)
    message = origin.sign(anomaly(7))
    core.link_event(rich_link, GossipFrame(message.encode()), T0_MS)  # queued ...
    link_up(core, pki.node("node-d"))  # ... then its slot goes to a newcomer
    assert rich.node_id not in core.links
    assert core.drain_gossip(T0_MS) == []
    assert message.message_id not in core.engine.seen


def test_a_node_that_finds_itself_revoked_says_so_once_and_dials_nobody(pki: MeshPki) -> None:
    me = pki.node("node-a")
    core = make_core(pki, me)
    assert of(Dial, core.start(T0_MS)) == [Dial(BOOT)]
    core.dial_failed(BOOT, "tlsv1 alert internal error", T0_MS)
    pki.revoke(me)
    actions: list[Action[FakeLink]] = []
    core.apply_crl(pki.crl(), "CA", T0_MS, actions)
    (told,) = [n for n in of(Notify, actions) if n.event == "node.revoked"]
    assert told.fields["serial"] == format(me.serial, "x") and told.level == logging.ERROR
    for later in range(T0_MS, T0_MS + 300_000, 1_000):
        assert of(Dial, core.handle_timer(later)) == []
    again: list[Action[FakeLink]] = []
    core.apply_crl(pki.crl(T0 + timedelta(minutes=1)), "CA", T0_MS + 60_000, again)
    assert [n for n in of(Notify, again) if n.event == "node.revoked"] == []
