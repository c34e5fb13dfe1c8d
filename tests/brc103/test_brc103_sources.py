"""Unproven sessions counted per source (``Peer.receive(..., source=...)``).

A flood of initialRequests from one source must not push out the half-made session of
a client at another source, nor any session whose peer has signed:

- one source holds at most ``max_unproven_sessions_per_source`` unproven sessions; its
  newest pushes out its own oldest;
- at the cap on unproven sessions, or on all sessions, the victim is the oldest unproven
  session of the source holding the most of them;
- proven sessions go only when no unproven one is left;
- our own handshakes (no source) are not bounded per source.
"""

from __future__ import annotations

import pytest
from brc103_support import alice, bob, carol, handshake, one, relay, wallet

from trustmesh.brc103.errors import SessionNotFoundError
from trustmesh.brc103.messages import AuthMessage
from trustmesh.brc103.peer import (
    Event,
    GeneralMessageReceived,
    HandshakeCompleted,
    HandshakeFailed,
    Peer,
    PeerConfig,
)
from trustmesh.brc103.sessions import Session, SessionTable

B = bob().identity_key
SMALL = PeerConfig(max_sessions=32, max_unproven_sessions=8, max_unproven_sessions_per_source=4)


def payloads(events: list[Event]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, GeneralMessageReceived)]


def flood(server: Peer, source: str, count: int, now_ms: int) -> None:
    """``count`` initialRequests from fresh clients at ``source``, each answered."""
    for index in range(count):
        client = Peer(wallet(f"{index + 1:064x}"))
        server.receive(relay(client.initiate(now_ms)), now_ms, source=source)
        one(server.messages_to_send())


def start(client: Peer, server: Peer, source: str, now_ms: int) -> None:
    """The client's initialRequest from ``source`` and the server's answer: the server's
    session is made, unproven."""
    request = client.initiate(now_ms)
    server.receive(relay(request), now_ms, source=source)
    events = client.receive(relay(one(server.messages_to_send())), now_ms)
    assert [type(e) for e in events] == [HandshakeCompleted]


def first_request(client: Peer, server: Peer, now_ms: int) -> list[Event]:
    message: AuthMessage = client.create_general(b"first", identity_key=B)
    return server.receive(relay(message), now_ms)


def sources(server: Peer) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for session in server.sessions:
        if not session.peer_proven:
            out[session.source] = out.get(session.source, 0) + 1
    return out


def test_one_source_holds_at_most_its_share_of_unproven_sessions() -> None:
    server = Peer(bob(), SMALL)
    flood(server, "198.51.100.7", 20, 0)
    assert sources(server) == {"198.51.100.7": 4}
    assert server.sessions.unproven == 4
    assert server.sessions.unproven_of("198.51.100.7") == 4
    # The newest four are the ones kept.
    assert sorted(s.last_update_ms for s in server.sessions) == [0, 0, 0, 0]


@pytest.mark.parametrize("table_full_of_proven", [False, True])
def test_a_flood_from_one_source_does_not_evict_another_sources_handshake(
    table_full_of_proven: bool,
) -> None:
    """The honest client starts its handshake, a flood of initialRequests arrives from
    another source, then the honest client's first request: it is accepted."""
    config = PeerConfig(
        max_sessions=12, max_unproven_sessions=8, max_unproven_sessions_per_source=4
    )
    server = Peer(bob(), config)
    proven: list[Peer] = []
    if table_full_of_proven:
        for index in range(11):
            client = Peer(wallet(f"{index + 100:064x}"))
            start(client, server, f"192.0.2.{index}", 0)
            assert payloads(first_request(client, server, 0)) == [b"first"]
            proven.append(client)
    honest = Peer(alice())
    start(honest, server, "203.0.113.5", 1)
    flood(server, "198.51.100.7", 40, 2)
    assert payloads(first_request(honest, server, 3)) == [b"first"]
    # The clients that had signed are still there, but for the least recently used one
    # at most: the flood's one place in a table full of proven sessions.
    lost = 0
    for client in proven:
        try:
            assert payloads(first_request(client, server, 4)) == [b"first"]
        except SessionNotFoundError:
            lost += 1
    assert lost <= 1
    if lost:
        with pytest.raises(SessionNotFoundError):
            first_request(proven[0], server, 5)
    assert len(server.sessions) <= config.max_sessions
    most = 1 if table_full_of_proven else config.max_unproven_sessions_per_source
    assert server.sessions.unproven_of("198.51.100.7") == most


def test_many_flooding_sources_lose_their_own_sessions_first() -> None:
    """At the cap on unproven sessions, the source holding the most goes first: a client
    with one half-made session outlasts floods from several sources."""
    server = Peer(bob(), SMALL)
    honest = Peer(alice())
    start(honest, server, "203.0.113.5", 0)
    for round_ in range(5):
        for source in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
            flood(server, source, 3, round_)
    assert server.sessions.unproven == SMALL.max_unproven_sessions
    assert server.sessions.unproven_of("203.0.113.5") == 1
    assert payloads(first_request(honest, server, 9)) == [b"first"]


def test_proven_sessions_go_only_when_no_unproven_one_is_left() -> None:
    config = PeerConfig(max_sessions=3, max_unproven_sessions=3, max_unproven_sessions_per_source=3)
    server = Peer(bob(), config)
    a, c = Peer(alice()), Peer(carol())
    for client, source in ((a, "192.0.2.1"), (c, "192.0.2.2")):
        start(client, server, source, 0)
        assert payloads(first_request(client, server, 0)) == [b"first"]
    flood(server, "198.51.100.7", 10, 1)  # the table is full: floods replace each other
    assert sources(server) == {"198.51.100.7": 1}
    for client in (a, c):
        assert payloads(first_request(client, server, 2)) == [b"first"]


def test_our_own_handshakes_are_not_bounded_per_source() -> None:
    client = Peer(alice(), PeerConfig(max_unproven_sessions=8, max_unproven_sessions_per_source=2))
    for now in range(6):
        client.initiate(now)
    assert client.sessions.unproven_of(None) == 6
    # They still count against the cap on unproven sessions: the oldest two go.
    for now in range(6, 10):
        client.initiate(now)
    assert client.sessions.unproven == 8
    failed = client.handle_timer(10)
    assert [type(e) for e in failed] == [HandshakeFailed, HandshakeFailed]


def test_the_counts_follow_proof_and_removal() -> None:
    server = Peer(bob(), SMALL)
    honest = Peer(alice())
    start(honest, server, "203.0.113.5", 0)
    assert server.sessions.unproven_of("203.0.113.5") == 1
    first_request(honest, server, 1)
    assert server.sessions.unproven_of("203.0.113.5") == 0
    assert server.sessions.unproven == 0
    flood(server, "198.51.100.7", 2, 2)
    for session in server.sessions:
        if not session.peer_proven:
            server.forget(session.session_nonce)
    assert server.sessions.unproven == 0
    assert server.sessions.unproven_of("198.51.100.7") == 0
    handshake(Peer(carol()), server, 3)  # no source: counted under None
    assert server.sessions.unproven_of(None) == 1


def test_a_per_source_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Peer(bob(), PeerConfig(max_unproven_sessions_per_source=0))


def test_the_table_alone() -> None:
    table = SessionTable(4, max_unproven=4, max_seen=100, max_unproven_per_source=2)

    def session(nonce: str, source: str | None) -> Session:
        return Session(nonce, None, initiator=False, last_update_ms=0, source=source)

    assert table.add(session("a1", "A")) == []
    assert table.add(session("a2", "A")) == []
    (evicted,) = table.add(session("a3", "A"))
    assert evicted.session_nonce == "a1"
    assert table.add(session("b1", "B")) == []
    b2 = session("b2", "B")
    assert table.add(b2) == []
    table.mark_proven(b2)
    assert (table.unproven, table.unproven_of("A"), table.unproven_of("B")) == (3, 2, 1)
    # Full (4): the newcomer from C evicts the oldest of A, the source holding the most.
    (evicted,) = table.add(session("c1", "C"))
    assert evicted.session_nonce == "a2"
    assert [s.session_nonce for s in table] == ["a3", "b1", "b2", "c1"]
