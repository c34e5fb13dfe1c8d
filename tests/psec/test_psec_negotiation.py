"""The PSEC negotiation core on a fake clock and an in-memory lossy, reordering pipe."""

from __future__ import annotations

import itertools
import random

from trustmesh.psec.frames import Accept, Propose, Reject
from trustmesh.psec.negotiation import (
    GIVE_UP,
    SETTLED_ANSWERS,
    Negotiated,
    Negotiation,
    Refused,
    SchemePacket,
)
from trustmesh.sansio import Event
from trustmesh.wire.multihash import Multihash
from trustmesh.wire.peerid import PeerId

DTLS, QUIC, OTHER = "/dtls/1.2", "/quic-datagram/1", "/other/1"


def peer(name: str) -> PeerId:
    return PeerId(Multihash.sha2_256(name.encode()).encode())


LOW, HIGH = sorted((peer("a"), peer("b")), key=int)


class Pipe:
    """Two negotiations joined by a datagram pipe that may lose, duplicate and reorder."""

    def __init__(self, a: Negotiation, b: Negotiation, *, seed: int = 0, loss: float = 0.0):
        self.ends = (a, b)
        self.rng = random.Random(seed)
        self.loss = loss
        self.now = 0.0
        self.events: dict[int, list[Event]] = {0: [], 1: []}

    def run(self, *, until: float = GIVE_UP + 1, duplicate: float = 0.0) -> None:
        while self.now < until:
            moved = False
            for side in (0, 1):
                out = self.ends[side].datagrams_to_send()
                self.rng.shuffle(out)  # reordered
                for datagram in out:
                    copies = 2 if self.rng.random() < duplicate else 1
                    for _ in range(copies):
                        if self.rng.random() < self.loss:
                            continue
                        moved = True
                        self.events[1 - side] += self.ends[1 - side].receive(datagram, self.now)
            if not moved:
                self.now += 0.05
                for side in (0, 1):
                    self.events[side] += self.ends[side].handle_timer(self.now)
            if all(n.result is not None or n.state.value == "failed" for n in self.ends):
                return

    def result(self, side: int) -> Negotiated | Refused:
        settled = [e for e in self.events[side] if isinstance(e, Negotiated | Refused)]
        assert len(settled) == 1, self.events[side]
        return settled[0]


def test_standard_the_proposer_initiates_the_scheme_the_receiver_accepts() -> None:
    a, b = Negotiation(HIGH, [QUIC, DTLS]), Negotiation(LOW, [DTLS, QUIC])
    a.propose(0.0, first_flight=b"\x80quic initial")
    pipe = Pipe(a, b)
    pipe.run()
    ra, rb = pipe.result(0), pipe.result(1)
    assert isinstance(ra, Negotiated) and isinstance(rb, Negotiated)
    # Cumulative index: QUIC 0+1, DTLS 1+0, a tie; the proposer's order breaks it.
    assert ra.scheme == rb.scheme == QUIC
    assert ra.initiator and not rb.initiator  # the proposer initiates, whatever its ID
    assert rb.first_flight == b"\x80quic initial" and ra.flight_sent
    assert rb.peer_id == HIGH and not ra.simultaneous


def test_simultaneous_lowest_cumulative_index_wins_and_the_lower_id_initiates() -> None:
    a, b = Negotiation(LOW, [OTHER, DTLS, QUIC]), Negotiation(HIGH, [QUIC, DTLS])
    a.propose(0.0, first_flight=b"\x80other")
    b.propose(0.0, first_flight=b"\x80quic")
    pipe = Pipe(a, b)
    pipe.run()
    ra, rb = pipe.result(0), pipe.result(1)
    assert isinstance(ra, Negotiated) and isinstance(rb, Negotiated)
    assert ra.scheme == rb.scheme == DTLS or ra.scheme == rb.scheme == QUIC
    # DTLS: 1 + 1 = 2, QUIC: 2 + 0 = 2: a tie; the lower ID (a) favours DTLS.
    assert ra.scheme == DTLS and ra.simultaneous and rb.simultaneous
    assert ra.initiator and not rb.initiator
    assert rb.first_flight is None  # a's initiation packet was for another scheme


def test_simultaneous_tie_favours_the_higher_ids_choice_when_it_is_lower() -> None:
    a, b = Negotiation(HIGH, [DTLS, QUIC]), Negotiation(LOW, [QUIC, DTLS])
    a.propose(0.0)
    b.propose(0.0, first_flight=b"\x80quic")
    pipe = Pipe(a, b)
    pipe.run()
    ra, rb = pipe.result(0), pipe.result(1)
    assert isinstance(ra, Negotiated) and isinstance(rb, Negotiated)
    assert ra.scheme == rb.scheme == QUIC  # the tie goes to LOW's favourite
    assert rb.initiator and not ra.initiator
    assert ra.first_flight == b"\x80quic"  # LOW's first flight, for the winner


def test_no_common_scheme_is_rejected_and_both_stop() -> None:
    a, b = Negotiation(HIGH, [QUIC]), Negotiation(LOW, [DTLS])
    a.propose(0.0)
    pipe = Pipe(a, b)
    pipe.run()
    assert isinstance(pipe.result(0), Refused) and isinstance(pipe.result(1), Refused)
    assert "rejected" in pipe.result(0).reason  # type: ignore[union-attr]


def test_simultaneous_with_nothing_in_common_ends_on_both_sides() -> None:
    a, b = Negotiation(HIGH, [QUIC]), Negotiation(LOW, [DTLS])
    a.propose(0.0)
    b.propose(0.0)
    pipe = Pipe(a, b)
    pipe.run()
    assert isinstance(pipe.result(0), Refused) and isinstance(pipe.result(1), Refused)


def test_an_unanswered_proposal_is_retransmitted_with_backoff_then_given_up() -> None:
    a = Negotiation(HIGH, [DTLS])
    a.propose(0.0)
    sent_at = [0.0]
    assert len(a.datagrams_to_send()) == 1
    now, events = 0.0, list[Event]()
    while not events:
        timer = a.get_timer()
        assert timer is not None
        now = timer
        events = a.handle_timer(now)
        if a.datagrams_to_send():
            sent_at.append(now)
    gaps = [b - x for x, b in itertools.pairwise(sent_at)]
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0] and max(gaps) == 4.0
    assert isinstance(events[0], Refused) and now >= GIVE_UP


def test_thirty_percent_loss_with_duplicates_and_reordering_converges() -> None:
    for seed in range(200):
        a, b = Negotiation(HIGH, [DTLS, QUIC]), Negotiation(LOW, [QUIC, DTLS])
        a.propose(0.0, first_flight=b"\x16client hello")
        if seed % 2:
            b.propose(0.0)  # half of them simultaneous
        pipe = Pipe(a, b, seed=seed, loss=0.3)
        pipe.run(duplicate=0.2)
        ra, rb = pipe.result(0), pipe.result(1)
        assert isinstance(ra, Negotiated) and isinstance(rb, Negotiated), seed
        assert ra.scheme == rb.scheme and ra.initiator != rb.initiator, seed
        assert a.transcript_hash() == b.transcript_hash(), seed


def test_a_lost_accept_is_answered_again_and_a_scheme_packet_settles_it() -> None:
    a, b = Negotiation(HIGH, [DTLS]), Negotiation(LOW, [DTLS])
    a.propose(0.0, first_flight=b"\x16hello")
    (proposal,) = a.datagrams_to_send()
    assert isinstance(b.receive(proposal, 0.0)[0], Negotiated)
    (accept,) = b.datagrams_to_send()
    assert accept == Accept(DTLS).encode()
    assert b.receive(proposal, 0.6) == []  # the proposal again: the Accept again
    assert b.datagrams_to_send() == [accept]
    # The Accepts are lost, but the scheme's answer arrives: that settles a.
    events = a.receive(b"\x16server hello", 0.7)
    assert isinstance(events[0], Negotiated) and events[0].flight_sent
    assert events[1] == SchemePacket(b"\x16server hello")
    assert a.receive(accept, 0.8) == []  # a late Accept changes nothing


def test_malformed_and_stray_frames_are_dropped_not_fatal() -> None:
    b = Negotiation(LOW, [DTLS])
    for junk in (b"\x00\x01", b"\x01", b"\xff\x00", b"\x02abc", Reject().encode()):
        assert b.receive(junk, 0.0) == []
    assert b.receive(b"\x16early scheme packet", 0.0) == []  # nothing agreed yet
    assert b.result is None and b.state.value == "idle"


def test_a_changed_proposal_after_settling_is_dropped_not_obeyed() -> None:
    """Settled stays settled: a proposal under the peer's ID with other schemes (an
    off-path attacker spoofing the peer's address can send one) changes nothing."""
    b = Negotiation(LOW, [DTLS, QUIC])
    b.receive(Propose(HIGH, (DTLS,)).encode(), 0.0)
    assert b.result is not None
    settled, transcript = b.result, b.transcript_hash()
    b.datagrams_to_send()
    assert b.receive(Propose(HIGH, (QUIC, DTLS)).encode(), 0.1) == []
    assert b.datagrams_to_send() == []
    assert b.result == settled and b.transcript_hash() == transcript


def test_a_downgraded_proposal_gives_different_transcripts_and_confirms() -> None:
    """An attacker strips the strong scheme from a's proposal on its way to b: each side
    agrees on something, but their confirms, keyed by the channel's exporter, differ."""
    a, b = Negotiation(HIGH, [QUIC, DTLS]), Negotiation(LOW, [QUIC, DTLS])
    a.propose(0.0)
    (proposal,) = a.datagrams_to_send()
    downgraded = Propose(HIGH, (DTLS,)).encode()
    assert proposal != downgraded
    b.receive(downgraded, 0.0)
    (accept,) = b.datagrams_to_send()
    a.receive(accept, 0.0)
    assert a.result is not None and b.result is not None
    assert a.result.scheme == b.result.scheme == DTLS
    exporter = b"\x42" * 32  # both ends of the channel export the same secret
    tag = b.confirm_tag(exporter, from_initiator=False)
    assert not a.check_confirm(exporter, tag, from_initiator=False)
    # Untouched, the confirms agree; a reflected confirm (wrong direction) does not.
    c, d = Negotiation(HIGH, [QUIC, DTLS]), Negotiation(LOW, [QUIC, DTLS])
    c.propose(0.0)
    d.receive(c.datagrams_to_send()[0], 0.0)
    c.receive(d.datagrams_to_send()[0], 0.0)
    tag = d.confirm_tag(exporter, from_initiator=False)
    assert c.check_confirm(exporter, tag, from_initiator=False)
    assert not c.check_confirm(exporter, tag, from_initiator=True)


def test_two_settled_peers_do_not_trade_proposals_forever() -> None:
    """After a simultaneous settle, a stray repeated proposal gets at most one answer:
    not a ping-pong of proposals as fast as the network goes."""
    a, b = Negotiation(LOW, [DTLS]), Negotiation(HIGH, [DTLS])
    a.propose(0.0)
    b.propose(0.0)
    proposal_a, proposal_b = a.datagrams_to_send(), b.datagrams_to_send()
    for datagram in proposal_b:
        a.receive(datagram, 0.0)
    for datagram in proposal_a:
        b.receive(datagram, 0.0)
    assert a.result is not None and b.result is not None
    traded = 0
    now = 0.0
    for datagram in proposal_a:  # one more copy of a's proposal, late
        b.receive(datagram, now)
    for _ in range(100):
        now += 0.6  # past the answer's rate limit each time
        moved = False
        for src, dst in ((a, b), (b, a)):
            for datagram in src.datagrams_to_send():
                moved = True
                traded += 1
                dst.receive(datagram, now)
        if not moved:
            break
    assert not moved  # it ended
    assert traded <= 2 * (SETTLED_ANSWERS + 1)  # the re-send at settling, then the answers


def test_a_peer_proposing_too_is_not_settled_by_the_peers_first_scheme_packet() -> None:
    """Simultaneous, and the first proposal was lost (the peer's socket was not bound
    yet). The side that got the other's proposal settles, as initiator here, and starts
    its scheme. Its scheme packet must not settle the peer as initiator too (it is no
    answer to the peer's first flight); its proposal, sent again as it settles, settles
    the peer the same way, on one transcript."""
    low = Negotiation(LOW, [DTLS], simultaneous=True)
    high = Negotiation(HIGH, [DTLS], simultaneous=True)
    low.propose(0.0, first_flight=b"\x16low's ClientHello")
    low.datagrams_to_send()  # lost: high was not listening yet
    high.propose(0.1, first_flight=b"\x16high's ClientHello")
    for datagram in high.datagrams_to_send():
        low.receive(datagram, 0.1)
    assert low.result is not None and low.result.initiator  # LOW's ID is the lower
    resent = low.datagrams_to_send()
    assert any(d[0] == 0 for d in resent)  # its proposal again: high may lack it
    assert high.receive(b"\x16low's scheme packet", 0.2) == []  # arrives first
    assert high.result is None
    for datagram in resent:
        high.receive(datagram, 0.2)
    assert high.result is not None and not high.result.initiator and high.result.simultaneous
    assert low.transcript_hash() == high.transcript_hash()


def test_a_stray_proposal_after_settling_changes_nothing() -> None:
    """A dialler learns its peer's ID only from the certificate: a proposal from anyone
    else, after the Accept, must not enter the transcript (the confirm would then fail)
    nor draw an answer."""
    a, b = Negotiation(LOW, [DTLS]), Negotiation(HIGH, [DTLS])
    a.propose(0.0)
    for datagram in a.datagrams_to_send():
        b.receive(datagram, 0.0)
    for datagram in b.datagrams_to_send():
        a.receive(datagram, 0.0)
    assert a.result is not None and b.result is not None
    before = a.transcript_hash()
    assert a.receive(Propose(peer("stranger"), (DTLS,)).encode(), 0.1) == []
    assert a.datagrams_to_send() == []
    assert a.transcript_hash() == before == b.transcript_hash()
