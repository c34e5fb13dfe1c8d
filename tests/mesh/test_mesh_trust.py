"""The trust view: node identities from certificate chains verified to the mesh CA,
revocation by CRL, and the identity cache."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import PublicFormat
from meshtools import DER, NOW, T0, MeshPki, ms

import trustmesh.mesh.trust as trust_module
from trustmesh.crypto.keys import KeyKind
from trustmesh.mesh.errors import BadSignature, RevokedOrigin, UntrustedOrigin
from trustmesh.mesh.trust import (
    CrlRejected,
    CrlUpdate,
    Identity,
    TrustView,
    crl_number_of,
    node_id_of,
)

SPKI = PublicFormat.SubjectPublicKeyInfo


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[MeshPki]:
    mesh = MeshPki(tmp_path / "ca")
    yield mesh
    mesh.close()


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[MeshPki]:
    """Another CA with the very same names: only its keys differ."""
    mesh = MeshPki(tmp_path / "foreign")
    yield mesh
    mesh.close()


# --- identities ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [KeyKind.P256, KeyKind.ED25519])
def test_a_valid_chain_gives_the_nodes_identity(pki: MeshPki, kind: KeyKind) -> None:
    node = pki.node("node-1", kind)
    identity = pki.trust().identity(node.chain_der, now=T0)
    assert identity.node_id == "node-1"
    assert identity.serial == node.serial
    assert identity.serial_hex == format(node.serial, "x")
    assert identity.public_key.public_bytes(DER, SPKI) == node.cert.public_key().public_bytes(
        DER, SPKI
    )
    assert identity.not_after == node.cert.not_valid_after_utc
    assert identity.not_after_ms == ms(node.cert.not_valid_after_utc)
    data = b"signed by node-1"
    identity.verify(node.key.sign(data), data)
    with pytest.raises(BadSignature):
        identity.verify(node.key.sign(data), data + b"!")


def test_identity_of_parsed_certificates_is_the_same(pki: MeshPki) -> None:
    node = pki.node("node-1")
    trust = pki.trust()
    assert trust.identity_of(node.chain, now=T0) == trust.identity(node.chain_der, now=T0)


def test_the_leaf_alone_verifies_through_a_known_issuing_ca(pki: MeshPki) -> None:
    node = pki.node("node-1")
    assert pki.trust().identity(node.chain_der[:1], now=T0).node_id == "node-1"


def test_an_issuing_ca_learned_from_a_chain_verifies_later_leaves(pki: MeshPki) -> None:
    trust = TrustView([pki.ca.root_cert])  # the root only, no issuing CA
    first, second = pki.node("node-1"), pki.node("node-2")
    with pytest.raises(UntrustedOrigin):
        trust.identity(second.chain_der[:1], now=T0)
    trust.identity(first.chain_der, now=T0)  # brings the issuing CA
    assert trust.identity(second.chain_der[:1], now=T0).node_id == "node-2"
    # ... and its key may now sign CRLs.
    pki.revoke(second)
    update = trust.apply_crl(pki.crl())
    assert update is not None and second.serial in update.revoked


def test_an_empty_chain_is_untrusted(pki: MeshPki) -> None:
    with pytest.raises(UntrustedOrigin, match="no certificate"):
        pki.trust().identity((), now=T0)


@pytest.mark.parametrize("junk", [b"", b"\x30\x03\x02\x01\x01", b"not a certificate"])
def test_a_chain_that_does_not_parse_is_untrusted(pki: MeshPki, junk: bytes) -> None:
    with pytest.raises(UntrustedOrigin, match="does not parse"):
        pki.trust().identity((junk,), now=T0)
    node = pki.node("node-1")
    with pytest.raises(UntrustedOrigin):
        pki.trust().identity((node.chain_der[0], junk), now=T0)


def test_a_chain_from_another_ca_is_untrusted(pki: MeshPki, foreign: MeshPki) -> None:
    stranger = foreign.node("node-1")
    assert stranger.issuing.subject == pki.ca.issuing_cert.subject  # names alone match
    with pytest.raises(UntrustedOrigin, match="does not verify"):
        pki.trust().identity(stranger.chain_der, now=T0)
    with pytest.raises(UntrustedOrigin):
        pki.trust().identity(stranger.chain_der[:1], now=T0)


def test_a_foreign_issuing_ca_under_our_root_name_does_not_help(
    pki: MeshPki, foreign: MeshPki
) -> None:
    stranger = foreign.node("node-1")
    trust = pki.trust()
    chain = (*stranger.chain_der, foreign.ca.root_cert.public_bytes(DER))
    with pytest.raises(UntrustedOrigin):
        trust.identity(chain, now=T0)


def test_an_admin_certificate_is_not_a_node(pki: MeshPki) -> None:
    admin = pki.admin("alice")
    chain = (admin.public_bytes(DER), pki.ca.issuing_cert.public_bytes(DER))
    with pytest.raises(UntrustedOrigin, match="not a node certificate"):
        pki.trust().identity(chain, now=T0)


@pytest.mark.parametrize(
    ("common_names", "dns_names"),
    [
        (["node-1"], ["node-2"]),  # the CN is not one of the DNS names
        (["node-1"], []),  # no SAN at all
        (["node-1", "node-1"], ["node-1"]),  # two CNs
        ([], ["node-1"]),  # no CN
    ],
)
def test_node_id_needs_one_cn_repeated_as_a_dns_name(
    pki: MeshPki, common_names: list[str], dns_names: list[str]
) -> None:
    cert = pki.custom_cert(common_names, dns_names)
    with pytest.raises(UntrustedOrigin):
        node_id_of(cert)
    with pytest.raises(UntrustedOrigin):
        pki.trust().identity((cert.public_bytes(DER),), now=T0)


def test_node_id_of_a_matching_certificate(pki: MeshPki) -> None:
    assert node_id_of(pki.custom_cert(["node-9"], ["other", "node-9"])) == "node-9"


def test_an_expired_or_not_yet_valid_certificate_is_untrusted(pki: MeshPki) -> None:
    node = pki.node("node-1")
    with pytest.raises(UntrustedOrigin):
        pki.trust().identity(node.chain_der, now=node.cert.not_valid_after_utc + timedelta(1))
    with pytest.raises(UntrustedOrigin):
        pki.trust().identity(node.chain_der, now=NOW - timedelta(hours=1))


def test_a_cached_identity_is_verified_again_once_it_expires(pki: MeshPki) -> None:
    node = pki.node("node-1")
    trust = pki.trust()
    trust.identity(node.chain_der, now=T0)
    with pytest.raises(UntrustedOrigin):
        trust.identity(node.chain_der, now=node.cert.not_valid_after_utc + timedelta(1))


def test_now_ms_is_the_same_clock_as_now(pki: MeshPki) -> None:
    node = pki.node("node-1")
    by_ms = pki.trust().identity(node.chain_der, now_ms=ms(T0))
    assert by_ms == pki.trust().identity(node.chain_der, now=T0)
    with pytest.raises(UntrustedOrigin):
        pki.trust().identity(node.chain_der, now_ms=ms(NOW - timedelta(hours=1)))
    # Expired, whether the view verified it before (cached) or not.
    after = ms(node.cert.not_valid_after_utc + timedelta(seconds=1))
    cached = pki.trust()
    cached.identity(node.chain_der, now_ms=ms(T0))
    for trust in (pki.trust(), cached):
        with pytest.raises(UntrustedOrigin):
            trust.identity(node.chain_der, now_ms=after)


def test_a_cached_identity_is_used_until_just_before_its_not_after(
    pki: MeshPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = pki.node("node-1")
    trust = pki.trust()
    first = trust.identity(node.chain_der, now_ms=ms(T0))
    real_verify = trust._verify
    verified: list[int] = []

    def counting(certs: list[x509.Certificate], now: Any) -> Identity:
        verified.append(ms(now))
        return real_verify(certs, now)

    monkeypatch.setattr(trust, "_verify", counting)
    assert trust.identity(node.chain_der, now_ms=first.not_after_ms - 1) is first
    assert verified == []
    with pytest.raises(UntrustedOrigin):
        trust.identity(node.chain_der, now_ms=first.not_after_ms + 1000)
    assert verified == [first.not_after_ms + 1000]


def test_a_trust_view_needs_a_root() -> None:
    with pytest.raises(ValueError, match="root"):
        TrustView([])


# --- the cache ----------------------------------------------------------------------------


def test_a_cache_hit_does_not_verify_the_chain_again(
    pki: MeshPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = pki.node("node-1")
    trust = pki.trust()
    first = trust.identity(node.chain_der, now=T0)

    def no_second_verification(*args: Any) -> Identity:
        raise AssertionError("a cached chain was verified again")

    monkeypatch.setattr(trust, "_verify", no_second_verification)
    assert trust.identity(node.chain_der, now=T0 + timedelta(hours=1)) is first
    # The cache is keyed by the leaf: what follows it is not looked at again either.
    assert trust.identity((node.chain_der[0], b"junk"), now=T0) is first


def test_the_cache_forgets_the_least_recently_used(
    pki: MeshPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trust_module, "MAX_IDENTITIES", 2)
    trust = pki.trust()
    verified: list[str] = []
    real_verify = trust._verify

    def counting(certs: list[x509.Certificate], now: Any) -> Identity:
        identity = real_verify(certs, now)
        verified.append(identity.node_id)
        return identity

    monkeypatch.setattr(trust, "_verify", counting)
    a, b, c = (pki.node(f"node-{i}") for i in "abc")
    for node in (a, b, a, c):  # b is the least recently used when c arrives
        trust.identity(node.chain_der, now=T0)
    assert verified == ["node-a", "node-b", "node-c"]
    trust.identity(a.chain_der, now=T0)
    trust.identity(b.chain_der, now=T0)
    assert verified == ["node-a", "node-b", "node-c", "node-b"]


# --- revocation ---------------------------------------------------------------------------


def test_a_revoked_certificate_is_refused_after_apply_crl(pki: MeshPki) -> None:
    node, other = pki.node("node-1"), pki.node("node-2")
    trust = pki.trust()
    cached = trust.identity(node.chain_der, now=T0)  # verified before the revocation
    pki.revoke(node)
    update = trust.apply_crl(pki.crl())
    assert update == CrlUpdate(ms(T0), frozenset({node.serial}))
    assert trust.is_revoked(node.serial)
    assert not trust.is_revoked(other.serial)
    # Revocation is never cached: the identity verified before is refused now.
    with pytest.raises(RevokedOrigin, match=cached.serial_hex):
        trust.identity(node.chain_der, now=T0)
    with pytest.raises(RevokedOrigin):
        trust.identity_of(node.chain, now=T0)
    assert trust.identity(other.chain_der, now=T0).node_id == "node-2"


def test_apply_crl_reports_only_the_serials_it_adds(pki: MeshPki) -> None:
    first, second = pki.node("node-1"), pki.node("node-2")
    trust = pki.trust()
    pki.revoke(first)
    one = trust.apply_crl(pki.crl(T0))
    pki.revoke(second)
    two = trust.apply_crl(pki.crl(T0 + timedelta(seconds=1)))
    assert one == CrlUpdate(ms(T0), frozenset({first.serial}))
    assert two == CrlUpdate(ms(T0) + 1000, frozenset({second.serial}))
    assert trust.revoked == {first.serial, second.serial}
    assert trust.crl_number == ms(T0) + 1000
    assert trust.crl_next_update is not None and trust.crl_next_update > T0


def test_an_empty_crl_is_taken_with_nothing_added(pki: MeshPki) -> None:
    trust, crl = pki.trust(), pki.crl()
    assert trust.apply_crl(crl) == CrlUpdate(ms(T0), frozenset())
    assert trust.crl_der == crl


def test_a_stale_or_equal_crl_changes_nothing(pki: MeshPki) -> None:
    node = pki.node("node-1")
    trust = pki.trust()
    older = pki.crl(T0)  # signed before the revocation: it does not list the node
    pki.revoke(node)
    current = pki.crl(T0 + timedelta(seconds=1))
    assert trust.apply_crl(current) is not None
    assert trust.apply_crl(current) is None  # equal number
    assert trust.apply_crl(older) is None  # older number: it would undo the revocation
    assert trust.crl_der == current
    assert trust.crl_number == ms(T0) + 1000
    assert trust.is_revoked(node.serial)


def test_is_newer_crl_compares_crl_numbers(pki: MeshPki) -> None:
    trust = pki.trust()
    older = pki.crl(T0 - timedelta(seconds=1))
    current = pki.crl(T0)
    assert trust.is_newer_crl(current)  # nothing held yet
    trust.apply_crl(current)
    assert not trust.is_newer_crl(current)
    assert not trust.is_newer_crl(older)
    assert trust.is_newer_crl(pki.crl(T0 + timedelta(milliseconds=1)))
    # It only reads: nothing is applied.
    assert trust.crl_der == current and trust.crl_number == ms(T0)


def test_crl_numbers_only_grow_whatever_the_clock_says(pki: MeshPki) -> None:
    """The number comes from the CA's store (shared by its replicas): a CRL signed with
    an earlier time, or within the same millisecond, still gets a higher number."""
    numbers = [
        crl_number_of(pki.crl(T0 + timedelta(milliseconds=offset))) for offset in (0, 0, -5000, 1)
    ]
    assert numbers == [ms(T0), ms(T0) + 1, ms(T0) + 2, ms(T0) + 3]


def test_is_newer_crl_does_not_check_the_signature(pki: MeshPki, foreign: MeshPki) -> None:
    trust = pki.trust()
    trust.apply_crl(pki.crl(T0))
    forged = foreign.crl(T0 + timedelta(days=1))
    assert trust.is_newer_crl(forged)  # as documented: apply_crl is what checks it
    with pytest.raises(CrlRejected, match="not signed"):
        trust.apply_crl(forged)
    assert trust.crl_number == ms(T0)


@pytest.mark.parametrize("junk", [b"", b"garbage", b"\x30\x00"])
def test_is_newer_crl_refuses_what_is_not_a_crl(pki: MeshPki, junk: bytes) -> None:
    with pytest.raises(CrlRejected, match="not a CRL"):
        pki.trust().is_newer_crl(junk)
    with pytest.raises(CrlRejected):
        pki.trust().is_newer_crl(pki.node("node-1").chain_der[0])


def test_is_newer_crl_needs_a_crl_number(pki: MeshPki) -> None:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.issuing_cert.subject)
        .last_update(T0)
        .next_update(T0 + timedelta(days=1))
        .sign(pki.issuing_key(), hashes.SHA256())
    )
    with pytest.raises(CrlRejected, match="CRL number"):
        pki.trust().is_newer_crl(crl.public_bytes(DER))


def test_a_crl_signed_by_another_ca_is_rejected(pki: MeshPki, foreign: MeshPki) -> None:
    trust = pki.trust()
    victim = pki.node("node-1")
    foreign.ca.revoke(serial=foreign.node("node-x").serial, now=NOW)
    forged = foreign.crl(T0 + timedelta(days=1))
    assert x509.load_der_x509_crl(forged).issuer == pki.ca.issuing_cert.subject
    with pytest.raises(CrlRejected, match="not signed"):
        trust.apply_crl(forged)
    assert trust.crl_number == -1 and trust.crl_der is None and not trust.revoked
    assert trust.identity(victim.chain_der, now=T0).node_id == "node-1"


@pytest.mark.parametrize("junk", [b"", b"garbage", b"\x30\x00", b"\x30\x82\xff\xff" + b"\x00" * 8])
def test_garbage_is_not_a_crl(pki: MeshPki, junk: bytes) -> None:
    trust = pki.trust()
    with pytest.raises(CrlRejected) as caught:
        trust.apply_crl(junk)
    assert caught.value.code == "bad-crl"


def test_a_crl_without_a_crl_number_is_rejected(pki: MeshPki) -> None:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.issuing_cert.subject)
        .last_update(T0)
        .next_update(T0 + timedelta(days=1))
        .sign(pki.issuing_key(), hashes.SHA256())
    )
    with pytest.raises(CrlRejected, match="CRL number"):
        pki.trust().apply_crl(crl.public_bytes(DER))


def test_a_certificate_is_not_a_crl(pki: MeshPki) -> None:
    with pytest.raises(CrlRejected):
        pki.trust().apply_crl(pki.node("node-1").chain_der[0])
