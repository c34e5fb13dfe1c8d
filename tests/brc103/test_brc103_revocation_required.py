"""Revocation must be able to fail (issue 16, item 18): a certificate that can be revoked
is refused unless a revocation source is configured, or the operator explicitly turned
the check off; only the 36 zero bytes make a certificate irrevocable."""

from __future__ import annotations

import pytest
from brc103_support import CERT_TYPE, alice, bob, certifier, handshake, relay, seeded_random

from trustmesh.brc103.certificates import NO_REVOCATION, MasterCertificate, is_revocable
from trustmesh.brc103.errors import (
    CertificateError,
    CertificateFormatError,
    CertificateRevokedError,
)
from trustmesh.brc103.messages import RequestedCertificates
from trustmesh.brc103.peer import CertificatesReceived, Peer, PeerConfig
from trustmesh.brc103.revocation import (
    LocalRevocationRegistry,
    NoRevocationCheck,
    RevocationChecker,
)

B = bob().identity_key
REQUEST = RequestedCertificates((certifier().identity_key,), {CERT_TYPE: ("name",)})


def test_is_revocable_tests_all_36_bytes() -> None:
    cases = {
        "00" * 32 + ".0": False,  # the 36 zero bytes
        "00" * 32: False,  # the reference's index-less default (reference notes d.2)
        "00" * 32 + ".1": True,  # zero txid, but output 1 can be spent
        "00" * 32 + ".4294967295": True,
        "00" * 31 + "01.0": True,
        "ab" * 32 + ".0": True,
    }
    assert {outpoint: is_revocable(outpoint) for outpoint in cases} == cases


def test_is_revocable_refuses_what_is_not_an_outpoint() -> None:
    with pytest.raises(CertificateFormatError):
        is_revocable("0" * 64 + ".x")


def exchange(outpoint: str, revocation: RevocationChecker | None) -> list[object]:
    """Alice shows bob (who asked for a "name") a certificate with ``outpoint``."""
    master = MasterCertificate.issue(
        certifier(), alice().identity_key, CERT_TYPE, {"name": "A"}, revocation_outpoint=outpoint
    )
    a = Peer(
        alice(),
        PeerConfig(answer_certificate_requests=False),
        revocation=LocalRevocationRegistry(),
        random=seeded_random("alice-revocation"),
    )
    b = Peer(
        bob(),
        PeerConfig(requested_certificates=REQUEST),
        revocation=revocation,
        random=seeded_random("bob-revocation"),
    )
    handshake(a, b)
    shown = master.reveal(alice(), B, ["name"])
    message = relay(a.create_certificate_response([shown], identity_key=B))
    return list(b.receive(message, 1))


def test_a_revocable_certificate_is_refused_without_a_revocation_source() -> None:
    with pytest.raises(CertificateError) as info:
        exchange("ab" * 32 + ".1", None)
    assert info.value.code == "ERR_REVOCATION_UNCHECKED"
    assert "no revocation source" in str(info.value)
    assert Peer(bob()).revocation is None  # the default Peer has no source either
    # A configured source, or the operator's explicit opt-out, accepts it ...
    for checker in (LocalRevocationRegistry(), NoRevocationCheck()):
        events = exchange("ab" * 32 + ".1", checker)
        assert [type(e) for e in events] == [CertificatesReceived]
    # ... and the 36 zero bytes need no source at all.
    assert [type(e) for e in exchange(NO_REVOCATION, None)] == [CertificatesReceived]


def test_a_zero_txid_with_another_index_is_checked_and_can_be_revoked() -> None:
    outpoint = "00" * 32 + ".1"
    registry = LocalRevocationRegistry()
    registry.revoke(outpoint)
    with pytest.raises(CertificateRevokedError):
        exchange(outpoint, registry)
    with pytest.raises(CertificateError, match="no revocation source"):
        exchange(outpoint, None)
