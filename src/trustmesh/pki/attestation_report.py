"""A node reports a peer's failing link quote; the CA decides (zero-trust-mesh.md 5.1).

    POST /v1/attestation/report  {"serial": hex, "evidence": {...quote...}}   (mTLS)

The reporter's word counts for nothing: a node could report anyone. The quote itself
is the evidence. It must be signed by the AK the CA certified in the peer's certificate
(its attested-platform extension), by a restricted key (so the TPM made the quote, over
its real PCRs), and be newer than the enrollment's quote (the TPM clock is later), so a
quote from before the peer was enrolled, or replayed from long ago, proves nothing.
Then the CA applies its own policy: PCR values no device class admits (or, with no
policy file, a PCR digest other than the enrolled one) revoke the peer's certificates
(every one of its node_id), reason privilegeWithdrawn, with the evidence in the audit
log. A quote that passes revokes nothing.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from trustmesh.errors import DecodeError
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.errors import PkiError, UnknownCertificate
from trustmesh.pki.extensions import ExtensionError, attested_platform_of
from trustmesh.pki.store import IssuedCertificate
from trustmesh.tpm import structs
from trustmesh.tpm.evidence import QuoteEvidence
from trustmesh.tpm.policy import PcrPolicy
from trustmesh.tpm.verify import QuoteRejected, verify_quote

REASON = "privilegeWithdrawn"


@dataclass(frozen=True)
class ReportVerdict:
    serial: int
    revoked: tuple[int, ...]  # serials newly revoked (none: the quote passes, or done already)
    verdict: str  # "revoked", "passes" or "already revoked"
    detail: str

    def to_json(self) -> dict[str, object]:
        return {
            "serial": format(self.serial, "x"),
            "verdict": self.verdict,
            "revoked": [format(s, "x") for s in self.revoked],
            "detail": self.detail,
        }


def judge_report(
    ca: CertificateAuthority,
    reporter: IssuedCertificate,
    serial: int,
    evidence: QuoteEvidence,
    policy: PcrPolicy | None,
    now: datetime,
) -> ReportVerdict:
    """Check a reported quote of certificate ``serial``; revoke it if the quote shows
    a platform the CA refuses. :class:`PkiError` when the report proves nothing."""
    record = ca.store.get(serial)
    if record is None:
        raise UnknownCertificate(f"no certificate with serial {serial:x}")
    if record.revoked_at is not None:
        return ReportVerdict(serial, (), "already revoked", record.reason or "")
    try:
        platform = attested_platform_of(x509.load_pem_x509_certificate(record.pem.encode()))
    except ExtensionError as exc:
        raise PkiError(f"certificate {serial:x}: {exc}") from None
    if platform is None:
        raise PkiError(f"certificate {serial:x} names no attested platform: nothing to check")
    if evidence.ak_public != platform.ak_public:
        raise PkiError("the quote is not by the AK this CA certified for that certificate")
    try:
        quoted = structs.parse_attest(evidence.quote)
        claims = verify_quote(evidence, quoted.extra_data)
    except (DecodeError, QuoteRejected) as exc:
        raise PkiError(f"the quote proves nothing: {exc}") from None
    if claims.clock <= platform.clock:
        raise PkiError("the quote is older than the enrollment's: it proves nothing now")
    if policy is not None:
        if tuple(claims.pcr_selection) != tuple(policy.pcrs):
            raise PkiError("the quote does not cover the PCRs of this CA's policy")
        refused = policy.classify(claims.pcr_values) is None
        why = "PCR values that no device class of this CA's policy admits"
    else:
        refused = claims.pcr_digest != platform.pcr_digest
        why = "PCRs changed since enrollment"
    if not refused:
        return ReportVerdict(serial, (), "passes", "the quote satisfies this CA's policy")
    # Every certificate of the node: a successor issued in the overlap is on the same
    # platform, and a report often names the older serial of a long-lived link.
    actor = f"attestation-report:{reporter.node_id}"
    revoked = ca.store.revoke_node(record.node_id, now, REASON, actor=actor) or []
    ca.store.audit_event(
        "attestation-failure",
        detail={
            "serial": format(serial, "x"),
            "node_id": record.node_id,
            "reported_by": reporter.node_id,
            "why": why,
            "claims": claims.to_json(),
            "evidence": {
                "quote": base64.b64encode(evidence.quote).decode(),
                "signature": base64.b64encode(evidence.signature).decode(),
                "ak_public": base64.b64encode(evidence.ak_public).decode(),
                "qualifying_data": quoted.extra_data.hex(),
            },
        },
        now=now,
        actor=actor,
    )
    return ReportVerdict(serial, tuple(revoked), "revoked", why)
