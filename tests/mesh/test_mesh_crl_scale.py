"""CRLs of any size over a link (mesh-link.md section 3.1): a CRL over one frame travels
as CRL_PART pieces with CRL_ACK flow control to a peer that takes them, and never as an
oversize frame; the receiver's reassembly is bounded in size, count and time. Also the
trust view's side: the newest CRL replaces the revoked set, and its size is bounded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from meshtools import T0, MeshPki, Node, big_crl, ms, signed_crl, tls_with

import trustmesh.mesh.trust as trust_module
from trustmesh.mesh.crlparts import (
    CRL_PIECE,
    CRL_WINDOW,
    DEFAULT_CRL_TIMEOUT,
    decode_ack,
    encode_ack,
    encode_part,
)
from trustmesh.mesh.link import (
    MAX_FRAME,
    CloseCode,
    CrlFrame,
    Frame,
    LinkClosed,
    LinkConfig,
    MeshLink,
)
from trustmesh.mesh.trust import MAX_CRL, CrlRejected, TrustView
from trustmesh.sansio import Event
from trustmesh.wire.frames import FrameDecoder, encode_frame
from trustmesh.wire.jsonwire import compact_json

REVOKED = 100_000
NUMBER = ms(T0) + 1  # newer than any CRL the CA makes at T0


def authorizer(trust: TrustView) -> Callable[[Sequence[x509.Certificate]], str]:
    return lambda chain: trust.identity_of(chain, now=T0).node_id


def frames_in(data: bytes) -> list[tuple[int, bytes]]:
    return [(f[0], f[1:]) for f in FrameDecoder(MAX_FRAME).feed(data)]


def frame(kind: int, body: bytes) -> bytes:
    return encode_frame(bytes((kind,)) + body, MAX_FRAME)


def close_code_sent(data: bytes) -> object:
    codes = [json.loads(b)["code"] for k, b in frames_in(data) if k == Frame.CLOSE]
    return codes[0] if codes else None


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path_factory.mktemp("crl-scale") / "ca")
    yield mesh
    mesh.close()


@pytest.fixture(scope="module")
def nodes(pki: MeshPki) -> tuple[Node, Node]:
    return pki.node("node-a"), pki.node("node-b")


@pytest.fixture(scope="module")
def crl100k(pki: MeshPki) -> bytes:
    """100,000 revoked serials signed by the mesh's issuing CA: 3.5 MB, over 3 frames."""
    return big_crl(pki.issuing_key(), pki.ca.issuing_cert.subject, REVOKED, number=NUMBER)


@dataclass
class Pair:
    a: MeshLink
    b: MeshLink
    held_b: list[int]  # the CRL number b holds

    def pump(
        self, now: float = 0.0, *, on_a_output: Callable[[bytes], None] | None = None
    ) -> list[Event]:
        """Deliver both ways until quiet; what ``b`` got (``a`` gets only its LinkUp)."""
        got_b: list[Event] = []
        while True:
            to_b, to_a = self.a.data_to_send(), self.b.data_to_send()
            if not to_a and not to_b:
                return got_b
            if to_b:
                if on_a_output is not None:
                    on_a_output(to_b)
                got_b += self.b.receive_data(to_b, now)
            if to_a:
                got_a = self.a.receive_data(to_a, now)
                assert [type(e).__name__ for e in got_a] in ([], ["LinkUp"])


def linked(pki: MeshPki, nodes: tuple[Node, Node], *, held_b: int = -1, **config: Any) -> Pair:
    trust = pki.trust()
    held = [held_b]
    a = MeshLink(
        LinkConfig("node-a", **config),
        initiator=True,
        authorize=authorizer(trust),
        crl_number=lambda: NUMBER,
    )
    b = MeshLink(
        LinkConfig("node-b", **config),
        initiator=False,
        authorize=authorizer(trust),
        crl_number=lambda: held[0],
    )
    a.bind(tls_with(nodes[1].chain))
    b.bind(tls_with(nodes[0].chain))
    assert a.start(0.0) == [] and b.start(0.0) == []
    pair = Pair(a, b, held)
    assert [type(e).__name__ for e in pair.pump()] == ["LinkUp"]
    assert pair.a.established and pair.b.established
    return pair


def lone(pki: MeshPki, peer: Node, *, held: int = -1, **config: Any) -> MeshLink:
    """Our side (node-b) of a link to ``peer``, started, its HELLO taken out."""
    link = MeshLink(
        LinkConfig("node-b", **config),
        initiator=False,
        authorize=authorizer(pki.trust()),
        crl_number=lambda: held,
    )
    link.bind(tls_with(peer.chain))
    assert link.start(0.0) == []
    link.data_to_send()
    return link


def up(link: MeshLink, **hello: Any) -> None:
    body = {"version": 1, "node_id": "node-a", "hold_time": 30, **hello}
    link.receive_data(frame(Frame.HELLO, compact_json(body)), 0.0)
    assert link.established


# --- a CRL of 100,000 serials ---------------------------------------------------------------


def test_a_crl_of_100000_serials_crosses_a_link_whole_and_verified(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes
) -> None:
    assert len(crl100k) > 3 * MAX_FRAME  # far over one frame
    pair = linked(pki, nodes)
    assert pair.a.peer_crl_parts and pair.b.peer_crl_parts
    writes: list[int] = []

    def check(data: bytes) -> None:
        writes.append(len(data))
        for kind, body in frames_in(data):  # every frame within the limit, or it would not parse
            assert kind == Frame.CRL_PART
            assert 1 + len(body) <= MAX_FRAME

    pair.a.send_crl(crl100k)
    got = pair.pump(on_a_output=check)
    assert got == [CrlFrame(crl100k)]  # whole, byte for byte, once
    assert pair.a.established and pair.b.established  # no CRL size closes a link
    # Flow control: the sender never has more than the window unacknowledged.
    assert max(writes) <= CRL_WINDOW + 64 * (CRL_WINDOW // CRL_PIECE)
    assert len(writes) >= len(crl100k) // CRL_WINDOW
    trust = pki.trust()
    assert isinstance(got[0], CrlFrame)
    update = trust.apply_crl(got[0].der)  # verified: the CA's signature and number
    assert update is not None and update.number == NUMBER
    assert len(update.revoked) == len(trust.revoked) == REVOKED
    # Done: the sender knows the peer holds it and sends it no more.
    assert pair.a.crl.sending is None and pair.a.crl.peer_number == NUMBER
    assert pair.b.crl.receiving == 0
    pair.a.send_crl(crl100k)
    assert pair.a.data_to_send() == b""


def test_a_peer_without_crl_parts_gets_no_crl_over_a_frame_and_keeps_the_link(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes
) -> None:
    link = lone(pki, nodes[0])
    up(link, crl_number=-1)  # an older node: no crl_parts in its HELLO
    assert not link.peer_crl_parts
    link.send_crl(crl100k)
    assert link.data_to_send() == b""  # it gets it from the CA instead
    assert link.established
    small = pki.crl()  # one that fits still goes as a CRL frame
    link.send_crl(small)
    assert frames_in(link.data_to_send()) == [(Frame.CRL, small)]


@pytest.mark.parametrize(
    ("value", "takes"), [(1, True), (None, False), (2, False), (True, False), ("1", False)]
)
def test_hello_offers_crl_parts_and_reads_the_peers(
    pki: MeshPki, nodes: tuple[Node, Node], value: object, takes: bool
) -> None:
    link = MeshLink(LinkConfig("node-b"), initiator=False, authorize=authorizer(pki.trust()))
    link.bind(tls_with(nodes[0].chain))
    link.start(0.0)
    ((kind, body),) = frames_in(link.data_to_send())
    assert kind == Frame.HELLO and b'"crl_parts":1' in body
    up(link, crl_number=5, **({} if value is None else {"crl_parts": value}))
    assert link.peer_crl_parts is takes
    assert link.crl.peer_number == 5


# --- the sender -----------------------------------------------------------------------------


def test_the_sender_keeps_to_its_window_until_acknowledged(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes
) -> None:
    link = lone(pki, nodes[0])
    up(link, crl_parts=1)
    link.send_crl(crl100k)
    first = frames_in(link.data_to_send())
    assert [k for k, _ in first] == [Frame.CRL_PART] * (CRL_WINDOW // CRL_PIECE)
    assert link.data_to_send() == b""  # nothing more without an acknowledgement
    link.receive_data(frame(Frame.CRL_ACK, encode_ack(NUMBER, CRL_PIECE)), 1.0)
    assert [k for k, _ in frames_in(link.data_to_send())] == [Frame.CRL_PART]
    # The peer declines (acknowledges the whole): the sender stops at once.
    link.receive_data(frame(Frame.CRL_ACK, encode_ack(NUMBER, len(crl100k))), 2.0)
    assert link.data_to_send() == b""
    assert link.crl.sending is None and link.crl.peer_number == NUMBER
    assert link.established


def test_no_crl_goes_to_a_peer_that_holds_it_or_a_newer_one(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes
) -> None:
    link = lone(pki, nodes[0])
    up(link, crl_parts=1, crl_number=NUMBER)
    link.send_crl(crl100k)
    link.send_crl(pki.crl())  # older still
    assert link.data_to_send() == b""


def test_an_acknowledgement_of_bytes_never_sent_is_a_protocol_error(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes
) -> None:
    link = lone(pki, nodes[0])
    up(link, crl_parts=1)
    link.send_crl(crl100k)
    link.data_to_send()
    (closed,) = link.receive_data(frame(Frame.CRL_ACK, encode_ack(NUMBER, CRL_WINDOW + 1)), 1.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL


# --- the receiver ---------------------------------------------------------------------------


def piece(crl: bytes, offset: int, size: int = CRL_PIECE, *, number: int = NUMBER) -> bytes:
    return frame(Frame.CRL_PART, encode_part(number, len(crl), offset, crl[offset : offset + size]))


def acks(link: MeshLink) -> list[tuple[int, int]]:
    out = frames_in(link.data_to_send())
    assert all(k == Frame.CRL_ACK for k, _ in out), out
    return [decode_ack(b) for _, b in out]


def test_each_piece_is_acknowledged_and_the_crl_delivered_once_whole(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes
) -> None:
    link = lone(pki, nodes[0])
    up(link)
    events: list[Event] = []
    for offset in range(0, len(crl100k), CRL_PIECE):
        events += link.receive_data(piece(crl100k, offset), 1.0)
        assert acks(link) == [(NUMBER, min(offset + CRL_PIECE, len(crl100k)))]
    assert events == [CrlFrame(crl100k)]
    assert link.crl.receiving == 0 and link.crl.deadline is None


def test_a_crl_the_receiver_holds_is_declined_unread(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes
) -> None:
    link = lone(pki, nodes[0], held=NUMBER)
    up(link)
    assert link.receive_data(piece(crl100k, 0), 1.0) == []
    assert acks(link) == [(NUMBER, len(crl100k))]  # "I have it all": the sender stops
    assert link.crl.receiving == 0
    # Pieces already on their way are dropped, not an error.
    assert link.receive_data(piece(crl100k, CRL_PIECE), 1.0) == []
    assert link.data_to_send() == b"" and link.established


def test_a_crl_not_whole_in_time_is_dropped_and_declined_and_the_link_kept(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes
) -> None:
    link = lone(pki, nodes[0], crl_timeout=20.0, hold_time=0, allow_zero_hold=True)
    up(link, hold_time=0)
    link.receive_data(piece(crl100k, 0), 100.0)
    acks(link)
    assert link.crl.receiving == CRL_PIECE
    assert link.get_timer() == 120.0  # the reassembly's deadline
    assert link.handle_timer(119.9) == [] and link.crl.receiving == CRL_PIECE
    assert link.handle_timer(120.0) == []
    assert link.crl.receiving == 0 and link.get_timer() is None  # the memory is freed
    assert acks(link) == [(NUMBER, len(crl100k))]
    assert link.receive_data(piece(crl100k, CRL_PIECE), 121.0) == []  # late: dropped
    assert link.established
    assert DEFAULT_CRL_TIMEOUT == 120.0


def test_one_reassembly_per_link_a_newer_crl_replaces_an_unfinished_one(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes
) -> None:
    link = lone(pki, nodes[0])
    up(link)
    link.receive_data(piece(crl100k, 0), 1.0)
    newer = crl100k[:5000]  # the bytes do not matter until the whole is checked
    link.receive_data(piece(newer, 0, 1000, number=NUMBER + 1), 1.0)
    assert link.crl.receiving == 1000  # the first one's buffer is gone
    assert acks(link) == [(NUMBER, CRL_PIECE), (NUMBER + 1, 1000)]
    # The replaced CRL cannot be continued.
    (closed,) = link.receive_data(piece(crl100k, CRL_PIECE), 1.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL


def _bad_pieces(crl: bytes) -> dict[str, bytes]:
    total = len(crl)
    return {
        "a gap": piece(crl, 2 * CRL_PIECE),
        "a repeat": piece(crl, 0),
        "another total": frame(
            Frame.CRL_PART, encode_part(NUMBER, total + 1, CRL_PIECE, crl[CRL_PIECE:][:100])
        ),
        "past the end": frame(
            Frame.CRL_PART, encode_part(NUMBER, total, total - 10, crl[-10:] + b"x")
        ),
        "empty": frame(Frame.CRL_PART, encode_part(NUMBER, total, CRL_PIECE, b"")),
        "over MAX_CRL": frame(Frame.CRL_PART, encode_part(NUMBER + 1, MAX_CRL + 1, 0, b"x")),
        "no number": frame(Frame.CRL_PART, b"\x00" + bytes(8) + b"x"),
        "a 21-byte number": frame(Frame.CRL_PART, b"\x15" + bytes(21) + bytes(8) + b"x"),
        "a short header": frame(Frame.CRL_PART, b"\x01\x05\x00\x00"),
        "a bad ack": frame(Frame.CRL_ACK, b"\x01\x05\x00"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "a gap",
        "a repeat",
        "another total",
        "past the end",
        "empty",
        "over MAX_CRL",
        "no number",
        "a 21-byte number",
        "a short header",
        "a bad ack",
    ],
)
def test_a_bad_piece_after_a_good_one_is_a_protocol_error(
    pki: MeshPki, nodes: tuple[Node, Node], crl100k: bytes, case: str
) -> None:
    link = lone(pki, nodes[0])
    up(link)
    assert link.receive_data(piece(crl100k, 0), 1.0) == []
    assert acks(link) == [(NUMBER, CRL_PIECE)]
    (closed,) = link.receive_data(_bad_pieces(crl100k)[case], 1.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL
    assert close_code_sent(link.data_to_send()) == CloseCode.PROTOCOL


# --- the trust view -------------------------------------------------------------------------


def test_the_newest_crl_replaces_the_revoked_set(pki: MeshPki) -> None:
    """Serials of expired certificates leave the CA's CRL; they leave the node's set too,
    which then stays as small as the CRL."""
    key, issuer = pki.issuing_key(), pki.ca.issuing_cert.subject
    trust = pki.trust()
    one = trust.apply_crl(signed_crl(key, issuer, [11, 12, 13], number=NUMBER))
    assert one is not None and one.revoked == {11, 12, 13}
    two = trust.apply_crl(signed_crl(key, issuer, [12, 13, 14], number=NUMBER + 1))
    assert two is not None and two.revoked == {14}  # only what it adds
    assert trust.revoked == {12, 13, 14}
    assert not trust.is_revoked(11)


def test_a_crl_over_the_size_limit_is_refused(
    pki: MeshPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    der = signed_crl(pki.issuing_key(), pki.ca.issuing_cert.subject, range(1, 100), number=NUMBER)
    monkeypatch.setattr(trust_module, "MAX_CRL", len(der) - 1)
    trust = pki.trust()
    with pytest.raises(CrlRejected, match="over the limit"):
        trust.apply_crl(der)
    assert trust.crl_number == -1 and not trust.revoked
