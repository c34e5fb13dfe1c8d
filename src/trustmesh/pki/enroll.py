"""Enrollment and rotation: who may get a node certificate, and on what evidence.

:class:`Registrar` is the CA's front desk, free of HTTP: the API parses requests into
calls here and maps the typed errors to status codes (docs/protocols/pki.md).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from trustmesh.clock import Clock
from trustmesh.pki.attestation import (
    Attestation,
    AttestationPolicy,
    AttestationResult,
    enrollment_nonce,
    rotation_nonce,
)
from trustmesh.pki.ca import (
    DEFAULT_NODE_VALIDITY,
    CertificateAuthority,
    load_csr,
    parse_serial,
    token_hash,
)
from trustmesh.pki.errors import (
    CertificateRevoked,
    NotAuthenticated,
    PolicyDenied,
    SerialMismatch,
    TokenRejected,
)
from trustmesh.pki.store import IssuedCertificate

DEFAULT_GOSSIP_FANOUT = 3


@dataclass(frozen=True)
class MeshSettings:
    """What a newly enrolled node is told about the mesh (the response's ``config``)."""

    bootstrap_peers: tuple[str, ...] = ()
    gossip_fanout: int = DEFAULT_GOSSIP_FANOUT
    crl_url: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "bootstrap_peers": list(self.bootstrap_peers),
            "gossip_fanout": self.gossip_fanout,
            "crl_url": self.crl_url,
        }


@dataclass(frozen=True)
class EnrollmentPolicy:
    """``allow``: shell patterns a node_id must match (empty: any). ``max_nodes``: how
    many distinct nodes may hold a valid certificate at once (None: no cap)."""

    allow: tuple[str, ...] = ()
    max_nodes: int | None = None
    attestation: AttestationPolicy = field(default_factory=AttestationPolicy)
    validity: timedelta = DEFAULT_NODE_VALIDITY

    def check_allowed(self, node_id: str) -> None:
        if self.allow and not any(fnmatch.fnmatchcase(node_id, p) for p in self.allow):
            raise PolicyDenied(f"node_id {node_id!r} is not on this CA's allow-list")


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    record: IssuedCertificate
    attestation: AttestationResult | None
    retried: bool = False  # the certificate was issued before, to an earlier request


def _issued(
    signed: x509.Certificate,
    stored: IssuedCertificate,
    verdict: AttestationResult | None,
) -> Issued:
    """What the store committed: the certificate just signed, or (for a retry) the one it
    already held for the same key."""
    if stored.serial == signed.serial_number:
        return Issued(signed, stored, verdict)
    return Issued(x509.load_pem_x509_certificate(stored.pem.encode()), stored, verdict, True)


class Registrar:
    """Enrolls nodes with tokens and rotates certificates for authenticated nodes."""

    def __init__(
        self,
        ca: CertificateAuthority,
        policy: EnrollmentPolicy,
        settings: MeshSettings,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.ca = ca
        self.clock = ca.clock if clock is None else clock  # the CA's clock unless told otherwise
        self.policy = policy
        self.settings = settings
        self._trust = Store([ca.root_cert])

    def enroll(
        self,
        token: str,
        csr_text: str,
        *,
        node_id: str | None = None,
        attestation: Attestation | None = None,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> Issued:
        """Spend ``token`` on a certificate for the CSR's key. The certificate is in the
        store (with its audit entry) before this returns.

        Idempotent: a token already spent on a live certificate for the same node and
        the same public key gets that certificate again (``Issued.retried``), so a node
        whose answer was lost (the CA crashed after committing) can finish. Anything else
        with a spent token is :class:`TokenRejected`."""
        now = now or self.clock.now()
        known = self.ca.store.token(token_hash(token))
        if known is None:
            raise TokenRejected("unknown enrollment token")
        if node_id is not None and node_id != known.node_id:
            raise TokenRejected(f"the enrollment token is for another node_id, not {node_id!r}")
        node_id = known.node_id
        # Cheap refusals first, so a request that cannot succeed does not spend the token.
        # A spent token goes on: it may be a retry, which the store recognises by the key.
        if known.used_at is None and known.expires_at <= now:
            raise TokenRejected("the enrollment token has expired")
        csr = load_csr(csr_text)
        self.policy.check_allowed(node_id)
        key = csr.public_key()
        verdict = self.policy.attestation.check(attestation, enrollment_nonce(token, key), key)
        cert, record = self.ca.sign(csr, node_id, validity=self.policy.validity, now=now)
        # Spends the token, applies the node cap and commits the record atomically:
        # of racing requests with one token exactly one gets here.
        stored = self.ca.store.enroll(
            token_hash(token), record, now=now, max_nodes=self.policy.max_nodes, actor=actor
        )
        return _issued(cert, stored, verdict)

    def authenticate(
        self, chain: Sequence[x509.Certificate], *, now: datetime | None = None
    ) -> IssuedCertificate:
        """The store's record of the client certificate ``chain`` (leaf first) presented:
        :class:`NotAuthenticated` when there is none or it does not verify to this CA,
        :class:`PolicyDenied` when it is revoked."""
        now = now or self.clock.now()
        if not chain:
            raise NotAuthenticated("this request needs a client certificate from this mesh CA")
        leaf, *intermediates = chain
        verifier = PolicyBuilder().store(self._trust).time(now).build_client_verifier()
        try:
            verifier.verify(leaf, [self.ca.issuing_cert, *intermediates])
        except VerificationError as exc:
            raise NotAuthenticated(f"the client certificate does not verify: {exc}") from None
        record = self.ca.store.get(leaf.serial_number)
        if record is None:
            raise NotAuthenticated("the client certificate is not one this CA issued")
        if record.revoked_at is not None:
            raise CertificateRevoked(
                f"certificate {record.serial_hex} of {record.node_id!r} is revoked"
                f" ({record.reason})"
            )
        return record

    def rotate(
        self,
        current: IssuedCertificate,
        csr_text: str,
        *,
        current_serial: str | None = None,
        attestation: Attestation | None = None,
        actor: str | None = None,
        now: datetime | None = None,
    ) -> Issued:
        """A new certificate for the node that holds ``current`` (already authenticated).
        The old one stays valid until its own expiry: the two overlap.

        The store checks again, in the transaction that records the new certificate,
        that ``current`` is not revoked (by serial or with its node_id), not expired and
        not superseded: a revocation that lands between the TLS handshake and this call
        is never outrun. A retry with the key already certified as ``current``'s
        successor gets that certificate again (``Issued.retried``)."""
        now = now or self.clock.now()
        if current.role != "node":
            raise PolicyDenied(f"only node certificates rotate here, not {current.role} ones")
        claimed = None
        if current_serial is not None:
            claimed = parse_serial(current_serial, "current_cert_serial")
            if claimed != current.serial:
                raise SerialMismatch(
                    f"current_cert_serial {current_serial} is not the client certificate's"
                    f" serial {current.serial_hex}"
                )
        csr = load_csr(csr_text)
        self.policy.check_allowed(current.node_id)
        key = csr.public_key()
        verdict = self.policy.attestation.check(
            attestation, rotation_nonce(current.serial, key), key
        )
        cert, record = self.ca.sign(csr, current.node_id, validity=self.policy.validity, now=now)
        stored = self.ca.store.rotate(
            current.serial, record, now=now, actor=actor, claimed_serial=claimed
        )
        return _issued(cert, stored, verdict)
