"""Enrollment and rotation: who may get a node certificate, and on what evidence.

:class:`Registrar` is the CA's front desk, free of HTTP: the API parses requests into
calls here and maps the typed errors to status codes (docs/protocols/pki.md).
"""

from __future__ import annotations

import base64
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
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
from trustmesh.pki.challenge import Challenges, Purpose
from trustmesh.pki.errors import (
    AttestationFailed,
    CertificateRevoked,
    CsrRejected,
    NotAuthenticated,
    PolicyDenied,
    SerialMismatch,
    TokenRejected,
)
from trustmesh.pki.extensions import (
    ATTESTED_PLATFORM_OID,
    AttestedPlatform,
    ExtensionError,
    IdentityBinding,
    attested_platform_of,
    identity_binding_of,
)
from trustmesh.pki.store import IssuedCertificate
from trustmesh.tpm.policy import PcrPolicy

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
        challenges: Challenges | None = None,
    ) -> None:
        self.ca = ca
        self.clock = ca.clock if clock is None else clock  # the CA's clock unless told otherwise
        self.policy = policy
        self.settings = settings
        self.challenges = challenges or Challenges.for_directory(ca.directory)
        self._trust = Store([ca.root_cert])

    def tpm_policy(self) -> PcrPolicy | None:
        """The PCR policy of the CA's TPM verifier (``--attestation-policy``), if any."""
        verifier = self.policy.attestation.verifiers.get("tpm_quote")
        policy = getattr(verifier, "policy", None)
        return policy if isinstance(policy, PcrPolicy) else None

    def enrollment_challenge(
        self, token: str, *, now: datetime | None = None
    ) -> tuple[bytes, datetime]:
        """A nonce for an enrollment with ``token``, which must be usable (so an attested
        enrollment does not fail late on its token), or spent on a certificate that is
        still live (a retry after a lost answer, which the enrollment then recognises
        by its key)."""
        now = now or self.clock.now()
        known = self.ca.store.token(token_hash(token))
        if known is None:
            raise TokenRejected("unknown enrollment token")
        if known.used_at is not None:
            # A node whose answer was lost asks again (enroll's retry rule): its
            # certificate must still be live, and the enrollment checks its key.
            bought = None if known.used_serial is None else self.ca.store.get(known.used_serial)
            if bought is None or not bought.is_live(now):
                raise TokenRejected("the enrollment token was already used")
        elif known.expires_at <= now:
            raise TokenRejected("the enrollment token has expired")
        return self.challenges.issue(Purpose.enroll(token_hash(token)), now)

    def rotation_challenge(
        self, current: IssuedCertificate, *, now: datetime | None = None
    ) -> tuple[bytes, datetime]:
        """A nonce for the rotation of ``current`` (already authenticated)."""
        return self.challenges.issue(Purpose.rotate(current.serial), now or self.clock.now())

    def _attest(
        self,
        attestation: Attestation | None,
        purpose: Purpose,
        derived: bytes,
        key: CertificatePublicKeyTypes,
        now: datetime,
    ) -> AttestationResult | None:
        """The verdict on ``attestation``: over the challenge nonce it names (checked to
        be ours, for this purpose, unexpired), or over the derived nonce."""
        if attestation is not None and attestation.nonce is not None:
            self.challenges.check(attestation.nonce, purpose, now)
            return self.policy.attestation.check(
                attestation, attestation.nonce, key, challenged=True
            )
        return self.policy.attestation.check(attestation, derived, key)

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
        purpose = Purpose.enroll(token_hash(token))
        binding = checked_binding(csr, purpose)
        verdict = self._attest(attestation, purpose, enrollment_nonce(token, key), key, now)
        cert, record = self.ca.sign(
            csr,
            node_id,
            validity=self.policy.validity,
            now=now,
            extensions=_vouched(binding, verdict),
        )
        # Spends the token, applies the node cap and commits the record atomically:
        # of racing requests with one token exactly one gets here.
        stored = self.ca.store.enroll(
            token_hash(token),
            record,
            now=now,
            max_nodes=self.policy.max_nodes,
            actor=actor,
            audit=_audit_detail(attestation, verdict),
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
        purpose = Purpose.rotate(current.serial)
        binding = checked_binding(csr, purpose)
        current_cert = x509.load_pem_x509_certificate(current.pem.encode())
        check_same_identity(current_cert, binding)
        derived = rotation_nonce(current.serial, key)
        verdict = self._attest(attestation, purpose, derived, key, now)
        check_same_platform(current_cert, verdict)
        cert, record = self.ca.sign(
            csr,
            current.node_id,
            validity=self.policy.validity,
            now=now,
            extensions=_vouched(binding, verdict),
        )
        stored = self.ca.store.rotate(
            current.serial,
            record,
            now=now,
            actor=actor,
            claimed_serial=claimed,
            audit=_audit_detail(attestation, verdict),
        )
        return _issued(cert, stored, verdict)


def checked_binding(
    csr: x509.CertificateSigningRequest, purpose: Purpose
) -> IdentityBinding | None:
    """The CSR's identity binding, once the identity key's signature over the CSR's key
    for this very request checks (:class:`CsrRejected` otherwise); None when it has
    none."""
    try:
        binding = identity_binding_of(csr)
        if binding is not None:
            binding.verify(csr.public_key(), purpose.binding)
    except ExtensionError as exc:
        raise CsrRejected(f"identity binding: {exc}") from None
    return binding


def check_same_identity(current: x509.Certificate, binding: IdentityBinding | None) -> None:
    """A certificate bound to a device identity rotates only with that identity's
    signature: a stolen TLS key cannot buy itself a successor."""
    try:
        old = identity_binding_of(current)
    except ExtensionError:
        old = None  # we issued it, so it parsed then; treat as unbound rather than fail
    if old is None:
        return
    if binding is None or binding.identity_spki != old.identity_spki:
        raise PolicyDenied(
            "this node's identity key is bound to its certificate: a rotation must carry"
            " that identity key's signature over the new key (docs/protocols/keys.md)"
        )


def check_same_platform(current: x509.Certificate, verdict: AttestationResult | None) -> None:
    """A certificate issued on a TPM quote renews only on a fresh quote by the same AK:
    no silent downgrade to an unattested certificate, and no move to another TPM
    (that is a new enrollment)."""
    try:
        before = attested_platform_of(current)
    except ExtensionError:
        before = None
    if before is None:
        return
    after = None
    for extension in () if verdict is None else verdict.extensions:
        if (
            isinstance(extension, x509.UnrecognizedExtension)
            and extension.oid == ATTESTED_PLATFORM_OID
        ):
            after = AttestedPlatform.from_der(extension.value)
    if after is None:
        raise AttestationFailed(
            "this certificate was issued on a TPM quote: its renewal needs a fresh one"
            " (rotate with --attest tpm:<TCTI>)"
        )
    if after.ak_public != before.ak_public:
        raise PolicyDenied("the quote is by another TPM's AK than the certificate's: enroll again")


def _vouched(
    binding: IdentityBinding | None, verdict: AttestationResult | None
) -> tuple[x509.ExtensionType, ...]:
    extensions: tuple[x509.ExtensionType, ...] = () if binding is None else (binding.extension(),)
    return extensions + (() if verdict is None else verdict.extensions)


def _audit_detail(
    attestation: Attestation | None, verdict: AttestationResult | None
) -> dict[str, object] | None:
    """What the audit keeps of an attestation: its type, its nonce and the verifier's
    claims (for a TPM quote, the evidence itself, re-checkable with tpm2_checkquote)."""
    if attestation is None or verdict is None:
        return None
    nonce = None if attestation.nonce is None else base64.b64encode(attestation.nonce).decode()
    return {"attestation": {"type": attestation.type, "nonce": nonce, **verdict.claims}}
