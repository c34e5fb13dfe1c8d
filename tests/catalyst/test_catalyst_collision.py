"""Collision resolution and the peering policy, sans-IO: two nodes that dial each other at
once keep exactly the connection the higher BGP identifier initiated, on both sides."""

from __future__ import annotations

import hashlib
import hmac
import itertools
from pathlib import Path

import pytest

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.collision import CollisionRegistry
from trustmesh.catalyst.policy import CedarPolicy, PeeringRequest
from trustmesh.catalyst.session import (
    CatalystConfig,
    CatalystSession,
    NotificationEvent,
    SessionEstablished,
    State,
)
from trustmesh.sansio import Event
from trustmesh.tls import TlsEstablished


class FakeTls:
    established: TlsEstablished | None = None  # no certificate expiry

    def __init__(self, names: frozenset[str], secret: bytes) -> None:
        self.names = names
        self.secret = secret

    def peer_names(self) -> frozenset[str]:
        return self.names

    def exporter(self, label: bytes, context: bytes) -> bytes:
        return hmac.new(self.secret, label + b"|" + context, hashlib.sha256).digest()


class Node:
    """One node's config, registry and the sessions it evicted."""

    def __init__(self, identifier: str, asn: int, **config: object) -> None:
        self.config = CatalystConfig(my_asn=asn, bgp_identifier=identifier, **config)  # type: ignore[arg-type]
        self.evicted: list[CatalystSession] = []
        self.registry = CollisionRegistry(evict=self.evicted.append)

    def session(self, *, initiator: bool, peer: str, secret: bytes) -> CatalystSession:
        binding = FakeTls(frozenset({peer}), secret)
        return CatalystSession(
            self.config, initiator=initiator, binding=binding, registry=self.registry
        )


_secrets = itertools.count()


def connection(dialer: Node, listener: Node) -> tuple[CatalystSession, CatalystSession]:
    """One TLS connection from ``dialer`` to ``listener``: the session on each end."""
    secret = f"tls-session-{next(_secrets)}".encode()
    ours = dialer.session(initiator=True, peer=listener.config.bgp_identifier, secret=secret)
    theirs = listener.session(initiator=False, peer=dialer.config.bgp_identifier, secret=secret)
    ours.start(0.0)
    theirs.start(0.0)
    return ours, theirs


def deliver(sender: CatalystSession, receiver: CatalystSession) -> list[Event]:
    data = sender.data_to_send()
    return receiver.receive_data(data, 0.0) if data else []


def notes(events: list[Event]) -> list[tuple[int, int, str]]:
    return [(e.code, e.subcode, e.direction) for e in events if isinstance(e, NotificationEvent)]


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("node-a", "node-b"),
        ("10.0.0.9", "10.0.0.10"),  # IPv4: as 32-bit integers (bytewise, 9 would win)
        ("10.0.0.9", "node-a"),  # one IPv4, one name: bytewise
        ("2001:db8::10", "2001:db8::9"),  # IPv6 is not RFC 4271's case: bytewise
    ],
)
def test_simultaneous_dials_keep_the_higher_identifiers_connection(low: str, high: str) -> None:
    a, b = Node(low, 65001), Node(high, 65002)
    a_out, b_in = connection(a, b)  # a dialled b
    b_out, a_in = connection(b, a)  # b dialled a, at the same time
    # Both OPENs cross on both connections before either side sees a KEEPALIVE.
    deliver(a_out, b_in)
    deliver(b_in, a_out)
    events_b_out = deliver(a_in, b_out)
    events_a_in = deliver(b_out, a_in)
    # On both nodes the connection b (the higher identifier) dialled survives.
    assert notes(events_a_in) == []
    assert notes(events_b_out) == []
    assert a.evicted == [a_out]
    assert b.evicted == [b_in]
    assert a.registry.holder(b.config.bgp_identifier) is a_in
    assert b.registry.holder(a.config.bgp_identifier) is b_out


def test_evicted_session_sends_cease_collision_and_its_peer_sees_it() -> None:
    a, b = Node("node-a", 65001), Node("node-b", 65002)
    a_out, b_in = connection(a, b)
    deliver(a_out, b_in)
    deliver(b_in, a_out)
    b_out, a_in = connection(b, a)
    deliver(b_out, a_in)  # a claims node-b for a_in: a_out (a dialled, a is lower) loses
    assert a.evicted == [a_out]
    events = a_out.evict(0.0)
    assert notes(events) == [(m.CEASE, m.CEASE_COLLISION, "sent")]
    assert a_out.state is State.CLOSED
    assert notes(deliver(a_out, b_in)) == [(m.CEASE, m.CEASE_COLLISION, "received")]


def test_a_new_connection_losing_the_collision_is_refused_with_6_7() -> None:
    a, b = Node("node-a", 65001), Node("node-b", 65002)
    b_out, a_in = connection(b, a)  # the higher identifier dialled first: it wins
    deliver(b_out, a_in)
    deliver(a_in, b_out)
    deliver(b_out, a_in)
    deliver(a_in, b_out)
    assert b_out.state is State.ESTABLISHED
    a_out, b_in = connection(a, b)  # a dials too, late
    events = deliver(a_out, b_in)
    assert notes(events) == [(m.CEASE, m.CEASE_COLLISION, "sent")]
    assert b.registry.holder("node-a") is b_out
    # a reaches the same verdict on its own from b's OPEN, before b's NOTIFICATION.
    assert notes(deliver(b_in, a_out)) == [(m.CEASE, m.CEASE_COLLISION, "sent")]
    assert a.registry.holder("node-b") is a_in
    assert a_in.state is State.ESTABLISHED


def test_a_redial_in_the_same_direction_replaces_the_older_session() -> None:
    a, b = Node("node-a", 65001), Node("node-b", 65002)
    old_out, old_in = connection(a, b)
    deliver(old_out, old_in)
    new_out, new_in = connection(a, b)
    deliver(new_out, new_in)
    assert b.evicted == [old_in]
    assert b.registry.holder("node-a") is new_in


def test_a_closed_session_releases_its_claim() -> None:
    a, b = Node("node-a", 65001), Node("node-b", 65002)
    out, inbound = connection(a, b)
    deliver(out, inbound)
    assert len(b.registry) == 1
    inbound.close("bye", 0.0)
    assert len(b.registry) == 0
    assert b.registry.holder("node-a") is None


def test_peer_claiming_our_own_identifier_is_refused() -> None:
    a, b = Node("node-a", 65001), Node("node-a", 65002)
    out, inbound = connection(a, b)
    events = deliver(out, inbound)
    assert notes(events) == [(m.OPEN_MESSAGE_ERROR, m.BAD_BGP_IDENTIFIER, "sent")]


# --- the peering policy (Cedar) ---------------------------------------------------------

POLICY = """
permit(principal, action == Action::"peer", resource)
when { principal.asn == 65001 && context has psk_key_id && context.psk_key_id == "k1" };

permit(principal == Peer::"node-c", action, resource);

forbid(principal, action, resource) when { context.direction == "outbound" && !context.jws };
"""


def request(**changes: object) -> PeeringRequest:
    fields: dict[str, object] = {
        "local_asn": 65002,
        "local_identifier": "node-b",
        "peer_asn": 65001,
        "peer_identifier": "node-a",
        "certificate_names": frozenset({"node-a"}),
        "psk_key_id": "k1",
        "jws_kid": None,
        "capabilities": (),
        "initiator": False,
    }
    fields.update(changes)
    return PeeringRequest(**fields)  # type: ignore[arg-type]


def test_cedar_policy_permits_and_refuses_with_reasons() -> None:
    policy = CedarPolicy(POLICY)
    assert policy.decide(request()) is None
    assert policy.decide(request(peer_identifier="node-c", peer_asn=7, psk_key_id=None)) is None
    assert policy.decide(request(psk_key_id=None)) == "no policy permits this peer"
    assert policy.decide(request(psk_key_id="k2")) == "no policy permits this peer"
    refusal = policy.decide(request(initiator=True))
    assert refusal is not None and refusal.startswith("forbidden by policy")
    assert policy.decide(request(initiator=True, jws_kid="kid-1")) is None


def test_cedar_policy_is_validated_against_the_schema_when_loaded() -> None:
    with pytest.raises(ValueError, match="asm"):
        CedarPolicy("permit(principal, action, resource) when { principal.asm == 1 };")
    with pytest.raises(ValueError):
        CedarPolicy("permit(principal")


def test_policy_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "peering.cedar"
    path.write_text(POLICY)
    assert CedarPolicy.from_file(path).decide(request()) is None
    with pytest.raises(ValueError, match=r"missing\.cedar"):
        CedarPolicy.from_file(tmp_path / "missing.cedar")


def test_session_refused_by_policy_gets_2_246_and_passes_proven_facts() -> None:
    seen: list[PeeringRequest] = []

    class Recording:
        def decide(self, req: PeeringRequest) -> str | None:
            seen.append(req)
            return "not today" if req.peer_asn == 65001 else None

    secrets = {"k1": b"0123456789abcdef0123"}
    a = Node("node-a", 65001, psk_secrets=secrets, psk_key_id="k1")
    b = Node("node-b", 65002, psk_secrets=secrets, policy=Recording())
    out, inbound = connection(a, b)
    events = deliver(out, inbound)
    assert notes(events) == [(m.OPEN_MESSAGE_ERROR, m.POLICY_REFUSED, "sent")]
    [req] = seen
    assert (req.peer_identifier, req.psk_key_id, req.jws_kid, req.direction) == (
        "node-a",
        "k1",
        None,
        "inbound",
    )
    assert notes(deliver(inbound, out)) == [(m.OPEN_MESSAGE_ERROR, m.POLICY_REFUSED, "received")]


def test_session_permitted_by_policy_is_established() -> None:
    b = Node("node-b", 65002, policy=CedarPolicy(POLICY))
    c = Node("node-c", 65003)
    out, inbound = connection(c, b)
    deliver(out, inbound)
    deliver(inbound, out)
    events = deliver(out, inbound)
    assert SessionEstablished("node-c", 65003, 180) in events
