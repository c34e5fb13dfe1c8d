"""Keys in a TPM 2.0 (swtpm in tests), as a :class:`Signer`.

    signer = TpmSigner.generate("tpm:device:/dev/tpmrm0;handle=0x81000010", KeyKind.P256)
    signer.sign(data)        # in the TPM; DER, low-S, like every trustmesh ECDSA key

The key is made in the TPM under the SRK (the standard ECC P-256 storage key of the
owner hierarchy) and persisted at the URI's handle; its private half never leaves the
TPM. It may both sign (TPM2_Sign, ECDSA over SHA-256, given per call since the key's own
scheme is NULL) and agree (TPM2_ECDH_ZGen). A TPM has no secp256k1: P-256 only.

Key URIs are ``tpm:<TCTI>;handle=0x81000010``: the TCTI string as tpm2-tss and tpm2-tools
take it (``swtpm:host=127.0.0.1,port=2321``, ``device:/dev/tpmrm0``), and a handle in the
persistent range. The TPM work, its locking and its flushing live in
:class:`trustmesh.tpm.device.TpmDevice`; this module maps it onto the Signer interface.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from types import TracebackType

from trustmesh.crypto.keys import KeyKind, PublicKey, low_s_der, uncompressed_point
from trustmesh.errors import InvalidKeyError, KeyStoreError
from trustmesh.tpm.device import PERSISTENT_FIRST, PERSISTENT_LAST, TpmDevice, TpmError

MAX_URI = 2048
_HANDLE = re.compile(r"0x[0-9a-fA-F]{1,8}")


class TpmKeyError(TpmError, KeyStoreError):
    """A TPM key URI, TPM or key that cannot be used."""


@dataclass(frozen=True)
class TpmUri:
    """Where a TPM key is: the TCTI string of its TPM and its persistent handle."""

    tcti: str
    handle: int

    @classmethod
    def parse(cls, text: str) -> TpmUri:
        if not isinstance(text, str) or not text.startswith("tpm:"):
            raise TpmKeyError("a TPM key URI starts with tpm:")
        if len(text) > MAX_URI:
            raise TpmKeyError(f"a TPM key URI is at most {MAX_URI} characters")
        tcti, found, handle = text[len("tpm:") :].rpartition(";handle=")
        if not found:
            raise TpmKeyError("a TPM key URI ends with ;handle=0x81......")
        if not tcti:
            raise TpmKeyError("a TPM key URI names its TCTI: tpm:<TCTI>;handle=...")
        if ";handle=" in tcti:
            raise TpmKeyError("handle= is given twice")
        if ";" in tcti:
            # No TCTI configuration uses one, and keystore.uri cuts the TCTI at the first.
            raise TpmKeyError("a TCTI string has no ; in it")
        if not tcti.isprintable():
            raise TpmKeyError("the TCTI of a TPM key URI has no control characters")
        if not _HANDLE.fullmatch(handle):
            raise TpmKeyError(f"handle {handle[:20]!r} is not hex such as 0x81000010")
        value = int(handle, 16)
        if not PERSISTENT_FIRST <= value <= PERSISTENT_LAST:
            raise TpmKeyError(f"handle {handle} is not persistent (0x81000000-0x81ffffff)")
        return cls(tcti, value)

    def __str__(self) -> str:
        return f"tpm:{self.tcti};handle=0x{self.handle:08x}"


class TpmSigner:
    """A P-256 key persisted in a TPM. Thread-safe: every call is one command sequence
    under the TPM's lock (see :class:`TpmDevice`)."""

    def __init__(self, device: TpmDevice, handle: int, public: PublicKey) -> None:
        self._device = device
        self._handle = handle
        self._public = public

    @property
    def kind(self) -> KeyKind:
        return KeyKind.P256

    @property
    def handle(self) -> int:
        return self._handle

    @classmethod
    def open(cls, uri: str) -> TpmSigner:
        """The key ``uri`` names (raises :class:`TpmKeyError`)."""
        parsed = TpmUri.parse(uri)
        device = _open_device(parsed)
        try:
            point = device.signing_key(parsed.handle)
            return cls(device, parsed.handle, _public_key(point))
        except TpmError as exc:
            device.close()
            raise TpmKeyError(f"cannot use the key {parsed}: {exc}") from None

    @classmethod
    def generate(cls, uri: str, kind: KeyKind = KeyKind.P256) -> TpmSigner:
        """A new key made in the TPM and persisted at the URI's handle (which must be free)."""
        if kind != KeyKind.P256:
            raise TpmKeyError(f"a TPM key is P-256, not {kind}")
        parsed = TpmUri.parse(uri)
        device = _open_device(parsed)
        try:
            point = device.create_signing_key(parsed.handle)
            return cls(device, parsed.handle, _public_key(point))
        except TpmError as exc:
            device.close()
            raise TpmKeyError(f"cannot make the key {parsed}: {exc}") from None

    @staticmethod
    def delete(uri: str) -> None:
        """Evict the key ``uri`` names; only a signing key, never an AK or EK by mistake."""
        parsed = TpmUri.parse(uri)
        with _open_device(parsed) as device:
            try:
                device.signing_key(parsed.handle)
                device.evict(parsed.handle)
            except TpmError as exc:
                raise TpmKeyError(f"cannot delete the key {parsed}: {exc}") from None

    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return self.sign_digest(hashlib.sha256(data).digest())

    def sign_digest(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        try:
            r, s = self._device.sign_digest(self._handle, digest)
        except TpmError as exc:
            raise TpmKeyError(str(exc)) from None
        return low_s_der(KeyKind.P256, r, s)

    def ecdh(self, peer: PublicKey) -> bytes:
        if peer.kind != KeyKind.P256:
            raise TpmKeyError(f"ECDH needs a P-256 peer key, got {peer.kind}")
        try:
            return self._device.ecdh_zgen(self._handle, uncompressed_point(peer))
        except TpmError as exc:
            raise TpmKeyError(str(exc)) from None

    def close(self) -> None:
        self._device.close()

    def __enter__(self) -> TpmSigner:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def _open_device(uri: TpmUri) -> TpmDevice:
    try:
        return TpmDevice.open(uri.tcti)
    except TpmError as exc:
        raise TpmKeyError(str(exc)) from None


def _public_key(point: bytes) -> PublicKey:
    try:
        return PublicKey.from_bytes(KeyKind.P256, point)
    except InvalidKeyError as exc:
        raise TpmKeyError(f"the TPM's key is not a P-256 point: {exc}") from None
