"""BGP identifiers that are IP addresses (issue 16 item 17): an IPv4 or IPv6 identifier
matches the peer certificate's IP SAN, and two IPv4 identifiers order as RFC 4271 orders
them, as 32-bit unsigned integers."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.collision import is_higher
from trustmesh.catalyst.session import (
    CatalystConfig,
    CatalystSession,
    NotificationEvent,
    SessionEstablished,
    identifier_in,
)
from trustmesh.sansio import Event
from trustmesh.tls import TlsEstablished
from trustmesh.tls.stream import certificate_names


@pytest.mark.parametrize(
    ("ours", "theirs", "higher"),
    [
        ("10.0.0.10", "10.0.0.9", True),  # bytewise "10.0.0.10" < "10.0.0.9"
        ("10.0.0.9", "10.0.0.10", False),
        ("192.168.0.1", "9.255.255.255", True),
        ("node-b", "node-a", True),
        ("10.0.0.9", "node-a", False),  # a name and an address: bytewise
    ],
)
def test_ipv4_identifiers_compare_as_integers(ours: str, theirs: str, higher: bool) -> None:
    assert is_higher(ours, theirs) is higher
    assert is_higher(theirs, ours) is not higher


def leaf_for(tmp_path: Path, *identities: str) -> x509.Certificate:
    cert = trustme.CA().issue_cert(*identities)
    pem = tmp_path / "leaf.pem"
    cert.cert_chain_pems[0].write_to_path(str(pem))
    return x509.load_pem_x509_certificate(pem.read_bytes())


def test_ip_sans_are_names_in_canonical_form(tmp_path: Path) -> None:
    leaf = leaf_for(tmp_path, "10.0.0.9", "2001:DB8::1", "peer.example")
    names = certificate_names(leaf, ips=True)
    assert {"10.0.0.9", "2001:db8::1", "peer.example"} <= names
    assert "10.0.0.9" not in certificate_names(leaf)  # CSR checks keep their old meaning
    assert identifier_in("2001:0db8:0:0:0:0:0:1", names)
    assert identifier_in("10.0.0.9", names)
    assert not identifier_in("10.0.0.10", names)
    assert not identifier_in("2001:db8::2", names)


class FakeTls:
    established: TlsEstablished | None = None  # no certificate expiry

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def peer_names(self) -> frozenset[str]:
        return self.names

    def exporter(self, label: bytes, context: bytes) -> bytes:
        return hmac.new(b"tls", label + b"|" + context, hashlib.sha256).digest()


def pump(a: CatalystSession, b: CatalystSession) -> list[Event]:
    events: list[Event] = []
    for _ in range(4):
        for sender, receiver in ((a, b), (b, a)):
            data = sender.data_to_send()
            if data:
                events += receiver.receive_data(data, 0.0)
    return events


@pytest.mark.parametrize("identifier", ["10.0.0.9", "2001:db8::1"])
def test_a_peer_whose_ip_identifier_is_an_ip_san_is_accepted(
    tmp_path: Path, identifier: str
) -> None:
    """Before: the bgpIdentifier was compared with the CN and DNS/URI SANs only, so a
    certificate for an address refused its own peer with 2/3."""
    peer_leaf = leaf_for(tmp_path, identifier)
    ours = CatalystSession(
        CatalystConfig(my_asn=65001, bgp_identifier="node-a"),
        initiator=True,
        binding=FakeTls(certificate_names(peer_leaf, ips=True)),
    )
    theirs = CatalystSession(
        CatalystConfig(my_asn=65002, bgp_identifier=identifier),
        initiator=False,
        binding=FakeTls(frozenset({"node-a"})),
    )
    ours.start(0.0)
    theirs.start(0.0)
    events = pump(ours, theirs)
    refused = [e for e in events if isinstance(e, NotificationEvent)]
    assert refused == []
    assert any(isinstance(e, SessionEstablished) and e.peer_id == identifier for e in events)


def test_an_ip_identifier_not_in_the_certificate_is_refused_with_2_3(tmp_path: Path) -> None:
    peer_leaf = leaf_for(tmp_path, "10.0.0.8")
    ours = CatalystSession(
        CatalystConfig(my_asn=65001, bgp_identifier="node-a"),
        initiator=True,
        binding=FakeTls(certificate_names(peer_leaf, ips=True)),
    )
    theirs = CatalystSession(
        CatalystConfig(my_asn=65002, bgp_identifier="10.0.0.9"),
        initiator=False,
        binding=FakeTls(frozenset({"node-a"})),
    )
    ours.start(0.0)
    theirs.start(0.0)
    events = pump(ours, theirs)
    notes = [(e.code, e.subcode) for e in events if isinstance(e, NotificationEvent)]
    assert (m.OPEN_MESSAGE_ERROR, m.BAD_BGP_IDENTIFIER) in notes
