"""Signed peer records (mesh/peers.py): only a record signed by a valid, unrevoked
certificate of its own node_id, unexpired and newer than the one held, is kept and
dialled; the book is bounded and drops records by age and by revocation."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshtools import T0, T0_MS, Binding, MeshPki, Node

from trustmesh.errors import OversizeError
from trustmesh.mesh.errors import (
    BadSignature,
    ExpiredMessage,
    MalformedMessage,
    RevokedOrigin,
    UntrustedOrigin,
)
from trustmesh.mesh.link import (
    ALPN,
    MAX_CONTROL,
    MAX_FRAME,
    CloseCode,
    Frame,
    LinkClosed,
    LinkConfig,
    LinkUp,
    MeshLink,
    PeerAddress,
    PeersFrame,
)
from trustmesh.mesh.peers import (
    DEFAULT_RECORD_TTL_MS,
    MAX_RECORD_TTL_MS,
    PeerBook,
    PeerRecord,
    RecordRejected,
    decode_record,
    own_record,
    own_record_due,
    record_from_json,
    records_from_json,
    sign_record,
)
from trustmesh.tls import TlsEstablished
from trustmesh.wire.frames import encode_frame

MINUTE = 60_000
TRAP = "127.0.0.9:9"  # an address a hostile peer would like us to dial


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path / "ca")
    yield mesh
    mesh.close()


@pytest.fixture
def nodes(pki: MeshPki) -> tuple[Node, Node]:
    return pki.node("node-x"), pki.node("node-y")


def record(
    node: Node,
    addresses: tuple[str, ...] = ("127.0.0.2:7400",),
    *,
    seq: int = T0_MS,
    ttl: int = DEFAULT_RECORD_TTL_MS,
    node_id: str | None = None,
) -> PeerRecord:
    """``node``'s record, signed with its key (``node_id`` may claim another node)."""
    return sign_record(
        node.key,
        node_id or node.node_id,
        addresses,
        seq=seq,
        expires=seq + ttl,
        chain=node.chain_der,
    )


def book_for(pki: MeshPki, **kwargs: Any) -> PeerBook:
    return PeerBook(pki.trust(), "me", **kwargs)


def dialable(book: PeerBook, now: int = T0_MS) -> list[tuple[str, str]]:
    return list(book.dialable(now))


# --- what is kept and dialled ---------------------------------------------------------------


def test_a_valid_record_is_kept_and_dialled(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    book = book_for(pki)
    good = record(nodes[0], ("127.0.0.2:7400", "[::1]:7400"))
    learned = book.receive([good], T0_MS)
    assert learned.accepted == [good] and not learned.rejected
    assert book.get("node-x") == good
    assert dialable(book) == [("node-x", "127.0.0.2:7400")]
    # The next address when the first cannot be used (cooldown, dialling already).
    assert list(book.dialable(T0_MS, lambda a: a != "127.0.0.2:7400")) == [("node-x", "[::1]:7400")]
    assert list(book.dialable(T0_MS, lambda a: False)) == []


def test_unsigned_peers_entries_never_reach_the_book(pki: MeshPki) -> None:
    """A version-1 PEERS frame (host:port hints only) gives no record to keep."""
    frame = PeersFrame((PeerAddress("node-x", TRAP),))
    book = book_for(pki)
    assert book.receive(records_from_json(frame.records), T0_MS).accepted == []
    assert dialable(book) == []


def test_a_record_without_a_signature_is_malformed(nodes: tuple[Node, Node]) -> None:
    data = record(nodes[0]).to_json()
    del data["signature"]
    with pytest.raises(MalformedMessage):
        record_from_json(data)


def test_a_forged_record_is_refused(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    book = book_for(pki)
    forged = dataclasses.replace(record(nodes[0]), addresses=(TRAP,))
    with pytest.raises(BadSignature):
        book.add(forged, T0_MS)
    learned = book.receive([forged], T0_MS)
    assert learned.rejected == {"bad-signature": 1}
    assert dialable(book) == [] and "node-x" not in book


def test_a_record_for_one_node_signed_by_another_is_refused(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    x, y = nodes
    book = book_for(pki)
    # Signed by y, with y's chain, for x: the signature is good, the certificate is not x's.
    with pytest.raises(UntrustedOrigin, match="node-y"):
        book.add(record(y, (TRAP,), node_id="node-x"), T0_MS)
    # x's chain with y's signature does not verify either.
    stolen = dataclasses.replace(record(y, (TRAP,), node_id="node-x"), chain=x.chain_der)
    with pytest.raises(BadSignature):
        book.add(stolen, T0_MS)
    assert dialable(book) == []


def test_a_record_from_another_ca_is_refused(pki: MeshPki, tmp_path: Path) -> None:
    other = MeshPki(tmp_path / "other", name="another CA")
    try:
        stranger = other.node("node-x")
        with pytest.raises(UntrustedOrigin):
            book_for(pki).add(record(stranger, (TRAP,)), T0_MS)
    finally:
        other.close()


def test_an_expired_record_is_refused(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    book = book_for(pki)
    old = record(nodes[0], (TRAP,), seq=T0_MS - 2 * MINUTE, ttl=MINUTE)
    with pytest.raises(ExpiredMessage):
        book.add(old, T0_MS)
    assert book.receive([old], T0_MS).rejected == {"expired": 1}
    assert dialable(book) == []


@pytest.mark.parametrize(
    ("seq", "ttl"),
    [
        (T0_MS, MAX_RECORD_TTL_MS + 1),  # a lifetime over the maximum
        (T0_MS + 2 * MINUTE, MINUTE),  # signed in the future, beyond the clock skew
    ],
)
def test_a_record_out_of_time_bounds_is_refused(
    pki: MeshPki, nodes: tuple[Node, Node], seq: int, ttl: int
) -> None:
    with pytest.raises(ExpiredMessage):
        book_for(pki).add(record(nodes[0], seq=seq, ttl=ttl), T0_MS)


def test_a_record_is_dropped_once_it_expires(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    book = book_for(pki)
    book.add(record(nodes[0], ttl=MINUTE), T0_MS)
    later = T0_MS + MINUTE
    assert dialable(book, later - 1) == [("node-x", "127.0.0.2:7400")]
    assert dialable(book, later) == []  # never dialled past its expiry, pruned or not
    assert book.prune(later) == ["node-x"]
    assert len(book) == 0


def test_a_revoked_nodes_record_is_refused_and_evicted(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    x, y = nodes
    trust = pki.trust()
    book = PeerBook(trust, "me")
    book.receive([record(x), record(y)], T0_MS)
    pki.revoke(x)
    trust.apply_crl(pki.crl())
    assert dialable(book) == [("node-y", "127.0.0.2:7400")]  # at once, before any prune
    assert book.prune(T0_MS) == ["node-x"]
    assert "node-x" not in book and "node-y" in book
    with pytest.raises(RevokedOrigin):  # and a fresher record of it is refused
        book.add(record(x, seq=T0_MS + 1), T0_MS + 1)


def test_a_record_is_dropped_when_its_certificate_expires(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    x = nodes[0]
    not_after = int(x.cert.not_valid_after_utc.timestamp() * 1000)
    book = book_for(pki)
    book.add(record(x, seq=not_after - MINUTE, ttl=MAX_RECORD_TTL_MS), not_after - MINUTE)
    assert dialable(book, not_after - 1) != []
    assert dialable(book, not_after) == []
    assert book.prune(not_after) == ["node-x"]


def test_only_a_newer_seq_replaces_a_record(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    x = nodes[0]
    book = book_for(pki)
    first = record(x, ("127.0.0.2:7400",), seq=T0_MS)
    moved = record(x, ("127.0.0.3:7400",), seq=T0_MS + 1)
    assert book.add(first, T0_MS)
    assert book.add(moved, T0_MS + 1)
    learned = book.receive([first, moved], T0_MS + 2)  # a replay of either is stale
    assert learned.stale == 2 and learned.accepted == [] and not learned.rejected
    assert book.get("node-x") == moved
    # A stale record is not even checked: a forgery with an old seq costs nothing.
    assert book.receive([dataclasses.replace(first, signature=b"x")], T0_MS).stale == 1


def test_our_own_record_is_not_kept(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    book = PeerBook(pki.trust(), "node-x")
    assert book.receive([record(nodes[0])], T0_MS).stale == 1
    assert len(book) == 0


def test_the_book_is_bounded(pki: MeshPki) -> None:
    book = book_for(pki, capacity=3)
    many = [pki.node(f"node-{i}") for i in range(6)]
    # Each lives a minute longer than the one before: the soonest to expire gives way.
    records = [record(n, ttl=(i + 1) * MINUTE) for i, n in enumerate(many)]
    learned = book.receive(records, T0_MS)
    assert len(learned.accepted) == 6 and len(book) == 3
    assert sorted(r.node_id for r in book.records()) == ["node-3", "node-4", "node-5"]
    # A record that would expire before all those held is not kept.
    late = pki.node("node-late")
    learned = book.receive([record(late, ttl=MINUTE)], T0_MS)
    assert learned.rejected == {RecordRejected.code: 1} and "node-late" not in book
    # Room made by expiry is used before anything valid is evicted.
    assert book.add(record(late, seq=T0_MS + 4 * MINUTE, ttl=MINUTE), T0_MS + 4 * MINUTE)
    assert sorted(r.node_id for r in book.records()) == ["node-4", "node-5", "node-late"]
    with pytest.raises(ValueError, match="room"):
        book_for(pki, capacity=0)


def test_records_are_checked_again_when_loaded(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    x, y = nodes
    trust = pki.trust()
    kept = [record(x).encode(), record(y).encode(), b"not json"]
    pki.revoke(x)
    trust.apply_crl(pki.crl())
    book = PeerBook(trust, "me")
    assert book.load(kept, T0_MS) == ["node-x"]  # revoked while we were down
    assert dialable(book) == [("node-y", "127.0.0.2:7400")]


def test_valid_gives_the_held_valid_records_in_order(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    x, y = nodes
    book = book_for(pki)
    book.receive([record(x), record(y, ttl=MINUTE)], T0_MS)
    assert [r.node_id for r in book.valid(["node-y", "nobody", "node-x"], T0_MS)] == [
        "node-y",
        "node-x",
    ]
    assert [r.node_id for r in book.valid(["node-y", "node-x"], T0_MS + MINUTE)] == ["node-x"]


# --- our own record -----------------------------------------------------------------------


def test_own_record_expires_with_the_certificate_and_its_seq_only_grows(
    pki: MeshPki, nodes: tuple[Node, Node]
) -> None:
    x = nodes[0]
    not_after = int(x.cert.not_valid_after_utc.timestamp() * 1000)

    def make(previous: PeerRecord | None, now: int) -> PeerRecord | None:
        return own_record(
            x.key,
            x.node_id,
            ["127.0.0.2:7400"],
            previous=previous,
            now_ms=now,
            not_after_ms=not_after,
            chain=x.chain_der,
        )

    first = make(None, T0_MS)
    assert first is not None
    assert (first.seq, first.expires) == (T0_MS, T0_MS + DEFAULT_RECORD_TTL_MS)
    assert book_for(pki).add(first, T0_MS)  # what we sign, peers keep
    assert not own_record_due(first, T0_MS + DEFAULT_RECORD_TTL_MS // 2 - 1)
    assert own_record_due(first, T0_MS + DEFAULT_RECORD_TTL_MS // 2)
    assert own_record_due(None, T0_MS)
    back = make(first, T0_MS - MINUTE)  # the clock went back
    assert back is not None and back.seq == first.seq + 1
    near_end = make(first, not_after - MINUTE)
    assert near_end is not None and near_end.expires == not_after
    assert make(first, not_after) is None


# --- the record on the wire ----------------------------------------------------------------


def test_a_record_round_trips(nodes: tuple[Node, Node]) -> None:
    good = record(nodes[0], ("127.0.0.2:7400", "[::1]:7400"))
    assert decode_record(good.encode()) == good
    assert list(json.loads(good.encode())) == [
        "node_id",
        "addresses",
        "seq",
        "expires",
        "signature",
        "chain",
    ]
    assert good.signed_bytes().startswith(b"trustmesh-peer-record/1\n[")
    with pytest.raises(OversizeError):
        decode_record(b" " * (64 * 1024))


def _variants() -> list[tuple[str, Any]]:
    return [
        ("unknown field", {"extra": 1}),
        ("no addresses", {"addresses": []}),
        ("too many addresses", {"addresses": [f"127.0.0.1:{p}" for p in range(1, 6)]}),
        ("repeated address", {"addresses": ["127.0.0.1:1", "127.0.0.1:1"]}),
        ("bad address", {"addresses": ["127.0.0.1"]}),
        ("port 0", {"addresses": ["127.0.0.1:0"]}),
        ("bad node_id", {"node_id": "-x"}),
        ("boolean seq", {"seq": True}),
        ("negative expires", {"expires": -1}),
        ("float seq", {"seq": 1.5}),
        ("no chain", {"chain": []}),
        ("chain not base64", {"chain": ["%%%"]}),
        ("signature not base64", {"signature": "a"}),
        ("empty signature", {"signature": ""}),
        ("huge signature", {"signature": base64.b64encode(b"s" * 513).decode()}),
    ]


@pytest.mark.parametrize(("what", "change"), _variants(), ids=[v[0] for v in _variants()])
def test_a_malformed_record_is_refused(nodes: tuple[Node, Node], what: str, change: Any) -> None:
    data = record(nodes[0]).to_json()
    data.update(change)
    with pytest.raises(MalformedMessage):
        record_from_json(data)


def test_a_record_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(MalformedMessage):
        record_from_json(["node-x"])


def test_sign_record_refuses_what_peers_would_refuse(nodes: tuple[Node, Node]) -> None:
    x = nodes[0]
    with pytest.raises(MalformedMessage):
        sign_record(x.key, x.node_id, ["nowhere"], seq=1, expires=2, chain=x.chain_der)
    with pytest.raises(ValueError, match="expires after"):
        sign_record(x.key, x.node_id, ["127.0.0.1:1"], seq=2, expires=2, chain=x.chain_der)


# --- records in PEERS (mesh/link.py) ----------------------------------------------------------


def up_link(pki: MeshPki, me: str, peer: Node) -> MeshLink:
    """Our side of an established link to ``peer`` (its HELLO taken)."""
    trust = pki.trust()
    link = MeshLink(
        LinkConfig(me),
        initiator=False,
        authorize=lambda chain: trust.identity_of(chain, now=T0).node_id,
    )
    link.bind(Binding(TlsEstablished(peer_chain=peer.chain, alpn=ALPN, group=None, resumed=False)))
    assert link.start(0.0) == []
    link.data_to_send()
    hello = {"version": 1, "node_id": peer.node_id, "hold_time": 30}
    (up,) = link.receive_data(frame(Frame.HELLO, hello), 0.0)
    assert isinstance(up, LinkUp)
    return link


def frame(kind: int, body: dict[str, Any]) -> bytes:
    return encode_frame(bytes((kind,)) + json.dumps(body).encode(), MAX_FRAME)


def test_peers_carries_records_up_to_the_body_limit(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    x, y = nodes
    sender, receiver = up_link(pki, "node-x", y), up_link(pki, "node-y", x)
    one = record(x)
    hints = [PeerAddress("node-x", "127.0.0.2:7400")]
    sender.send_peers(hints, [one.encode()] * 64)
    data = sender.data_to_send()
    assert len(data) <= MAX_CONTROL + 4  # the body within the limit: length prefix, type
    (got,) = receiver.receive_data(data, 1.0)
    assert isinstance(got, PeersFrame) and got.peers == tuple(hints)
    records = records_from_json(got.records)
    assert 0 < len(records) < 64 and all(r == one for r in records)


def test_a_version_1_peers_frame_has_no_records(pki: MeshPki, nodes: tuple[Node, Node]) -> None:
    receiver = up_link(pki, "node-y", nodes[0])
    (got,) = receiver.receive_data(
        frame(Frame.PEERS, {"peers": [{"node_id": "node-z", "address": TRAP}]}), 1.0
    )
    assert got == PeersFrame((PeerAddress("node-z", TRAP),))
    assert got.records == ()


@pytest.mark.parametrize("records", [{}, [1], [{}] * 65])
def test_a_bad_records_member_is_a_protocol_error(
    pki: MeshPki, nodes: tuple[Node, Node], records: Any
) -> None:
    receiver = up_link(pki, "node-y", nodes[0])
    (closed,) = receiver.receive_data(frame(Frame.PEERS, {"peers": [], "records": records}), 1.0)
    assert isinstance(closed, LinkClosed) and closed.code == CloseCode.PROTOCOL
