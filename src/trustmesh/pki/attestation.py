"""Attestation at enrollment and rotation: a plug-in interface and the CA's policy.

A verifier checks one attestation type (a TPM quote, a platform key attestation). It
gets the attestation, a nonce that binds it to this very request, and the public key
of the CSR, and says whether the evidence holds for that key. Verifiers plug in from
code (``AttestationPolicy(verifiers=...)``) or from installed packages through the
``trustmesh.attestation`` entry-point group.

The nonce is either fetched from the CA (``POST /v1/enroll/challenge``, its value sent
back as the attestation's ``nonce``: trustmesh.pki.challenge), which a TPM quote needs,
or, for plug-ins that can do without a round trip, derived (docs/protocols/pki.md):

- enroll: ``SHA-256("trustmesh/enroll/v1" || SHA-256(token) || SHA-256(SPKI))``
- rotate: ``SHA-256("trustmesh/rotate/v1" || serial (16 bytes) || SHA-256(SPKI))``

where SPKI is the CSR's DER SubjectPublicKeyInfo. A token is single-use and a serial
rotates once per key, so a recorded attestation cannot be replayed for another request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from trustmesh.pki.errors import AttestationFailed, PkiError

ENTRY_POINT_GROUP = "trustmesh.attestation"
MAX_PAYLOAD = 64 * 1024


@dataclass(frozen=True)
class Attestation:
    """``{"type": str, "payload": base64, "nonce": base64}`` as sent by the node; the
    nonce (from a challenge) is optional."""

    type: str
    payload: bytes
    nonce: bytes | None = None

    @classmethod
    def from_json(cls, value: object) -> Attestation:
        """Parse the request's ``attestation`` object; :class:`PkiError` when malformed."""
        if not isinstance(value, dict):
            raise PkiError("attestation must be an object {type, payload}")
        kind, payload = value.get("type"), value.get("payload")
        if not isinstance(kind, str) or not kind or len(kind) > 64:
            raise PkiError("attestation.type must be a short string")
        if not isinstance(payload, str) or len(payload) > MAX_PAYLOAD * 2:
            raise PkiError("attestation.payload must be a base64 string")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise PkiError("attestation.payload is not valid base64") from None
        nonce = value.get("nonce")
        if nonce is None:
            return cls(kind, raw)
        if not isinstance(nonce, str) or len(nonce) > 256:
            raise PkiError("attestation.nonce must be the base64 nonce of a challenge")
        try:
            return cls(kind, raw, base64.b64decode(nonce, validate=True))
        except (binascii.Error, ValueError):
            raise PkiError("attestation.nonce is not valid base64") from None


@dataclass(frozen=True)
class AttestationResult:
    """A verifier's verdict; ``claims`` (what it learned, e.g. PCR values, and the
    evidence itself) is audited; ``extensions`` go into the certificate."""

    ok: bool
    detail: str
    claims: Mapping[str, object] = field(default_factory=dict)
    extensions: tuple[x509.ExtensionType, ...] = ()


class AttestationVerifier(Protocol):
    """Checks attestations of one ``type``. A verifier may set ``needs_challenge``
    (optional, default false): it is then given only nonces the CA issued (a TPM
    quote's qualifying data needs one)."""

    type: str

    def verify(
        self, attestation: Attestation, nonce: bytes, csr_public_key: CertificatePublicKeyTypes
    ) -> AttestationResult: ...


def _spki_digest(key: CertificatePublicKeyTypes) -> bytes:
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def enrollment_nonce(token: str, key: CertificatePublicKeyTypes) -> bytes:
    token_digest = hashlib.sha256(token.encode()).digest()
    return hashlib.sha256(b"trustmesh/enroll/v1" + token_digest + _spki_digest(key)).digest()


def rotation_nonce(serial: int, key: CertificatePublicKeyTypes) -> bytes:
    return hashlib.sha256(
        b"trustmesh/rotate/v1" + serial.to_bytes(16, "big") + _spki_digest(key)
    ).digest()


def installed_verifiers() -> dict[str, AttestationVerifier]:
    """Verifiers that installed packages register under ``trustmesh.attestation``: each
    entry point loads a class (or factory) whose instances have ``type`` and ``verify``."""
    found: dict[str, AttestationVerifier] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        verifier = entry.load()()
        found[verifier.type] = verifier
    return found


@dataclass(frozen=True)
class AttestationPolicy:
    """``none``: a node may send no attestation. ``required``: it must send one that a
    verifier accepts. Under either, an attestation that is sent must verify: evidence
    that is offered and false is worse than none."""

    mode: Literal["none", "required"] = "none"
    verifiers: Mapping[str, AttestationVerifier] = field(default_factory=dict)

    def challenge(
        self, nonce: bytes, request: Mapping[str, object], now: datetime
    ) -> dict[str, object]:
        """What verifiers add to a challenge's answer (a TPM verifier: the PCRs to quote,
        a credential to activate). A verifier offers this through an optional
        ``challenge`` method, so plug-ins without one need not change."""
        answer: dict[str, object] = {}
        for verifier in self.verifiers.values():
            extend = getattr(verifier, "challenge", None)
            if callable(extend):
                answer.update(extend(nonce, request, now))
        return answer

    def check(
        self,
        attestation: Attestation | None,
        nonce: bytes,
        key: CertificatePublicKeyTypes,
        *,
        challenged: bool = False,
    ) -> AttestationResult | None:
        """The verdict, or None when none was sent and none is required; raises
        :class:`AttestationFailed` otherwise. ``challenged``: ``nonce`` is a
        challenge's, already checked, rather than derived."""
        if attestation is None:
            if self.mode == "required":
                raise AttestationFailed("this CA requires an attestation; none was sent")
            return None
        verifier = self.verifiers.get(attestation.type)
        if verifier is None:
            known = ", ".join(sorted(self.verifiers)) or "none"
            raise AttestationFailed(
                f"no verifier for attestation type {attestation.type!r} (known: {known})"
            )
        if getattr(verifier, "needs_challenge", False) and not challenged:
            raise AttestationFailed(
                f"attestation {attestation.type!r} needs a nonce from POST /v1/enroll/challenge"
            )
        result = verifier.verify(attestation, nonce, key)
        if not result.ok:
            raise AttestationFailed(f"attestation {attestation.type!r} failed: {result.detail}")
        return result
