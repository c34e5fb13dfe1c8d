"""A TPM quote as it travels: the bytes the TPM made, in the TPM's own encoding.

The fields are the files tpm2-tools reads, so anyone can re-check a quote with
``tpm2_checkquote -u ak_public -m quote -s signature -q <qualifying data>``:

- ``quote``: the marshalled TPMS_ATTEST (what ``tpm2_quote -m`` writes);
- ``signature``: the marshalled TPMT_SIGNATURE (``tpm2_quote -s``);
- ``ak_public``: the AK's marshalled TPM2B_PUBLIC (``tpm2_createak -u``);
- ``pcrs``: the values of the quoted PCRs in the SHA-256 bank, which the verifier
  hashes and compares with the quote's digest before it compares them with policy.

Enrollment adds what ties the AK to a TPM: the EK certificate (DER) and the secret
the node recovered with TPM2_ActivateCredential.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from trustmesh.errors import DecodeError

MAX_EVIDENCE = 32 * 1024
MAX_FIELD = 8 * 1024
PCR_COUNT = 24


class EvidenceError(DecodeError):
    """Evidence that does not parse: not JSON, a field missing, or not base64."""


@dataclass(frozen=True)
class QuoteEvidence:
    quote: bytes
    signature: bytes
    ak_public: bytes
    pcrs: Mapping[int, bytes]  # PCR index -> SHA-256 bank value
    ek_certificate: bytes = b""  # DER; empty when not sent
    credential: bytes = b""  # the secret TPM2_ActivateCredential recovered; empty: none
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "quote": _b64(self.quote),
            "signature": _b64(self.signature),
            "ak_public": _b64(self.ak_public),
            "pcrs": {"sha256": {str(i): v.hex() for i, v in sorted(self.pcrs.items())}},
        }
        if self.ek_certificate:
            out["ek_certificate"] = _b64(self.ek_certificate)
        if self.credential:
            out["credential"] = _b64(self.credential)
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> QuoteEvidence:
        if len(raw) > MAX_EVIDENCE:
            raise EvidenceError(f"evidence is over {MAX_EVIDENCE} bytes")
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise EvidenceError("evidence is not JSON") from None
        return cls.from_json(value)

    @classmethod
    def from_json(cls, value: object) -> QuoteEvidence:
        if not isinstance(value, dict):
            raise EvidenceError("evidence is a JSON object")
        pcrs = value.get("pcrs")
        bank = pcrs.get("sha256") if isinstance(pcrs, dict) else None
        if not isinstance(bank, dict) or len(bank) > PCR_COUNT:
            raise EvidenceError("evidence.pcrs is {sha256: {index: hex}} with at most 24 PCRs")
        values: dict[int, bytes] = {}
        for index, digest in bank.items():
            # ASCII digits only: "²".isdigit() holds, and int("²") raises.
            if not (
                isinstance(index, str)
                and index.isascii()
                and index.isdigit()
                and int(index) < PCR_COUNT
            ):
                raise EvidenceError(f"PCR index {str(index)[:8]!r} is not 0..23")
            if not isinstance(digest, str) or len(digest) != 64:
                raise EvidenceError(f"PCR {index} is not 32 bytes of hex")
            try:
                values[int(index)] = bytes.fromhex(digest)
            except ValueError:
                raise EvidenceError(f"PCR {index} is not hex") from None
        return cls(
            quote=_field(value, "quote"),
            signature=_field(value, "signature"),
            ak_public=_field(value, "ak_public"),
            pcrs=values,
            ek_certificate=_field(value, "ek_certificate", required=False),
            credential=_field(value, "credential", required=False),
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _field(value: dict[str, object], name: str, *, required: bool = True) -> bytes:
    text = value.get(name)
    if text is None and not required:
        return b""
    if not isinstance(text, str) or len(text) > MAX_FIELD * 2:
        raise EvidenceError(f"evidence.{name} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceError(f"evidence.{name} is not base64") from None
