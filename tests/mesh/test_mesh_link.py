"""The dadm-mesh/1 link core: two MeshLink cores driven against each other in memory,
as TlsStream would drive them once TLS is up (the binding is a stand-in holding the
TlsEstablished event), with a fake clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from hypothesis import example, given, settings
from hypothesis import strategies as st
from meshtools import T0, Binding, MeshPki, Node, tls_with

from trustmesh.mesh.engine import GossipEngine
from trustmesh.mesh.link import (
    MAX_FRAME,
    MAX_HELLO_FRAME,
    MAX_IDS,
    MAX_PEERS,
    AttestChallengeFrame,
    AttestEvidenceFrame,
    BundleAckFrame,
    BundleFrame,
    BundleOfferFrame,
    BundleWantFrame,
    CloseCode,
    CrlFrame,
    Frame,
    GossipFrame,
    IHaveFrame,
    IWantFrame,
    KeepaliveFrame,
    LinkClosed,
    LinkConfig,
    LinkUp,
    MeshLink,
    PeerAddress,
    PeersFrame,
    State,
    split_address,
)
from trustmesh.mesh.trust import TrustView
from trustmesh.sansio import Event
from trustmesh.wire.frames import FrameDecoder, encode_frame
from trustmesh.wire.varint import encode_uvarint

# Every event a link may give (random input that makes a valid frame gives its event).
EVENT_TYPES = (
    LinkUp,
    KeepaliveFrame,
    GossipFrame,
    CrlFrame,
    PeersFrame,
    IHaveFrame,
    IWantFrame,
    BundleOfferFrame,
    BundleWantFrame,
    BundleFrame,
    BundleAckFrame,
    AttestChallengeFrame,
    AttestEvidenceFrame,
    LinkClosed,
)


def authorizer(trust: TrustView) -> Callable[[Sequence[x509.Certificate]], str]:
    """As the node authorizes a link: the peer's verified identity names it."""
    return lambda chain: trust.identity_of(chain, now=T0).node_id


def frame(kind: int, body: bytes | dict[str, Any] = b"") -> bytes:
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    return encode_frame(bytes((kind,)) + payload, MAX_FRAME)


def frames_in(data: bytes) -> list[tuple[int, bytes]]:
    return [(f[0], f[1:]) for f in FrameDecoder(MAX_FRAME).feed(data)]


def close_code_sent(link: MeshLink) -> str:
    """The code of the CLOSE frame a core queued (the last frame it wants to send)."""
    sent = frames_in(link.data_to_send())
    assert sent and sent[-1][0] == Frame.CLOSE, sent
    return str(json.loads(sent[-1][1])["code"])


@dataclass
class Pair:
    """Two linked cores; ``a`` dialed ``b``."""

    a: MeshLink
    b: MeshLink
    a_node: Node
    b_node: Node

    def pump(self, now: float = 0.0) -> tuple[list[Event], list[Event]]:
        """Deliver queued bytes both ways until both are quiet; the events each side got."""
        got_a: list[Event] = []
        got_b: list[Event] = []
        while True:
            to_b, to_a = self.a.data_to_send(), self.b.data_to_send()
            if not to_a and not to_b:
                return got_a, got_b
            if to_b:
                got_b += self.b.receive_data(to_b, now)
            if to_a:
                got_a += self.a.receive_data(to_a, now)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path_factory.mktemp("link") / "ca")
    yield mesh
    mesh.close()


@pytest.fixture(scope="module")
def nodes(pki: MeshPki) -> tuple[Node, Node]:
    return pki.node("node-a"), pki.node("node-b")


@pytest.fixture(scope="module")
def shared_trust(pki: MeshPki) -> TrustView:
    """One trust view for the fuzzers: its cache spares a chain verification per example."""
    return pki.trust()


def make_pair(
    pki: MeshPki,
    nodes: tuple[Node, Node],
    *,
    hold_a: int = 30,
    hold_b: int = 30,
    listen_a: str | None = "127.0.0.1:7001",
    listen_b: str | None = None,
    start: bool = True,
    trust: TrustView | None = None,
    allow_zero_hold: bool = False,
) -> Pair:
    a_node, b_node = nodes
    trust = trust if trust is not None else pki.trust()
    a = MeshLink(
        LinkConfig("node-a", listen_a, hold_a, allow_zero_hold=allow_zero_hold),
        initiator=True,
        authorize=authorizer(trust),
        crl_number=lambda: 11,
    )
    b = MeshLink(
        LinkConfig("node-b", listen_b, hold_b, allow_zero_hold=allow_zero_hold),
        initiator=False,
        authorize=authorizer(trust),
    )
    a.bind(tls_with(b_node.chain))
    b.bind(tls_with(a_node.chain))
    pair = Pair(a, b, a_node, b_node)
    if start:
        assert a.start(0.0) == [] and b.start(0.0) == []
    return pair


def linked(pki: MeshPki, nodes: tuple[Node, Node], **kwargs: Any) -> Pair:
    pair = make_pair(pki, nodes, **kwargs)
    got_a, got_b = pair.pump()
    assert [type(e) for e in got_a] == [LinkUp] and [type(e) for e in got_b] == [LinkUp]
    return pair


def lone_link(pki: MeshPki, peer: Node, *, node_id: str = "node-b") -> MeshLink:
    """Our side (``node_id``) of a link to ``peer``, started: its HELLO already taken out."""
    link = MeshLink(LinkConfig(node_id), initiator=False, authorize=authorizer(pki.trust()))
    link.bind(tls_with(peer.chain))
    assert link.start(0.0) == []
    assert [k for k, _ in frames_in(link.data_to_send())] == [Frame.HELLO]
    return link


def hello(node_id: str = "node-a", **fields: Any) -> bytes:
    return frame(Frame.HELLO, {"version": 1, "node_id": node_id, "hold_time": 30, **fields})


# --- HELLO --------------------------------------------------------------------------------


def test_hello_exchange_brings_the_link_up_on_both_sides(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = make_pair(pki, nodes, hold_a=30, hold_b=9)
    hello_a = frames_in(pair.a.data_to_send())
    assert [k for k, _ in hello_a] == [Frame.HELLO]
    assert json.loads(hello_a[0][1]) == {
        "version": 1,
        "node_id": "node-a",
        "hold_time": 30,
        "crl_number": 11,
        "crl_parts": 1,
        "bundles": 1,
        "listen": "127.0.0.1:7001",
    }
    got_b = pair.b.receive_data(frame(Frame.HELLO, hello_a[0][1]), 0.0)
    got_a, more_b = pair.pump()
    assert got_b + more_b == [LinkUp("node-a", "127.0.0.1:7001", 11, 9)]
    assert got_a == [LinkUp("node-b", None, -1, 9)]
    assert pair.a.established and pair.b.established
    assert pair.a.peer_id == "node-b" and pair.b.peer_id == "node-a"
    assert pair.a.hold_time == pair.b.hold_time == 9


def test_a_hold_time_of_zero_on_either_side_turns_timers_off(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = linked(pki, nodes, hold_a=0, hold_b=30, allow_zero_hold=True)
    assert pair.a.hold_time == pair.b.hold_time == 0
    assert pair.a.get_timer() is None and pair.b.get_timer() is None


def test_before_hello_the_timer_is_the_hello_timeout_whatever_the_hold_time(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = make_pair(pki, nodes, hold_a=0, hold_b=3600, start=False)
    pair.a.start(100.0)
    pair.b.start(100.0)
    # Hold 0 does not turn it off, and a long hold time does not stretch it.
    assert pair.a.get_timer() == 110.0 and pair.b.get_timer() == 110.0
    assert pair.a.handle_timer(109.9) == []
    (closed,) = pair.a.handle_timer(110.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.HOLD_TIMER
    assert "HELLO" in closed.reason


def test_the_hello_timeout_is_configurable_and_not_moved_by_partial_frames(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    link = MeshLink(
        LinkConfig("node-b", hello_timeout=2.5), initiator=False, authorize=authorizer(pki.trust())
    )
    link.bind(tls_with(nodes[0].chain))
    assert link.start(0.0) == []
    assert link.get_timer() == 2.5
    whole = hello()
    assert link.receive_data(whole[:-1], 2.0) == []  # a HELLO trickled in, never finished
    assert link.get_timer() == 2.5
    (closed,) = link.handle_timer(2.5)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.HOLD_TIMER
    for bad in (0.0, -1.0, 3601.0):
        with pytest.raises(ValueError, match="hello_timeout"):
            LinkConfig("node-b", hello_timeout=bad)


def test_frames_split_at_every_byte_give_the_same_events(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = make_pair(pki, nodes)
    stream = pair.a.data_to_send()
    events: list[Event] = []
    for i in range(len(stream)):
        events += pair.b.receive_data(stream[i : i + 1], 0.0)
    assert events == [LinkUp("node-a", "127.0.0.1:7001", 11, 30)]


def test_a_frame_before_hello_is_a_protocol_error(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    for early in (frame(Frame.GOSSIP, b"{}"), frame(Frame.KEEPALIVE), frame(Frame.IHAVE, {})):
        link = lone_link(pki, nodes[0])
        (closed,) = link.receive_data(early, 0.0)
        assert isinstance(closed, LinkClosed)
        assert closed.code == CloseCode.PROTOCOL and closed.error and not closed.by_peer
        assert close_code_sent(link) == CloseCode.PROTOCOL
        assert link.state is State.CLOSED and link.get_timer() is None


def test_frames_after_the_bad_one_are_ignored(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    link = lone_link(pki, nodes[0])
    events = link.receive_data(frame(Frame.GOSSIP, b"{}") + hello(), 0.0)
    assert [type(e) for e in events] == [LinkClosed]
    assert link.receive_data(hello(), 1.0) == []


def test_a_hello_naming_another_node_is_refused(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    link = lone_link(pki, nodes[0])
    (closed,) = link.receive_data(hello("node-c"), 0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REFUSED
    assert "node-c" in closed.reason
    assert close_code_sent(link) == CloseCode.REFUSED


@pytest.mark.parametrize(
    "fields",
    [
        {"version": 2},
        {"version": "1"},
        {"hold_time": 1},
        {"hold_time": 2},
        {"hold_time": 3601},
        {"hold_time": -3},
        {"hold_time": "30"},
        {"hold_time": True},
        {"hold_time": 30.0},
        {"hold_time": None},
        {"crl_number": "7"},
        {"crl_number": True},
        {"crl_number": 1.5},
        {"listen": "no-port"},
        {"listen": "host:99999"},
        {"listen": ":7000"},
        {"listen": 7000},
        {"listen": "a b:7000"},
    ],
)
def test_hello_field_rules(pki: MeshPki, nodes: tuple[Node, Node], fields: dict[str, Any]) -> None:
    link = lone_link(pki, nodes[0])
    (closed,) = link.receive_data(hello(**fields), 0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL, fields


@pytest.mark.parametrize("version", [True, 1.0, None, [1], "1", 0])
def test_hello_version_must_be_the_integer_1(
    pki: MeshPki, nodes: tuple[Node, Node], version: object
) -> None:
    link = lone_link(pki, nodes[0])
    (closed,) = link.receive_data(hello(version=version), 0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL
    assert "version" in closed.reason
    assert close_code_sent(link) == CloseCode.PROTOCOL


@pytest.mark.parametrize(
    ("fields", "hold", "listen"),
    [
        ({"hold_time": 9}, 9, None),
        ({"hold_time": 3600}, 30, None),
        ({"listen": "[::1]:7000"}, 30, "[::1]:7000"),
        ({"listen": "node-a.example:1"}, 30, "node-a.example:1"),
        ({"crl_number": 2**70}, 30, None),
    ],
)
def test_hello_values_that_are_accepted(
    pki: MeshPki, nodes: tuple[Node, Node], fields: dict[str, Any], hold: int, listen: str | None
) -> None:
    link = lone_link(pki, nodes[0])
    (up,) = link.receive_data(hello(**fields), 0.0)
    assert isinstance(up, LinkUp) and up.hold_time == hold and up.listen == listen


def lone_link_with(pki: MeshPki, peer: Node, config: LinkConfig) -> MeshLink:
    link = MeshLink(config, initiator=False, authorize=authorizer(pki.trust()))
    link.bind(tls_with(peer.chain))
    assert link.start(0.0) == []
    link.data_to_send()  # our HELLO
    return link


def test_a_peer_hold_time_of_zero_is_refused_unless_allowed(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    link = lone_link(pki, nodes[0])  # offers 30, does not allow 0
    (closed,) = link.receive_data(hello(hold_time=0), 0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REFUSED and closed.error
    assert "hold_time 0" in closed.reason
    assert close_code_sent(link) == CloseCode.REFUSED
    assert not link.established and link.get_timer() is None
    allowing = lone_link_with(pki, nodes[0], LinkConfig("node-b", allow_zero_hold=True))
    (up,) = allowing.receive_data(hello(hold_time=0), 0.0)
    assert isinstance(up, LinkUp) and up.hold_time == 0
    assert allowing.get_timer() is None
    # Offering 0 ourselves, we have no hold timer whatever the peer offers.
    own_zero = lone_link_with(pki, nodes[0], LinkConfig("node-b", hold_time=0))
    (up,) = own_zero.receive_data(hello(hold_time=0), 0.0)
    assert isinstance(up, LinkUp) and up.hold_time == 0


@pytest.mark.parametrize("hold", [3, 4, 8])
def test_a_peer_hold_time_below_the_minimum_is_refused(
    pki: MeshPki, nodes: tuple[Node, Node], hold: int
) -> None:
    link = lone_link(pki, nodes[0])
    (closed,) = link.receive_data(hello(hold_time=hold), 0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REFUSED
    assert f"hold_time {hold} is below our minimum of 9" in closed.reason
    assert close_code_sent(link) == CloseCode.REFUSED


def test_the_minimum_hold_time_is_configurable_and_never_above_our_own(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    strict = lone_link_with(pki, nodes[0], LinkConfig("node-b", hold_time=90, min_hold_time=60))
    (closed,) = strict.receive_data(hello(hold_time=59), 0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REFUSED
    strict = lone_link_with(pki, nodes[0], LinkConfig("node-b", hold_time=90, min_hold_time=60))
    (up,) = strict.receive_data(hello(hold_time=60), 0.0)
    assert isinstance(up, LinkUp) and up.hold_time == 60
    low = lone_link_with(pki, nodes[0], LinkConfig("node-b", hold_time=5))  # below 9
    (up,) = low.receive_data(hello(hold_time=5), 0.0)
    assert isinstance(up, LinkUp) and up.hold_time == 5
    low = lone_link_with(pki, nodes[0], LinkConfig("node-b", hold_time=5))
    (closed,) = low.receive_data(hello(hold_time=4), 0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REFUSED
    for bad in (0, 2, 3601):
        with pytest.raises(ValueError, match="min_hold_time"):
            LinkConfig("node-b", min_hold_time=bad)


def test_the_dialler_hears_why_its_hold_time_was_refused(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = make_pair(pki, nodes, hold_a=0, hold_b=30)
    got_a, got_b = pair.pump()
    [refused] = got_b
    assert isinstance(refused, LinkClosed) and refused.code == CloseCode.REFUSED
    assert (
        LinkClosed(
            "refused: hold_time 0 (no hold timer) is not accepted here",
            error=True,
            by_peer=True,
            code=CloseCode.REFUSED,
        )
        in got_a
    )
    assert not pair.b.established


def test_hello_must_be_a_json_object(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    for body in (b"[]", b"not json", b'{"version":1,"version":1}', b""):
        link = lone_link(pki, nodes[0])
        (closed,) = link.receive_data(frame(Frame.HELLO, body), 0.0)
        assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL


def padded_hello(body_size: int) -> bytes:
    """A valid HELLO whose JSON body is exactly ``body_size`` bytes (an unknown field pads it)."""
    fields = {"version": 1, "node_id": "node-a", "hold_time": 30, "pad": ""}
    fields["pad"] = "p" * (body_size - len(json.dumps(fields).encode()))
    body = json.dumps(fields).encode()
    assert len(body) == body_size
    return frame(Frame.HELLO, body)


def test_a_hello_body_of_the_limit_is_taken(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    link = lone_link(pki, nodes[0])
    (up,) = link.receive_data(padded_hello(MAX_HELLO_FRAME), 0.0)
    assert isinstance(up, LinkUp) and up.peer_id == "node-a"


def test_a_hello_bigger_than_its_limit_is_a_protocol_error(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    link = lone_link(pki, nodes[0])
    (closed,) = link.receive_data(padded_hello(MAX_HELLO_FRAME + 1), 0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL
    assert close_code_sent(link) == CloseCode.PROTOCOL
    assert not link.established and link.state is State.CLOSED


def test_a_hello_bigger_than_its_limit_is_refused_even_in_pieces(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    link = lone_link(pki, nodes[0])
    data = padded_hello(4 * MAX_HELLO_FRAME)
    events: list[Event] = []
    for at in range(0, len(data), 1000):
        events += link.receive_data(data[at : at + 1000], 0.0)
    assert [type(e) for e in events] == [LinkClosed]
    assert isinstance(events[0], LinkClosed) and events[0].code == CloseCode.PROTOCOL


def test_a_length_prefix_over_the_frame_limit_is_refused_before_hello(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    link = lone_link(pki, nodes[0])
    # Only the length prefix: refused before any body is buffered.
    (closed,) = link.receive_data(encode_uvarint(MAX_FRAME + 1), 0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL
    assert close_code_sent(link) == CloseCode.PROTOCOL


def test_a_big_frame_right_after_hello_in_the_same_read_is_taken(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    link = lone_link(pki, nodes[0])
    big = b"g" * (4 * MAX_HELLO_FRAME)
    events = link.receive_data(hello() + frame(Frame.GOSSIP, big), 0.0)
    assert events == [LinkUp("node-a", None, -1, 30), GossipFrame(big)]
    assert link.data_to_send() == b""  # nothing to say: no CLOSE
    # And the largest frame, split across reads, once up.
    largest = b"h" * (MAX_FRAME - 1)
    data = frame(Frame.GOSSIP, largest)
    assert link.receive_data(data[:100], 1.0) == []
    assert link.receive_data(data[100:], 1.0) == [GossipFrame(largest)]


# --- who may link -------------------------------------------------------------------------


def test_a_revoked_peer_is_closed_with_code_revoked(pki: MeshPki, tmp_path: Any) -> None:
    own = MeshPki(tmp_path / "ca")  # its own CA: revoking here touches no other test
    try:
        peer = own.node("node-a")
        trust = own.trust()
        own.revoke(peer)
        trust.apply_crl(own.crl())
        link = MeshLink(LinkConfig("node-b"), initiator=False, authorize=authorizer(trust))
        link.bind(tls_with(peer.chain))
        (closed,) = link.start(0.0)
        assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REVOKED
        assert closed.error and not closed.by_peer
        sent = frames_in(link.data_to_send())
        assert [k for k, _ in sent] == [Frame.CLOSE]  # no HELLO goes out
        assert json.loads(sent[0][1])["code"] == "revoked"
    finally:
        own.close()


def test_an_untrusted_peer_is_refused(pki: MeshPki, tmp_path: Any) -> None:
    foreign = MeshPki(tmp_path / "foreign")
    try:
        link = MeshLink(LinkConfig("node-b"), initiator=False, authorize=authorizer(pki.trust()))
        link.bind(tls_with(foreign.node("node-a").chain))
        (closed,) = link.start(0.0)
        assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REFUSED
        assert close_code_sent(link) == CloseCode.REFUSED
    finally:
        foreign.close()


@pytest.mark.parametrize("alpn", [None, "h2", "http/1.1", "dadm-mesh/2", "DADM-MESH/1", ""])
def test_a_tls_session_without_the_mesh_alpn_is_refused(
    pki: MeshPki, nodes: tuple[Node, Node], alpn: str | None
) -> None:
    asked: list[Sequence[x509.Certificate]] = []

    def authorize(chain: Sequence[x509.Certificate]) -> str:
        asked.append(chain)
        return "node-a"

    link = MeshLink(LinkConfig("node-b"), initiator=False, authorize=authorize)
    link.bind(tls_with(nodes[0].chain, alpn=alpn))
    (closed,) = link.start(0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REFUSED
    assert closed.error and not closed.by_peer and "ALPN" in closed.reason
    sent = frames_in(link.data_to_send())
    assert [k for k, _ in sent] == [Frame.CLOSE]  # no HELLO goes out
    assert json.loads(sent[0][1])["code"] == "refused"
    assert asked == [] and link.peer_id is None  # refused before the peer is looked at
    assert link.state is State.CLOSED and link.get_timer() is None
    assert link.receive_data(hello(), 0.0) == []


def test_a_link_to_ourselves_is_refused(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    link = MeshLink(LinkConfig("node-a"), initiator=True, authorize=authorizer(pki.trust()))
    link.bind(tls_with(nodes[0].chain))
    (closed,) = link.start(0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.REFUSED


@pytest.mark.parametrize("binding", [None, Binding(None)])
def test_without_a_tls_session_the_link_closes(pki: MeshPki, binding: Binding | None) -> None:
    link = MeshLink(LinkConfig("node-b"), initiator=False, authorize=authorizer(pki.trust()))
    if binding is not None:
        link.bind(binding)
    (closed,) = link.start(0.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL


def test_link_config_checks_the_hold_time() -> None:
    for bad in (1, 2, -1, 3601):
        with pytest.raises(ValueError, match="hold_time"):
            LinkConfig("node-a", hold_time=bad)
    assert LinkConfig("node-a", hold_time=0).hold_time == 0
    assert LinkConfig("node-a", hold_time=3).hold_time == 3


# --- timers -------------------------------------------------------------------------------


def test_keepalives_go_out_every_third_of_the_hold_time(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = linked(pki, nodes, hold_a=9, hold_b=30)
    assert pair.a.get_timer() == 3.0
    assert pair.a.handle_timer(2.9) == [] and pair.a.data_to_send() == b""
    assert pair.a.handle_timer(3.0) == []
    assert frames_in(pair.a.data_to_send()) == [(Frame.KEEPALIVE, b"")]
    assert pair.a.get_timer() == 6.0


def test_keepalives_keep_the_link_alive_past_the_hold_time(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = linked(pki, nodes, hold_a=9, hold_b=9)
    now = 0.0
    keepalives = 0
    while now < 60.0:
        now = min(t for t in (pair.a.get_timer(), pair.b.get_timer()) if t is not None)
        assert pair.a.handle_timer(now) == [] and pair.b.handle_timer(now) == []
        got_a, got_b = pair.pump(now)
        assert set(got_a + got_b) <= {KeepaliveFrame()}
        keepalives += len(got_a) + len(got_b)
    assert pair.a.established and pair.b.established
    assert keepalives >= 2 * 60 // 3  # each side, every 3 seconds


def test_a_keepalive_is_delivered_as_an_event(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = linked(pki, nodes, hold_a=9, hold_b=9)
    assert pair.a.handle_timer(3.0) == []
    got_a, got_b = pair.pump(3.0)
    assert got_a == [] and got_b == [KeepaliveFrame()]
    # It restarted b's hold timer: 9 seconds from when it came.
    assert pair.b.handle_timer(11.9) == [] and pair.b.established
    pair.b.data_to_send()
    assert pair.b.receive_data(frame(Frame.KEEPALIVE) * 3, 4.0) == [KeepaliveFrame()] * 3


def test_a_silent_peer_is_closed_when_the_hold_timer_expires(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = linked(pki, nodes, hold_a=9, hold_b=9)
    pair.a.handle_timer(3.0)
    pair.a.data_to_send()  # the keepalive is lost: b never hears from a
    assert pair.b.handle_timer(8.9) == []
    pair.b.data_to_send()
    (closed,) = pair.b.handle_timer(9.0)
    assert isinstance(closed, LinkClosed)
    assert closed.code == CloseCode.HOLD_TIMER and closed.error and not closed.by_peer
    assert pair.b.get_timer() is None and pair.b.handle_timer(100.0) == []
    got_a, _ = pair.pump(9.0)
    assert got_a == [
        LinkClosed(
            "hold-timer-expired: hold timer expired",
            error=True,
            by_peer=True,
            code=CloseCode.HOLD_TIMER,
        )
    ]


def test_any_frame_restarts_the_hold_timer(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = linked(pki, nodes, hold_a=9, hold_b=9)
    pair.a.send_ihave(["m:1"])
    pair.pump(8.0)
    assert pair.b.handle_timer(9.0) == []
    assert pair.b.established
    (closed,) = pair.b.handle_timer(17.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.HOLD_TIMER


# --- closing ------------------------------------------------------------------------------


def test_a_peers_close_frame_ends_the_link_with_its_code(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = linked(pki, nodes)
    assert pair.a.close_with(CloseCode.DUPLICATE, "one link is enough") == [
        LinkClosed("duplicate-link: one link is enough", error=False, code="duplicate-link")
    ]
    _, got_b = pair.pump()
    assert got_b == [
        LinkClosed(
            "duplicate-link: one link is enough", error=True, by_peer=True, code="duplicate-link"
        )
    ]
    assert pair.a.close_with(CloseCode.SHUTDOWN, "again") == []
    assert pair.a.data_to_send() == b"" and pair.b.data_to_send() == b""


def test_an_orderly_close_is_not_an_error(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = linked(pki, nodes)
    (mine,) = pair.a.close("bye", 1.0)
    _, (theirs,) = pair.pump()
    assert isinstance(mine, LinkClosed) and isinstance(theirs, LinkClosed)
    assert mine.code == theirs.code == CloseCode.SHUTDOWN
    assert not mine.error and not theirs.error and theirs.by_peer


def test_a_close_frame_is_honoured_before_hello(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    link = lone_link(pki, nodes[0])
    (closed,) = link.receive_data(frame(Frame.CLOSE, {"code": "link-cap", "reason": "full"}), 0.0)
    assert closed == LinkClosed("link-cap: full", error=True, by_peer=True, code="link-cap")
    assert link.data_to_send() == b""  # nothing is said back


def test_nothing_is_sent_after_the_peers_close_even_if_garbage_follows(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = linked(pki, nodes)
    data = frame(Frame.CLOSE, {"code": "shutdown"}) + encode_uvarint(MAX_FRAME + 1)
    (closed,) = pair.b.receive_data(data, 1.0)
    assert closed == LinkClosed("shutdown: ", error=False, by_peer=True, code="shutdown")
    assert pair.b.data_to_send() == b""
    # Nor after any later action or input.
    assert pair.b.close_with(CloseCode.PROTOCOL, "late") == []
    assert pair.b.receive_data(frame(99), 2.0) == [] and pair.b.handle_timer(100.0) == []
    pair.b.send_gossip(b"{}")
    assert pair.b.data_to_send() == b""


def test_nothing_is_sent_after_our_own_close_even_if_garbage_follows(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = linked(pki, nodes)
    # A bad frame closes the link; a bad length prefix in the same read says nothing more.
    events = pair.b.receive_data(frame(99) + encode_uvarint(MAX_FRAME + 1), 1.0)
    assert [type(e) for e in events] == [LinkClosed]
    assert [k for k, _ in frames_in(pair.b.data_to_send())] == [Frame.CLOSE]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"reason": "no code"},
        {"code": None},
        {"code": ""},
        {"code": 5},
        {"code": True},
        {"code": ["x" * 100]},
        {"code": {"c": "shutdown"}},
    ],
)
def test_a_close_without_a_string_code_reports_a_protocol_error(
    pki: MeshPki, nodes: tuple[Node, Node], body: dict[str, Any]
) -> None:
    link = lone_link(pki, nodes[0])
    (closed,) = link.receive_data(frame(Frame.CLOSE, body), 0.0)
    reason = str(body.get("reason", ""))
    assert closed == LinkClosed(
        f"protocol-error: {reason}", error=True, by_peer=True, code=CloseCode.PROTOCOL
    )
    assert link.data_to_send() == b""


def test_a_close_code_and_reason_are_cut_to_size(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    link = lone_link(pki, nodes[0])
    body = {"code": "c" * 100, "reason": ["r" * 1000]}
    (closed,) = link.receive_data(frame(Frame.CLOSE, body), 0.0)
    assert isinstance(closed, LinkClosed) and closed.by_peer and closed.error
    assert closed.code == "c" * 64
    assert closed.reason == "c" * 64 + ": " + str(["r" * 1000])[:512]


def test_eof_from_the_peer_closes_the_link(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = linked(pki, nodes)
    (closed,) = pair.b.receive_data(b"", 1.0)
    assert isinstance(closed, LinkClosed) and closed.by_peer and closed.error
    assert pair.b.receive_data(frame(Frame.KEEPALIVE), 2.0) == []


# --- delivery -----------------------------------------------------------------------------


def test_every_frame_type_is_delivered(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = linked(pki, nodes)
    raw = nodes[0].sign().encode()
    peers = [PeerAddress("node-c", "10.0.0.3:7000"), PeerAddress("node-d", "[::1]:7001")]
    pair.a.send_gossip(raw)
    pair.a.send_crl(b"\x30\x00 der")
    pair.a.send_peers(peers)
    pair.a.send_ihave(["m:1", "m:2"])
    pair.a.send_iwant(["m:3"])
    got_a, got_b = pair.pump()
    assert got_a == []
    assert got_b == [
        GossipFrame(raw),
        CrlFrame(b"\x30\x00 der"),
        PeersFrame(tuple(peers)),
        IHaveFrame(("m:1", "m:2")),
        IWantFrame(("m:3",)),
    ]


def test_sends_are_capped(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = linked(pki, nodes)
    pair.a.send_peers([PeerAddress(f"n{i}", f"h:{i + 1}") for i in range(MAX_PEERS + 5)])
    pair.a.send_ihave([f"m:{i}" for i in range(MAX_IDS + 5)])
    _, (peers, ihave) = pair.pump()
    assert isinstance(peers, PeersFrame) and len(peers.peers) == MAX_PEERS
    assert isinstance(ihave, IHaveFrame) and len(ihave.ids) == MAX_IDS


def test_nothing_is_sent_before_the_link_is_up(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = make_pair(pki, nodes)
    pair.a.data_to_send()  # the HELLO
    pair.a.send_gossip(b"{}")
    pair.a.send_ihave(["m:1"])
    assert pair.a.data_to_send() == b""


def test_nothing_is_sent_after_close(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = linked(pki, nodes)
    pair.a.close("bye", 0.0)
    pair.a.data_to_send()
    pair.a.send_gossip(b"{}")
    pair.a.send_crl(b"x")
    assert pair.a.data_to_send() == b""


@pytest.mark.parametrize(
    "bad",
    [
        frame(Frame.HELLO, {"version": 1, "node_id": "node-a", "hold_time": 30}),  # a second
        frame(99),
        frame(0),
        encode_frame(b""),  # no type byte
        frame(Frame.KEEPALIVE, b"x"),
        frame(Frame.PEERS, {"peers": "node-c"}),
        frame(Frame.PEERS, {"peers": [{"node_id": "-bad", "address": "h:1"}]}),
        frame(Frame.PEERS, {"peers": [{"node_id": "node-c", "address": "h"}]}),
        frame(Frame.PEERS, {"peers": [{"node_id": "node-c", "address": "h:0"}]}),
        frame(Frame.PEERS, {"peers": ["node-c"]}),
        frame(Frame.PEERS, {"peers": [{"node_id": "c", "address": "h:1"}] * (MAX_PEERS + 1)}),
        frame(Frame.IHAVE, {"ids": ["m:1", ""]}),
        frame(Frame.IHAVE, {"ids": ["m" * 129]}),
        frame(Frame.IHAVE, {"ids": "m:1"}),
        frame(Frame.IWANT, {"ids": [1]}),
        frame(Frame.IWANT, {"ids": ["m"] * (MAX_IDS + 1)}),
        frame(Frame.IWANT, b"[]"),
        frame(Frame.CLOSE, b"[]"),
        encode_uvarint(MAX_FRAME + 1),
    ],
)
def test_malformed_frames_after_hello_are_protocol_errors(
    pki: MeshPki, nodes: tuple[Node, Node], bad: bytes
) -> None:
    pair = linked(pki, nodes)
    events = pair.b.receive_data(bad, 1.0)
    assert [type(e) for e in events] == [LinkClosed]
    assert isinstance(events[0], LinkClosed) and events[0].code == CloseCode.PROTOCOL
    assert close_code_sent(pair.b) == CloseCode.PROTOCOL
    (closed,) = pair.a.receive_data(frame(Frame.CLOSE, {"code": "protocol-error"}), 1.0)
    assert isinstance(closed, LinkClosed) and closed.by_peer


def test_frames_before_a_bad_length_prefix_are_still_delivered(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = linked(pki, nodes)
    events = pair.b.receive_data(frame(Frame.GOSSIP, b"{}") + encode_uvarint(MAX_FRAME + 1), 1.0)
    assert events[0] == GossipFrame(b"{}")
    assert isinstance(events[1], LinkClosed) and events[1].code == CloseCode.PROTOCOL


def test_a_frame_of_the_maximum_size_is_delivered(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = linked(pki, nodes)
    body = b"g" * (MAX_FRAME - 1)
    pair.a.send_gossip(body)
    _, got_b = pair.pump()
    assert got_b == [GossipFrame(body)]


@pytest.mark.parametrize("body", [b'{"ids":["\\ud800"]}', b'{"ids":["m:\\udfff"]}'])
def test_an_id_with_a_lone_surrogate_is_a_protocol_error(
    pki: MeshPki, nodes: tuple[Node, Node], body: bytes
) -> None:
    pair = linked(pki, nodes)
    (closed,) = pair.b.receive_data(frame(Frame.IHAVE, body), 1.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL
    assert "surrogate" in closed.reason
    assert close_code_sent(pair.b) == CloseCode.PROTOCOL


def test_every_announced_id_can_be_asked_for(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    pair = linked(pki, nodes)
    ids = ["m:1", "\U0001f600", "é" * 128, "\\ud800"]
    (ihave,) = pair.b.receive_data(frame(Frame.IHAVE, {"ids": ids}), 1.0)
    assert ihave == IHaveFrame(tuple(ids))
    engine = GossipEngine("node-b", pki.trust())
    pair.b.send_iwant(engine.on_ihave("node-a", ihave.ids, now_ms=0))
    got_a, _ = pair.pump()
    assert got_a == [IWantFrame(tuple(ids))]


# --- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("[::1]:1", ("::1", 1)),
        ("node-1.mesh:65535", ("node-1.mesh", 65535)),
    ],
)
def test_split_address(address: str, parts: tuple[str, int]) -> None:
    assert split_address(address) == parts


@pytest.mark.parametrize(
    "address", ["", "host", ":80", "host:", "host:0", "host:65536", "host:-1", "ho st:1", "h:x"]
)
def test_split_address_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="host"):
        split_address(address)


def test_port_zero_only_to_listen() -> None:
    assert split_address("127.0.0.1:0", any_port=True) == ("127.0.0.1", 0)


# --- fuzzing ------------------------------------------------------------------------------


def _check_events(link: MeshLink, events: list[Event]) -> None:
    assert all(isinstance(e, EVENT_TYPES) for e in events), events
    closes = [i for i, e in enumerate(events) if isinstance(e, LinkClosed)]
    assert closes in ([], [len(events) - 1]), events  # at most one, and it is the last
    if closes:
        assert link.state is State.CLOSED
    assert not any(isinstance(e, LinkUp) for e in events)  # already up


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=5))
@example(chunks=[b"\x03", b"\r\x01\x00"])  # a BUNDLE frame: a valid event (seen on CI)
def test_random_bytes_after_hello_give_events_or_a_close(
    pki: MeshPki, nodes: tuple[Node, Node], shared_trust: TrustView, chunks: list[bytes]
) -> None:
    pair = linked(pki, nodes, trust=shared_trust)
    events: list[Event] = []
    for i, chunk in enumerate(chunks):
        events += pair.b.receive_data(chunk, float(i))
    _check_events(pair.b, events)


frame_bodies = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.sampled_from(["ids", "peers", "code", "reason", "node_id", "address"]),
            st.one_of(
                st.text(max_size=10),
                st.lists(st.text(max_size=10), max_size=3),
                st.lists(
                    st.fixed_dictionaries(
                        {"node_id": st.text(max_size=8), "address": st.text(max_size=12)}
                    ),
                    max_size=2,
                ),
                st.integers(),
            ),
        ),
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    sent=st.lists(st.tuples(st.integers(0, 10), frame_bodies), min_size=1, max_size=6),
)
def test_random_well_framed_frames_after_hello_give_events_or_a_close(
    pki: MeshPki, nodes: tuple[Node, Node], shared_trust: TrustView, sent: list[tuple[int, bytes]]
) -> None:
    pair = linked(pki, nodes, trust=shared_trust)
    stream = b"".join(frame(kind, body) for kind, body in sent)
    _check_events(pair.b, pair.b.receive_data(stream, 1.0))


# --- bundles --------------------------------------------------------------------------------


def test_bundle_frames_cross_a_link_whose_peers_both_speak_them(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    pair = linked(pki, nodes)
    assert pair.a.peer_bundles and pair.b.peer_bundles
    pair.a.send_bundle_offer(["node-a:1:0", "node-a:2:0"])
    pair.b.send_bundle_want(["node-a:1:0"], ["node-a:2:0"])
    pair.a.send_bundle(4, b"\x9f\x88\xff")
    pair.b.send_bundle_ack(["node-a:1:0"], [("node-a:3:0", "the bundle store is full " * 20)])
    got_a, got_b = pair.pump()
    assert got_b == [
        BundleOfferFrame(("node-a:1:0", "node-a:2:0")),
        BundleFrame(4, b"\x9f\x88\xff"),
    ]
    want, ack = got_a
    assert want == BundleWantFrame(("node-a:1:0",), ("node-a:2:0",))
    assert isinstance(ack, BundleAckFrame) and ack.ids == ("node-a:1:0",)
    assert ack.refused[0][0] == "node-a:3:0" and len(ack.refused[0][1]) == 128


def test_a_peer_without_bundles_in_its_hello_is_sent_none(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    link = lone_link(pki, nodes[0])
    link.receive_data(hello(), 0.0)
    assert link.established and not link.peer_bundles
    link.send_bundle_offer(["node-a:1:0"])
    link.send_bundle(1, b"bundle")
    link.send_bundle_ack(["node-a:1:0"])
    assert link.data_to_send() == b""


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Frame.BUNDLE, b""),
        (Frame.BUNDLE, b"\x00\x9f\xff"),  # no copies
        (Frame.BUNDLE, b"\x01"),  # copies, no bundle
        (Frame.BUNDLE_OFFER, {"ids": "node-a:1:0"}),
        (Frame.BUNDLE_OFFER, {"ids": ["x" * 301]}),
        (Frame.BUNDLE_OFFER, {"ids": ["node-a:1:0"] * 257}),
        (Frame.BUNDLE_WANT, {"want": [1], "have": []}),
        (Frame.BUNDLE_ACK, {"ids": [], "refused": [["node-a:1:0"]]}),
        (Frame.BUNDLE_ACK, {"ids": [], "refused": [["node-a:1:0", 5]]}),
    ],
)
def test_a_malformed_bundle_frame_closes_the_link(
    pki: MeshPki, nodes: tuple[Node, Node], kind: int, body: bytes | dict[str, Any]
) -> None:
    link = lone_link(pki, nodes[0])
    link.receive_data(hello(bundles=1), 0.0)
    events = link.receive_data(frame(kind, body), 0.0)
    assert [type(e) for e in events] == [LinkClosed]
    assert close_code_sent(link) == CloseCode.PROTOCOL


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(range(Frame.BUNDLE_OFFER, Frame.BUNDLE_ACK + 1)), body=st.binary())
def test_any_bundle_frame_body_is_an_event_or_a_protocol_close(
    pki: MeshPki, nodes: tuple[Node, Node], kind: int, body: bytes
) -> None:
    link = lone_link(pki, nodes[0])
    link.receive_data(hello(bundles=1), 0.0)
    events = link.receive_data(frame(kind, body), 0.0)
    assert len(events) == 1
    if isinstance(events[0], LinkClosed):
        assert close_code_sent(link) == CloseCode.PROTOCOL
