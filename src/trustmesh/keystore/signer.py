"""The one interface every key store offers to protocols."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from trustmesh.crypto.keys import KeyKind, PublicKey


@runtime_checkable
class Signer(Protocol):
    """A private key that may live in a file, a PKCS#11 token or a TPM.

    Protocols take a ``Signer``, never raw key bytes, so the key can move into
    hardware without a protocol noticing. ECDSA signatures are DER over SHA-256 of the
    data and low-S; Ed25519 signatures are the raw 64 bytes.
    """

    @property
    def kind(self) -> KeyKind:
        """The key's algorithm."""

    def public_key(self) -> PublicKey:
        """The public half, safe to share."""

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` (hashed with SHA-256 for ECDSA keys)."""

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte SHA-256 digest (ECDSA keys; others raise UnsupportedOperationError)."""

    def ecdh(self, peer: PublicKey) -> bytes:
        """Shared x-coordinate with ``peer`` (ECDSA curves; others raise an error)."""
