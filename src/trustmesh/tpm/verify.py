"""Checking a TPM quote, in pure Python, as the CA does at enrollment and rotation.

:func:`verify_quote` takes the evidence as the node's TPM produced it and either
returns what the quote proves (:class:`QuoteClaims`) or raises :class:`QuoteRejected`
naming the first check that failed. The checks, in order:

1. the AK is an ECC NIST P-256 key with nameAlg SHA-256 and is a restricted signing
   key (restricted, sign, fixedTPM, fixedParent, sensitiveDataOrigin; not decrypt).
   A TPM signs anything with an unrestricted key, a forged TPMS_ATTEST included; only
   a restricted key proves the TPM built the structure itself;
2. the TPMS_ATTEST has TPM_GENERATED_VALUE and is a quote;
3. the signature is ECDSA with SHA-256 over the TPMS_ATTEST bytes, by the AK;
4. extraData is the qualifying data the CA expects (a fresh nonce bound to the CSR key);
5. the PCR values sent are exactly those the quote selects in the SHA-256 bank, and
   SHA-256 of their concatenation in index order is the quote's pcrDigest;
6. with a policy: the selection is the policy's, and the values fit a device class.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from trustmesh.errors import DecodeError, InvalidKeyError, ProtocolError
from trustmesh.tpm import structs
from trustmesh.tpm.evidence import QuoteEvidence
from trustmesh.tpm.policy import PCR_COUNT, PcrPolicy

AK_REQUIRED = {
    structs.TPMA_OBJECT_RESTRICTED: "restricted",
    structs.TPMA_OBJECT_SIGN: "sign",
    structs.TPMA_OBJECT_FIXEDTPM: "fixedTPM",
    structs.TPMA_OBJECT_FIXEDPARENT: "fixedParent",
    structs.TPMA_OBJECT_SENSITIVEDATAORIGIN: "sensitiveDataOrigin",
}


class QuoteRejected(ProtocolError):
    """The quote does not prove what it claims; ``reason`` says which check failed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"quote rejected: {reason}")


@dataclass(frozen=True)
class QuoteClaims:
    """What a verified quote proves, for the CA's decision and its audit log."""

    ak_name: bytes
    pcr_selection: tuple[int, ...]  # SHA-256 bank, ascending
    pcr_values: Mapping[int, bytes]
    pcr_digest: bytes
    device_class: str | None  # None when no policy was applied
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int

    def to_json(self) -> dict[str, object]:
        return {
            "ak_name": self.ak_name.hex(),
            "pcr_bank": "sha256",
            "pcr_selection": list(self.pcr_selection),
            "pcr_values": {str(i): self.pcr_values[i].hex() for i in self.pcr_selection},
            "pcr_digest": self.pcr_digest.hex(),
            "device_class": self.device_class,
            "clock": self.clock,
            "reset_count": self.reset_count,
            "restart_count": self.restart_count,
            "safe": self.safe,
            # A 64-bit vendor value: hex, so no JSON reader rounds it.
            "firmware_version": f"{self.firmware_version:016x}",
        }


def qualifying_data(nonce: bytes, csr_public_key_der: bytes) -> bytes:
    """The quote's extraData: SHA-256(nonce || SHA-256(CSR SubjectPublicKeyInfo DER)),
    binding the quote to both the CA's fresh nonce and the key being certified."""
    inner = hashlib.sha256(csr_public_key_der).digest()
    return hashlib.sha256(nonce + inner).digest()


def verify_quote(
    evidence: QuoteEvidence, qualifying_data: bytes, policy: PcrPolicy | None = None
) -> QuoteClaims:
    """Check ``evidence`` (see the module docstring); :class:`QuoteRejected` if any
    check fails."""
    ak, key = _check_ak(evidence.ak_public)
    try:
        attest = structs.parse_attest(evidence.quote)
    except DecodeError as exc:
        raise QuoteRejected(f"quote: {exc}") from None
    _check_signature(evidence, key)
    if not hmac.compare_digest(attest.extra_data, qualifying_data):
        raise QuoteRejected(
            "extraData is not the expected qualifying data (a replayed quote, or one "
            "bound to another nonce or CSR key)"
        )
    selection = _quoted_sha256_pcrs(attest.quote.pcr_select)
    values = _check_pcr_values(evidence.pcrs, selection, attest.quote.pcr_digest)
    device_class = None
    if policy is not None:
        device_class = _apply_policy(policy, selection, values)
    info = attest.clock_info
    return QuoteClaims(
        ak_name=ak.name,
        pcr_selection=selection,
        pcr_values=values,
        pcr_digest=attest.quote.pcr_digest,
        device_class=device_class,
        clock=info.clock,
        reset_count=info.reset_count,
        restart_count=info.restart_count,
        safe=info.safe,
        firmware_version=attest.firmware_version,
    )


def _check_ak(ak_public: bytes) -> tuple[structs.TpmtPublic, ec.EllipticCurvePublicKey]:
    try:
        ak = structs.parse_public(ak_public)
    except DecodeError as exc:
        raise QuoteRejected(f"AK public: {exc}") from None
    params = ak.parameters
    if not isinstance(params, structs.EccParms) or params.curve != structs.TPM_ECC_NIST_P256:
        raise QuoteRejected("the AK is not an ECC NIST P-256 key")
    if ak.name_alg != structs.TPM_ALG_SHA256:
        raise QuoteRejected(f"the AK's nameAlg is 0x{ak.name_alg:04x}, not SHA-256")
    missing = [name for bit, name in AK_REQUIRED.items() if not ak.has(bit)]
    if missing:
        raise QuoteRejected(
            f"the AK (objectAttributes 0x{ak.object_attributes:08x}) is not a restricted "
            f"signing key: {', '.join(missing)} not set"
        )
    if ak.has(structs.TPMA_OBJECT_DECRYPT):
        raise QuoteRejected("the AK has the decrypt attribute; an AK only signs")
    scheme = params.scheme
    if scheme.scheme != structs.TPM_ALG_NULL and (
        scheme.scheme != structs.TPM_ALG_ECDSA or scheme.hash_alg != structs.TPM_ALG_SHA256
    ):
        raise QuoteRejected(
            f"the AK's scheme is 0x{scheme.scheme:04x}/0x{scheme.hash_alg:04x}, not ECDSA/SHA-256"
        )
    try:
        key = structs.public_key_of(ak)
    except (DecodeError, InvalidKeyError) as exc:
        raise QuoteRejected(f"AK public: {exc}") from None
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return ak, key


def _check_signature(evidence: QuoteEvidence, key: ec.EllipticCurvePublicKey) -> None:
    try:
        sig = structs.parse_signature(evidence.signature)
    except DecodeError as exc:
        raise QuoteRejected(f"signature: {exc}") from None
    if sig.sig_alg != structs.TPM_ALG_ECDSA or sig.hash_alg != structs.TPM_ALG_SHA256:
        raise QuoteRejected(
            f"signature is 0x{sig.sig_alg:04x}/0x{sig.hash_alg:04x}, not ECDSA/SHA-256"
        )
    der = encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))
    try:
        key.verify(der, evidence.quote, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise QuoteRejected("the signature over the quote does not verify with the AK") from None


def _quoted_sha256_pcrs(selections: tuple[structs.PcrSelection, ...]) -> tuple[int, ...]:
    indices: tuple[int, ...] | None = None
    for sel in selections:
        chosen = sel.indices
        if not chosen:
            continue  # an empty bitmap selects nothing, whatever its bank
        if sel.hash_alg != structs.TPM_ALG_SHA256:
            raise QuoteRejected(
                f"the quote selects PCRs in bank 0x{sel.hash_alg:04x}; only SHA-256 is checked"
            )
        if indices is not None:
            raise QuoteRejected("the quote selects the SHA-256 bank twice")
        indices = chosen
    if not indices:
        raise QuoteRejected("the quote covers no SHA-256 PCR")
    if indices[-1] >= PCR_COUNT:
        raise QuoteRejected(f"the quote selects PCR {indices[-1]}, beyond 0..23")
    return indices


def _check_pcr_values(
    sent: Mapping[int, bytes], selection: tuple[int, ...], pcr_digest: bytes
) -> dict[int, bytes]:
    if set(sent) != set(selection):
        raise QuoteRejected(
            f"the evidence has PCRs {sorted(sent)}, the quote selects {list(selection)}"
        )
    for index in selection:
        if len(sent[index]) != hashlib.sha256().digest_size:
            raise QuoteRejected(f"PCR {index} in the evidence is not 32 bytes")
    values = {index: bytes(sent[index]) for index in selection}
    digest = hashlib.sha256(b"".join(values[i] for i in selection)).digest()
    if not hmac.compare_digest(digest, pcr_digest):
        raise QuoteRejected("the evidence's PCR values do not hash to the quote's pcrDigest")
    return values


def _apply_policy(policy: PcrPolicy, selection: tuple[int, ...], values: dict[int, bytes]) -> str:
    if tuple(selection) != tuple(sorted(policy.pcrs)):
        raise QuoteRejected(
            f"the quote selects PCRs {list(selection)}, the policy requires {list(policy.pcrs)}"
        )
    name = policy.classify(values)
    if name is None:
        raise QuoteRejected(f"PCR values match no device class: {_mismatches(policy, values)}")
    return name


def _mismatches(policy: PcrPolicy, values: Mapping[int, bytes]) -> str:
    parts = []
    for device_class in policy.device_classes:
        wrong = [
            (i, values.get(i))
            for i, allowed in sorted(device_class.pcrs.items())
            if values.get(i) not in allowed
        ]
        shown = ", ".join(
            f"PCR {i} is {v.hex()[:16]}…" if v is not None else f"PCR {i} is not quoted"
            for i, v in wrong[:3]
        )
        parts.append(f"{device_class.name!r}: {shown}")
    return "; ".join(parts) or "the policy has no device class"
