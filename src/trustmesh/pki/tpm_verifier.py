"""The CA's TPM quote verifier: the ``tpm_quote`` attestation type.

It plugs into :class:`trustmesh.pki.attestation.AttestationPolicy` and applies the
policy file of ``ca serve --attestation-policy FILE`` (trustmesh.tpm.policy):

1. The challenge (``POST /v1/enroll/challenge``) tells the node which PCRs to quote.
   When the policy ties AKs to EKs, the node sends its AK and EK certificate with the
   challenge request; the CA checks the EK certificate against the policy's EK CAs and
   answers a TPM2_MakeCredential blob for that AK, whose secret is derived from the
   nonce (trustmesh.pki.challenge), so the CA stores nothing.
2. The enrollment or rotation carries the quote over ``SHA-256(nonce || SHA-256(CSR
   SPKI))`` (trustmesh.tpm.verify checks the AK's attributes, the signature, the
   qualifying data and the PCRs against the device classes), and, under ``require_ek``,
   the EK certificate and the recovered secret: only the TPM that holds both that EK
   and that AK can recover it.

A quote that passes puts an attested-platform extension (the AK and the PCR digest)
into the certificate, against which peers check link attestations; the audit log
keeps the evidence so that anyone can re-check it with ``tpm2_checkquote``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from trustmesh.clock import Clock
from trustmesh.errors import ProtocolError
from trustmesh.pki.attestation import Attestation, AttestationResult
from trustmesh.pki.challenge import Challenges
from trustmesh.pki.errors import PkiError
from trustmesh.pki.extensions import AttestedPlatform, spki_der
from trustmesh.tpm import structs
from trustmesh.tpm.credential import make_credential, verify_ek_certificate
from trustmesh.tpm.evidence import EvidenceError, QuoteEvidence
from trustmesh.tpm.policy import AttestationPolicyFile
from trustmesh.tpm.verify import QuoteRejected, qualifying_data, verify_quote

TPM_QUOTE = "tpm_quote"
MAX_REQUEST_FIELD = 8 * 1024


class TpmQuoteVerifier:
    type = TPM_QUOTE
    needs_challenge = True

    def __init__(self, policy: AttestationPolicyFile, challenges: Challenges, clock: Clock):
        self.policy = policy
        self._challenges = challenges
        self._clock = clock

    def challenge(
        self, nonce: bytes, request: Mapping[str, object], now: datetime
    ) -> dict[str, object]:
        """The PCRs to quote and, under ``require_ek``, the credential to activate."""
        answer: dict[str, object] = {
            "pcrs": list(self.policy.pcrs),
            "require_ek": self.policy.require_ek,
        }
        if not self.policy.require_ek:
            return answer
        ak_public = _request_field(request, "ak_public")
        ek_der = _request_field(request, "ek_certificate")
        if ak_public is None or ek_der is None:
            raise PkiError(
                "this CA ties attestation keys to EK certificates: send ak_public and"
                " ek_certificate with the challenge request"
            )
        try:
            ek_key = verify_ek_certificate(ek_der, self.policy.ek_cas, now).public_key()
            if not isinstance(ek_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                raise PkiError("the EK certificate holds neither an RSA nor an EC key")
            ak_name = structs.parse_public(ak_public).name
            secret = self._challenges.credential_secret(nonce, ak_name, ek_der)
            blob, encrypted = make_credential(ek_key, ak_name, secret)
        except ProtocolError as exc:
            raise PkiError(f"cannot make a credential for this AK and EK: {exc}") from None
        answer["credential_blob"] = base64.b64encode(blob).decode()
        answer["encrypted_secret"] = base64.b64encode(encrypted).decode()
        return answer

    def verify(
        self, attestation: Attestation, nonce: bytes, csr_public_key: CertificatePublicKeyTypes
    ) -> AttestationResult:
        try:
            evidence = QuoteEvidence.from_bytes(attestation.payload)
        except EvidenceError as exc:
            return AttestationResult(False, str(exc))
        expected = qualifying_data(nonce, spki_der(csr_public_key))
        try:
            claims = verify_quote(evidence, expected, self.policy)
        except QuoteRejected as exc:
            return AttestationResult(False, exc.reason)
        if self.policy.require_ek:
            refusal = self._check_ek(evidence, nonce, claims.ak_name)
            if refusal is not None:
                return AttestationResult(False, refusal)
        platform = AttestedPlatform(
            evidence.ak_public,
            claims.pcr_digest,
            claims.pcr_selection,
            claims.device_class or "",
            claims.clock,
        )
        detail = f"TPM quote by AK {claims.ak_name.hex()[:16]}.. ({claims.device_class})"
        audit = {
            **claims.to_json(),
            "evidence": {
                "quote": _b64(evidence.quote),
                "signature": _b64(evidence.signature),
                "ak_public": _b64(evidence.ak_public),
                "qualifying_data": expected.hex(),
                "ek_certificate": _b64(evidence.ek_certificate) or None,
            },
        }
        return AttestationResult(True, detail, audit, (platform.extension(),))

    def _check_ek(self, evidence: QuoteEvidence, nonce: bytes, ak_name: bytes) -> str | None:
        if not evidence.ek_certificate or not evidence.credential:
            return (
                "this CA ties the AK to an EK: the EK certificate or the activated"
                " credential is missing"
            )
        try:
            verify_ek_certificate(evidence.ek_certificate, self.policy.ek_cas, self._clock.now())
        except ProtocolError as exc:
            return f"EK certificate: {exc}"
        secret = self._challenges.credential_secret(nonce, ak_name, evidence.ek_certificate)
        if not hmac.compare_digest(secret, evidence.credential):
            return "the AK is not tied to the EK: the credential it returned is not the one sent"
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode() if data else ""


def _request_field(request: Mapping[str, object], name: str) -> bytes | None:
    value = request.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_REQUEST_FIELD:
        raise PkiError(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PkiError(f"{name} is not base64") from None
