"""The bundle agent's routing and custody, on a fake codec and a clock that stands still:
direct delivery, store until contact, spray-and-wait, broadcast once everywhere,
duplicates, refusals, expiry and revocation."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from trustmesh.bundle.errors import FragmentError
from trustmesh.bundle.store import BundleStore
from trustmesh.errors import ProtocolError
from trustmesh.mesh.dtn import (
    MAX_FRAGMENTS,
    REOFFER_INTERVAL_MS,
    WANT_TIMEOUT_MS,
    Admitted,
    BundleAction,
    BundleAgent,
    BundleDelivered,
    BundleForwarded,
    DuplicateBundleError,
    SendBundle,
    SendBundleAck,
    SendBundleOffer,
    SendBundleWant,
)

NOW = 1_000_000


class FakeCodec:
    """A bundle is the JSON of its Admitted fields; ``bad`` ones are refused."""

    def admit(self, data: bytes, now_ms: int) -> Admitted:
        if data.startswith(b"bad"):
            raise ProtocolError("a bad signature")
        fields = json.loads(data)
        fields["data"] = data
        return Admitted(**fields)

    def reassemble(self, fragments: list[bytes], now_ms: int) -> Admitted | None:
        parts = [json.loads(f) for f in fragments]
        if len(parts) < 2:
            return None
        whole = dict(parts[0], bundle_id=parts[0]["whole_id"], is_fragment=False)
        return Admitted(**{**whole, "data": b"whole"})


def make(
    source: str,
    destination: str | None,
    seq: int = 0,
    *,
    expires_ms: int = NOW + 60_000,
    signer: str = "01",
    offset: int | None = None,
) -> Admitted:
    whole = f"{source}:{NOW}:{seq}"
    fields = {
        "bundle_id": whole if offset is None else f"{whole}:{offset}",
        "whole_id": whole,
        "source": source,
        "signer": signer,
        "destination": f"dtn://{destination}/inbox" if destination else "dtn://~mesh/inbox",
        "destination_node": destination,
        "service": "inbox",
        "created_ms": NOW,
        "expires_ms": expires_ms,
        "is_fragment": offset is not None,
        "data": b"",
    }
    encoded = json.dumps({k: v for k, v in fields.items() if k != "data"}).encode()
    return Admitted(**{**fields, "data": encoded})  # type: ignore[arg-type]


class Net:
    """Agents named by node_id; links are the peer's name; frames are delivered at once."""

    def __init__(
        self,
        tmp_path: Path,
        *names: str,
        copies: int = 8,
        revoked: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.agents = {
            name: BundleAgent[str](
                name,
                BundleStore(tmp_path / f"{name}.db"),
                FakeCodec(),
                copies=copies,
                is_revoked=lambda serial: serial in revoked,
            )
            for name in names
        }
        self.delivered: dict[str, list[str]] = {name: [] for name in names}
        self.frames = 0

    def link(self, a: str, b: str) -> None:
        offers_a = self.agents[a].link_up(b, b, NOW)
        offers_b = self.agents[b].link_up(a, a, NOW)
        self.run(a, offers_a)
        self.run(b, offers_b)

    def unlink(self, a: str, b: str) -> None:
        self.agents[a].link_down(b)
        self.agents[b].link_down(a)

    def run(self, at: str, actions: list[BundleAction[str]]) -> None:
        """Carry out ``at``'s actions: each frame goes to its peer, whose answers run too."""
        for action in actions:
            if isinstance(action, BundleDelivered):
                self.delivered[at].append(action.bundle.bundle_id)
                continue
            if isinstance(action, BundleForwarded):
                continue
            peer = self.agents[action.link]
            if action.link not in self.agents or at not in peer.links:
                continue
            self.frames += 1
            match action:
                case SendBundleOffer(_, ids):
                    answers = peer.on_offer(at, ids, NOW)
                case SendBundleWant(_, want, have):
                    answers = peer.on_want(at, want, have, NOW)
                case SendBundle(_, copies, data):
                    answers = peer.on_bundle(at, copies, data, NOW)
                case SendBundleAck(_, ids, refused):
                    answers = peer.on_ack(at, ids, refused, NOW)
            self.run(action.link, answers)

    def submit(self, at: str, bundle: Admitted) -> None:
        self.run(at, self.agents[at].submit([bundle], NOW))

    def held(self, at: str) -> list[tuple[str, int]]:
        return [(b.bundle_id, b.copies) for b in self.agents[at].store.items("forwarding")]


def test_a_bundle_goes_straight_to_a_linked_destination_which_takes_custody(
    tmp_path: Path,
) -> None:
    net = Net(tmp_path, "a", "b")
    net.link("a", "b")
    net.submit("a", make("a", "b"))
    assert net.delivered["b"] == ["a:1000000:0"]
    assert net.held("a") == []  # b acknowledged: a let go
    assert net.agents["b"].store.count("inbox") == 1


def test_a_bundle_waits_for_its_destination_and_goes_when_it_links(tmp_path: Path) -> None:
    net = Net(tmp_path, "a", "b", copies=1)
    net.submit("a", make("a", "b"))
    assert net.held("a") == [("a:1000000:0", 1)]
    net.link("a", "b")
    assert net.delivered["b"] == ["a:1000000:0"] and net.held("a") == []


def test_spray_and_wait_hands_half_the_copies_to_a_relay_which_then_waits(
    tmp_path: Path,
) -> None:
    net = Net(tmp_path, "a", "r", "s", "d", copies=8)
    net.submit("a", make("a", "d"))
    net.link("a", "r")
    assert net.held("a") == [("a:1000000:0", 4)] and net.held("r") == [("a:1000000:0", 4)]
    net.link("r", "s")  # r sprays on: 2 to s
    assert net.held("r") == [("a:1000000:0", 2)] and net.held("s") == [("a:1000000:0", 2)]
    net.unlink("a", "r")
    net.link("s", "d")  # the destination: all of s's copies, and s lets go
    assert net.delivered["d"] == ["a:1000000:0"] and net.held("s") == []
    net.link("a", "d")  # a meets it too: d holds it, a lets go without sending it again
    assert net.held("a") == [] and net.delivered["d"] == ["a:1000000:0"]


def test_a_relay_with_one_copy_only_waits_for_the_destination(tmp_path: Path) -> None:
    net = Net(tmp_path, "a", "r", "s", copies=2)
    net.submit("a", make("a", "d"))
    net.link("a", "r")
    assert net.held("r") == [("a:1000000:0", 1)]
    net.link("r", "s")
    assert net.held("s") == []  # r has no copy to spare


def test_a_broadcast_reaches_every_node_once_and_is_held_for_late_comers(
    tmp_path: Path,
) -> None:
    net = Net(tmp_path, "a", "b", "c", "d")
    net.link("a", "b")
    net.link("b", "c")
    net.link("c", "a")  # a cycle: c hears it from both
    net.submit("a", make("a", None))
    assert net.delivered == {"a": [], "b": ["a:1000000:0"], "c": ["a:1000000:0"], "d": []}
    net.link("d", "b")  # a node that was away gets it on contact
    assert net.delivered["d"] == ["a:1000000:0"]
    assert all(net.held(n) == [("a:1000000:0", 1)] for n in "bcd")  # until it expires
    net.link("d", "c")
    assert net.delivered["d"] == ["a:1000000:0"]  # offered again: d holds it, says so


def test_a_duplicate_is_acknowledged_but_delivered_once_even_after_the_app_took_it(
    tmp_path: Path,
) -> None:
    net = Net(tmp_path, "a", "b")
    net.link("a", "b")
    bundle = make("a", "b")
    actions = net.agents["b"].on_bundle("a", 1, bundle.data, NOW)
    assert isinstance(actions[0], SendBundleAck) and actions[0].ids == (bundle.bundle_id,)
    assert net.agents["b"].acknowledge(bundle.bundle_id)
    again = net.agents["b"].on_bundle("a", 1, bundle.data, NOW)
    assert [type(a) for a in again] == [SendBundleAck]  # custody answered, nothing delivered
    assert net.agents["b"].stats.duplicates == 1


def test_a_bundle_that_does_not_check_out_is_refused_and_kept_by_its_sender(
    tmp_path: Path,
) -> None:
    net = Net(tmp_path, "a", "b")
    net.link("a", "b")
    (ack,) = net.agents["b"].on_bundle("a", 1, b"bad bundle", NOW)
    assert isinstance(ack, SendBundleAck) and ack.ids == () and ack.refused
    assert net.agents["b"].store.count("inbox") == 0


def test_a_full_store_refuses_custody_and_the_sender_keeps_the_bundle(tmp_path: Path) -> None:
    net = Net(tmp_path, "a", "b")
    net.agents["b"].store.max_bytes = 10
    net.submit("a", make("a", "b"))
    net.link("a", "b")
    assert net.held("a") == [("a:1000000:0", 8)]  # refused: still a's
    assert net.agents["b"].stats.refused == {"StoreFullError": 1}


def test_expired_bundles_are_purged_and_never_sent(tmp_path: Path) -> None:
    net = Net(tmp_path, "a", "b")
    net.submit("a", make("a", "b", expires_ms=NOW + 5))
    assert net.agents["a"].handle_timer(NOW + 5) == []
    assert net.held("a") == []
    net.link("a", "b")
    assert net.delivered["b"] == []


def test_a_bundle_whose_signer_is_revoked_is_dropped_before_it_goes(tmp_path: Path) -> None:
    revoked: set[str] = set()
    net = Net(tmp_path, "a", "b", revoked=revoked)
    net.submit("a", make("a", "b", signer="0a"))
    revoked.add("0a")
    net.link("a", "b")
    assert net.delivered["b"] == [] and net.held("a") == []
    net.submit("a", make("a", "b", 1, signer="b"))
    assert net.agents["a"].revoked([0x0B]) == 0  # delivered already: nothing held
    net.unlink("a", "b")
    net.submit("a", make("a", "b", 2, signer="b"))
    assert net.agents["a"].revoked([0x0B]) == 1 and net.held("a") == []


def test_fragments_are_delivered_once_whole(tmp_path: Path) -> None:
    net = Net(tmp_path, "a", "b")
    net.link("a", "b")
    net.submit("a", make("a", "b", offset=0))
    assert net.delivered["b"] == [] and net.agents["b"].store.count("fragment") == 1
    net.submit("a", make("a", "b", offset=100))
    assert net.delivered["b"] == ["a:1000000:0"]
    assert net.agents["b"].store.count("fragment") == 0
    assert net.agents["b"].store.get("a:1000000:0", "inbox") is not None


@pytest.mark.parametrize("copies", [0, 256])
def test_copies_are_bounded(tmp_path: Path, copies: int) -> None:
    with pytest.raises(ValueError, match="copies"):
        BundleAgent[str]("a", BundleStore(tmp_path / "a.db"), FakeCodec(), copies=copies)


def test_nothing_is_offered_twice_on_one_link(tmp_path: Path) -> None:
    net = Net(tmp_path, "a", "b")
    net.agents["b"].store.max_bytes = 10
    net.submit("a", make("a", "b"))
    net.link("a", "b")
    frames = net.frames
    net.run("a", net.agents["a"].link_up("b", "b", NOW)[:0])
    assert net.frames == frames
    assert asdict(net.agents["a"].stats)["submitted"] == 1


def test_copies_on_their_way_are_not_handed_twice(tmp_path: Path) -> None:
    """Relays asking at once share the copies not yet handed over: 8 never become 16."""
    net = Net(tmp_path, "a", copies=8)
    agent = net.agents["a"]
    agent.submit([make("a", "d")], NOW)
    for relay in ("r1", "r2", "r3", "r4"):
        agent.link_up(relay, relay, NOW)
    handed = []
    for relay in ("r1", "r2", "r3", "r4"):
        for action in agent.on_want(relay, ["a:1000000:0"], [], NOW):
            assert isinstance(action, SendBundle)
            handed.append(action.copies)
    assert handed == [4, 2, 1]  # r4 gets none: a keeps its last copy
    agent.link_down("r2")  # its two copies never arrived: they are a's again
    agent.on_ack("r1", ["a:1000000:0"], [], NOW)
    assert net.held("a") == [("a:1000000:0", 4)]
    (again,) = agent.on_want("r4", ["a:1000000:0"], [], NOW)
    assert isinstance(again, SendBundle) and again.copies == 1  # (4 - 1 in flight) // 2


def test_a_relay_that_was_the_only_link_carries_the_bundle_across(tmp_path: Path) -> None:
    """a and d never meet; r is the only link of each, one after the other."""
    net = Net(tmp_path, "a", "r", "d")
    net.link("a", "r")
    net.submit("a", make("a", "d"))
    net.unlink("a", "r")
    net.link("r", "d")
    assert net.delivered["d"] == ["a:1000000:0"]
    assert net.held("r") == []  # r handed all its copies to the destination


def test_a_peer_gets_only_what_it_was_offered_and_hands_no_more_copies_than_ours(
    tmp_path: Path,
) -> None:
    net = Net(tmp_path, "a", "b", copies=4)
    agent = net.agents["a"]
    agent.submit([make("a", "d")], NOW)
    agent.links["b"] = "b"  # linked, nothing offered yet
    assert agent.on_want("b", ["a:1000000:0"], [], NOW) == []
    bundle = make("c", "d")
    agent.on_bundle("b", 200, bundle.data, NOW)
    held = agent.store.get(bundle.bundle_id, "forwarding")
    assert held is not None and held.copies == 4


class NoReassembly(FakeCodec):
    def reassemble(self, fragments: list[bytes], now_ms: int) -> Admitted | None:
        return None


class BadFragments(FakeCodec):
    def reassemble(self, fragments: list[bytes], now_ms: int) -> Admitted | None:
        if len(fragments) > 1:
            raise FragmentError("fragments disagree on the ADU's bytes")
        return None


def test_a_bundle_holds_at_most_max_fragments_here(tmp_path: Path) -> None:
    agent = BundleAgent[str]("b", BundleStore(tmp_path / "b.db"), NoReassembly())
    agent.link_up("a", "a", NOW)
    for offset in range(MAX_FRAGMENTS):
        (ack,) = agent.on_bundle("a", 1, make("a", "b", offset=offset).data, NOW)
        assert isinstance(ack, SendBundleAck) and ack.ids
    (ack,) = agent.on_bundle("a", 1, make("a", "b", offset=MAX_FRAGMENTS).data, NOW)
    assert isinstance(ack, SendBundleAck) and not ack.ids and ack.refused


def test_fragments_that_disagree_drop_their_bundle_and_keep_the_link(tmp_path: Path) -> None:
    agent = BundleAgent[str]("b", BundleStore(tmp_path / "b.db"), BadFragments())
    agent.link_up("a", "a", NOW)
    agent.on_bundle("a", 1, make("a", "b", offset=0).data, NOW)
    (ack,) = agent.on_bundle("a", 1, make("a", "b", offset=5).data, NOW)  # no exception
    assert isinstance(ack, SendBundleAck) and ack.ids  # the sender may let go
    assert agent.store.count("fragment") == 0 and agent.store.was_delivered("a:1000000:0")
    agent.on_bundle("a", 1, make("a", "b", offset=9).data, NOW)
    assert agent.store.count("fragment") == 0  # the rest of it is dropped on arrival


def test_a_broadcast_over_the_quota_is_neither_kept_nor_delivered(tmp_path: Path) -> None:
    agent = BundleAgent[str](
        "b", BundleStore(tmp_path / "b.db"), FakeCodec(), mesh_services=("inbox",)
    )
    agent.link_up("a", "a", NOW)
    agent.store.max_bytes = 10
    bundle = make("a", None)
    (ack,) = agent.on_bundle("a", 1, bundle.data, NOW)
    assert (
        isinstance(ack, SendBundleAck) and ack.refused and not agent.store.holds(bundle.bundle_id)
    )
    agent.store.max_bytes = 1 << 20
    actions = agent.on_bundle("a", 1, bundle.data, NOW)
    assert any(isinstance(a, BundleDelivered) for a in actions)  # the retry is delivered


def test_a_mesh_service_bundle_to_one_node_goes_to_its_inbox_under_quota(tmp_path: Path) -> None:
    agent = BundleAgent[str](
        "b", BundleStore(tmp_path / "b.db"), FakeCodec(), mesh_services=("inbox",)
    )
    agent.link_up("a", "a", NOW)
    agent.on_bundle("a", 1, make("a", "b").data, NOW)
    assert agent.store.count("inbox") == 1


def test_a_refused_bundle_is_offered_again_later_on_the_same_link(tmp_path: Path) -> None:
    net = Net(tmp_path, "a", "b")
    net.agents["b"].store.max_bytes = 10
    net.submit("a", make("a", "b"))
    net.link("a", "b")
    assert net.delivered["b"] == []
    net.agents["b"].store.max_bytes = 1 << 20
    net.run("a", net.agents["a"].handle_timer(NOW + REOFFER_INTERVAL_MS))
    assert net.delivered["b"] == ["a:1000000:0"] and net.held("a") == []


def test_a_link_that_replaces_another_to_the_same_peer_starts_afresh(tmp_path: Path) -> None:
    agent = BundleAgent[str]("a", BundleStore(tmp_path / "a.db"), FakeCodec())
    agent.submit([make("a", "d")], NOW)
    agent.link_up("r", "r", NOW)
    (_first,) = agent.on_want("r", ["a:1000000:0"], [], NOW)
    agent.link_up("r", "r-2", NOW)  # the collision's winner, without a link_down first
    (again,) = agent.on_want("r", ["a:1000000:0"], [], NOW)
    assert isinstance(again, SendBundle) and again.link == "r-2" and again.copies == 4


def test_a_bundle_made_here_with_an_id_already_held_is_refused(tmp_path: Path) -> None:
    agent = BundleAgent[str]("a", BundleStore(tmp_path / "a.db"), FakeCodec())
    agent.submit([make("a", "d")], NOW)
    with pytest.raises(DuplicateBundleError):
        agent.submit([make("a", "d")], NOW)


def test_a_bundle_on_its_way_from_one_peer_is_not_asked_of_another(tmp_path: Path) -> None:
    agent = BundleAgent[str]("d", BundleStore(tmp_path / "d.db"), FakeCodec())
    for peer in ("p", "q"):
        agent.link_up(peer, peer, NOW)
    bundle_id = "a:1000000:0"
    (first,) = agent.on_offer("p", [bundle_id], NOW)
    (second,) = agent.on_offer("q", [bundle_id], NOW)
    assert isinstance(first, SendBundleWant) and first.want == (bundle_id,)
    assert isinstance(second, SendBundleWant) and second.want == () and second.have == ()
    (later,) = agent.on_offer("q", [bundle_id], NOW + WANT_TIMEOUT_MS)  # p never sent it
    assert isinstance(later, SendBundleWant) and later.want == (bundle_id,)
    agent.link_down("q")
    (after,) = agent.on_offer("p", [bundle_id], NOW + WANT_TIMEOUT_MS)  # q is gone
    assert isinstance(after, SendBundleWant) and after.want == (bundle_id,)
