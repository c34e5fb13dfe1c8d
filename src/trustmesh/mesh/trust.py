"""A node's view of trust: the mesh CA, the revocation list, and the identities it has
verified (zero-trust-mesh.md sections 2.1 and 5).

Verifying a certificate chain costs far more than a signature, so each chain is verified
once and its identity cached by the leaf's bytes. Revocation is never cached: every use
of an identity asks :meth:`TrustView.is_revoked` afresh, so a CRL takes effect at once.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from trustmesh.mesh.errors import BadSignature, GossipRejected, RevokedOrigin, UntrustedOrigin
from trustmesh.pki.extensions import ExtensionError, identity_key_of

_DER = serialization.Encoding.DER
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())  # one object, shared by every check
MAX_IDENTITIES = 4096  # verified chains kept; the least recently used go first
# The largest CRL a node takes or sends (DER): about 480,000 revoked serials. Over one link
# frame it travels in CRL_PART pieces (docs/protocols/mesh-link.md section 3.1).
MAX_CRL = 16 * 1024 * 1024
# The largest CRL a node gossips (section 9.1): a bigger one is only pushed over links and
# fetched from the CA, since gossip would carry it again to every fanout peer.
MAX_GOSSIP_CRL = 64 * 1024


class CrlRejected(GossipRejected):
    """A CRL that does not parse or is not signed by the mesh's issuing CA."""

    code = "bad-crl"


@dataclass(frozen=True, slots=True)
class Identity:
    """A node certificate that chains to the mesh CA."""

    node_id: str
    serial: int
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    not_after: datetime
    not_after_ms: int
    ecdsa: bool = True  # else Ed25519 (decided once, not by an ABC check per message)

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`BadSignature` unless ``signature`` over ``data`` is this node's."""
        try:
            if self.ecdsa:
                self.public_key.verify(signature, data, ECDSA_SHA256)  # type: ignore[call-arg]
            else:
                self.public_key.verify(signature, data)  # type: ignore[call-arg]
        except InvalidSignature:
            raise BadSignature(f"signature does not verify under {self.node_id}'s key") from None


@dataclass(frozen=True, slots=True)
class CrlUpdate:
    """A CRL newer than the one held: ``revoked`` holds the serials it adds."""

    number: int
    revoked: frozenset[int]


class TrustView:
    """The mesh CA's roots, its issuing CAs (for CRL signatures), the revoked serials."""

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        issuers: Iterable[x509.Certificate] = (),
        *,
        identities: OrderedDict[bytes, Identity] | None = None,
    ) -> None:
        """``identities``: the cache of verified chains, by leaf DER (a simulation shares
        one among its nodes; revocation is never cached, each view checks its own CRL)."""
        if not roots:
            raise ValueError("a trust view needs the mesh root certificate")
        self._store = Store(list(roots))
        self._issuers: dict[bytes, x509.Certificate] = {}
        for issuer in issuers:
            self.add_issuer(issuer)
        self.revoked: set[int] = set()
        self.crl_der: bytes | None = None
        self.crl_number = -1
        self.crl_next_update: datetime | None = None
        self._identities = identities if identities is not None else OrderedDict()

    def add_issuer(self, cert: x509.Certificate) -> None:
        """An issuing CA whose key may sign CRLs (from our own chain, usually)."""
        self._issuers[cert.public_bytes(_DER)] = cert

    # --- revocation -----------------------------------------------------------------------

    def is_revoked(self, serial: int) -> bool:
        return serial in self.revoked

    def is_newer_crl(self, der: bytes) -> bool:
        """Whether ``der`` has a higher CRL number than the CRL held (signature unchecked:
        :meth:`apply_crl` checks it)."""
        return crl_number_of(der) > self.crl_number

    def apply_crl(self, der: bytes) -> CrlUpdate | None:
        """Take a CRL if it is signed by a known issuing CA and newer than the one held
        (by CRL number); return what it changed, or None for one we already have."""
        if len(der) > MAX_CRL:
            raise CrlRejected(f"a CRL of {len(der)} bytes is over the limit of {MAX_CRL}")
        try:
            crl = x509.load_der_x509_crl(der)
            number_ext = crl.extensions.get_extension_for_class(x509.CRLNumber)
        except (ValueError, x509.ExtensionNotFound) as exc:
            raise CrlRejected(f"not a CRL with a CRL number: {exc}") from None
        number = number_ext.value.crl_number
        if number <= self.crl_number:
            return None  # nothing to take, so nothing to verify (peers resend CRLs often)
        if not any(
            issuer.subject == crl.issuer and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            for issuer in self._issuers.values()
        ):
            raise CrlRejected("the CRL is not signed by the mesh's issuing CA")
        serials = {entry.serial_number for entry in crl}
        added = frozenset(serials - self.revoked)
        # A full CRL lists every revocation that still matters: the CA drops a serial
        # only once its certificate has expired (pki.md section 3), and an expired
        # certificate is refused anyway. So the newest CRL replaces the set, which then
        # stays as small as the CRL.
        self.revoked = serials
        self.crl_der = der
        self.crl_number = number
        self.crl_next_update = crl.next_update_utc
        return CrlUpdate(number, frozenset(added))

    # --- identities -------------------------------------------------------------------------

    def identity(
        self,
        chain: Sequence[bytes],
        *,
        now: datetime | None = None,
        now_ms: int | None = None,
    ) -> Identity:
        """The node identity of a DER chain (leaf first), verified to the mesh root and
        checked against the revocation list, at the time ``now`` (or ``now_ms``, Unix
        milliseconds, which spares building a datetime when the chain is cached). The
        caller gives the time: this core reads no clock."""
        if not chain:
            raise UntrustedOrigin("no certificate for this origin")
        if now_ms is None:
            if now is None:
                raise TypeError("identity() needs the time: now or now_ms")
            now_ms = int(now.timestamp() * 1000)
        cached = self._identities.get(chain[0])
        if cached is not None and now_ms < cached.not_after_ms:
            self._identities.move_to_end(chain[0])
        else:
            now = now or datetime.fromtimestamp(now_ms / 1000, UTC)
            try:
                certs = [x509.load_der_x509_certificate(der) for der in chain]
            except ValueError as exc:
                raise UntrustedOrigin(f"a certificate does not parse: {exc}") from None
            cached = self._verify(certs, now)
            self._identities[chain[0]] = cached
            if len(self._identities) > MAX_IDENTITIES:
                self._identities.popitem(last=False)
        if self.is_revoked(cached.serial):
            raise RevokedOrigin(f"{cached.node_id}'s certificate {cached.serial_hex} is revoked")
        return cached

    def identity_of(
        self,
        chain: Sequence[x509.Certificate],
        *,
        now: datetime | None = None,
        now_ms: int | None = None,
    ) -> Identity:
        """As :meth:`identity`, for parsed certificates (a TLS peer's chain)."""
        return self.identity([c.public_bytes(_DER) for c in chain], now=now, now_ms=now_ms)

    def _verify(self, certs: list[x509.Certificate], now: datetime) -> Identity:
        leaf, *intermediates = certs
        policy = PolicyBuilder().store(self._store).time(now)
        verifier = policy.build_client_verifier()
        try:
            verified = verifier.verify(leaf, [*intermediates, *self._issuers.values()])
        except VerificationError as exc:
            raise UntrustedOrigin(f"certificate does not verify to the mesh CA: {exc}") from None
        node_id = node_id_of(leaf)
        try:
            key = identity_key_of(leaf)  # a device identity's key, when one is bound
        except ExtensionError as exc:
            raise UntrustedOrigin(f"{node_id}'s certificate: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            raise UntrustedOrigin(f"{node_id}'s certificate has a key type gossip does not use")
        for issuer in verified.chain[1:-1]:
            self.add_issuer(issuer)
        not_after = leaf.not_valid_after_utc
        return Identity(
            node_id,
            leaf.serial_number,
            key,
            not_after,
            int(not_after.timestamp() * 1000),
            ecdsa=isinstance(key, ec.EllipticCurvePublicKey),
        )


@functools.lru_cache(maxsize=2)
def crl_number_of(der: bytes) -> int:
    """The CRL number of a DER CRL (signature unchecked), or :class:`CrlRejected`. Cached
    for the last few CRLs: one CRL is sent on every link, and ``bytes`` keep their hash."""
    try:
        crl = x509.load_der_x509_crl(der)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise CrlRejected(f"not a CRL with a CRL number: {exc}") from None
    return int(number)


def node_id_of(cert: x509.Certificate) -> str:
    """The node_id a node certificate names: its CN, which its DNS SAN must repeat (an
    admin or other certificate without that pairing is not a node)."""
    common = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if len(common) != 1 or common[0] not in dns:
        raise UntrustedOrigin("not a node certificate: its CN is not one of its DNS names")
    return common[0]
