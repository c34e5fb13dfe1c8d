"""A node's side of TPM attestation: answer the CA's challenge with a quote.

    attester = TpmAttester("swtpm:host=127.0.0.1,port=2321")
    enroll_node(..., attester=attester)        # trustmesh.api.ca_client

Each call opens the TPM, makes sure the AK exists (a restricted P-256 signing key under
the EK, persisted at ``ak_handle``), asks the CA for a challenge with the AK and the EK
certificate, activates the credential the CA sent (when its policy ties AKs to EKs),
and quotes the PCRs the CA asked for over ``SHA-256(nonce || SHA-256(CSR SPKI))``.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from trustmesh.errors import ProtocolError
from trustmesh.tpm.evidence import PCR_COUNT, QuoteEvidence
from trustmesh.tpm.verify import qualifying_data

if TYPE_CHECKING:
    from trustmesh.tpm.device import TpmDevice

AK_HANDLE = 0x81010002  # where the AK persists (trustmesh.tpm.device makes it)
ATTESTATION_TYPE = "tpm_quote"
DEFAULT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
ATTEST_PREFIX = "tpm:"


class AttestError(ProtocolError):
    """An ``--attest`` value that is not ``tpm:<TCTI>``, or a CA challenge we cannot use."""


def parse_attest(spec: str) -> str:
    """The TCTI of an ``--attest tpm:<TCTI>`` value (:class:`AttestError` otherwise)."""
    if not spec.startswith(ATTEST_PREFIX) or len(spec) <= len(ATTEST_PREFIX):
        raise AttestError(
            f"--attest takes tpm:<TCTI>, e.g. tpm:swtpm:host=127.0.0.1,port=2321; got {spec!r}"
        )
    return spec[len(ATTEST_PREFIX) :]


@dataclasses.dataclass
class TpmAttester:
    tcti: str
    ak_handle: int = AK_HANDLE
    # The AK checked (or made) once: making sure of it recreates the EK, a slow
    # primary-key generation on a real TPM, so link quotes skip it after the first.
    _ak_ready: bool = dataclasses.field(default=False, compare=False, repr=False)

    @classmethod
    def from_spec(cls, spec: str) -> TpmAttester:
        return cls(parse_attest(spec))

    def _open(self) -> TpmDevice:
        # Imported here: tpm2-pytss is an optional extra (trustmesh[tpm]).
        from trustmesh.tpm.device import TpmDevice

        return TpmDevice.open(self.tcti)

    def __call__(
        self, ask: Callable[[dict[str, Any]], dict[str, Any]], csr_spki: bytes
    ) -> dict[str, str]:
        from trustmesh.tpm.device import TpmError

        with self._open() as tpm:
            ak_public = tpm.ensure_ak(self.ak_handle)
            self._ak_ready = True
            request = {"ak_public": _b64(ak_public)}
            try:
                ek_certificate = tpm.ek_certificate()
                request["ek_certificate"] = _b64(ek_certificate)
            except TpmError:
                ek_certificate = b""  # a TPM without one: a CA that needs it will say so
            answer = ask(request)
            nonce = _unb64(answer.get("nonce"), "nonce")
            credential = b""
            if answer.get("credential_blob"):
                credential = tpm.activate_credential(
                    self.ak_handle,
                    _unb64(answer["credential_blob"], "credential_blob"),
                    _unb64(answer.get("encrypted_secret"), "encrypted_secret"),
                )
            pcrs = _pcrs(answer.get("pcrs", DEFAULT_PCRS))
            evidence = tpm.quote(self.ak_handle, qualifying_data(nonce, csr_spki), pcrs)
        evidence = dataclasses.replace(
            evidence, ek_certificate=ek_certificate, credential=credential
        )
        return {
            "type": ATTESTATION_TYPE,
            "payload": _b64(evidence.to_bytes()),
            "nonce": _b64(nonce),
        }

    def quote(self, qualifying: bytes, pcrs: Sequence[int]) -> QuoteEvidence:
        """A quote over ``qualifying`` (a link's attestation)."""
        with self._open() as tpm:
            if not self._ak_ready:
                tpm.ensure_ak(self.ak_handle)
                self._ak_ready = True
            return tpm.quote(self.ak_handle, qualifying, pcrs)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise AttestError(f"the CA's challenge has no {name}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise AttestError(f"the CA's challenge {name} is not base64") from None


def _pcrs(value: object) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(i, int) and 0 <= i < PCR_COUNT for i in value
    ):
        raise AttestError("the CA's challenge names PCRs that are not 0..23")
    return tuple(sorted(set(value)))
