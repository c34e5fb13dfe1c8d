"""The one error hierarchy of trustmesh.

Every package extends :class:`ProtocolError`. A parser never lets ``IndexError``,
``KeyError``, ``UnicodeDecodeError`` or a library's own exception escape: bad input
becomes one of these, saying what was wrong and, where it helps, at which offset.
"""

from __future__ import annotations

from pathlib import Path


class ProtocolError(Exception):
    """Root of every error trustmesh raises on purpose."""


# --- decoding -------------------------------------------------------------------------


class DecodeError(ProtocolError):
    """Input bytes or text could not be decoded.

    ``offset`` is the byte position where decoding failed, when it is known. A stream
    decoder puts the items it completed before the bad one in ``frames``, so that a
    protocol can deliver what it accepted before it closes.
    """

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        self.offset = offset
        self.frames: tuple[bytes, ...] = ()
        super().__init__(message if offset is None else f"{message} (at byte {offset})")


class TruncatedError(DecodeError):
    """The input ended before the value it started was complete."""


class OversizeError(DecodeError):
    """A value or frame is larger than the limit in force."""


class NonCanonicalError(DecodeError):
    """The value decodes, but not from its one canonical encoding (e.g. a padded varint)."""


class TrailingDataError(DecodeError):
    """Bytes were left over after a value that must fill its input exactly."""


class UnsupportedError(DecodeError):
    """The input names a type, code or version that this implementation does not support."""


# --- cryptography ---------------------------------------------------------------------


class CryptoError(ProtocolError):
    """A cryptographic operation failed or was refused."""


class InvalidKeyError(CryptoError):
    """Key bytes are malformed, off the curve, or of the wrong type."""


class InvalidSignatureError(CryptoError):
    """A signature did not verify."""


class AuthenticationError(CryptoError):
    """An AEAD record failed authentication: it was forged, corrupted or replayed."""


class NonceExhaustedError(CryptoError):
    """A key has sealed as many records as its nonce space allows: rekey before sending more."""


class UnsupportedOperationError(CryptoError):
    """The key type cannot do this (for example ECDH with an Ed25519 key)."""


# --- key storage ----------------------------------------------------------------------


class KeyStoreError(ProtocolError):
    """A key could not be loaded from, or saved to, its store."""


class KeyFilePermissionError(KeyStoreError):
    """A private key file is readable or writable by group or others."""


class PassphraseError(KeyStoreError):
    """The passphrase is missing or wrong for an encrypted key file."""


class PassphraseFileError(PassphraseError):
    """A passphrase file (``--passphrase-file``, a systemd credential) is missing,
    unreadable, empty, or readable by others; ``path`` names it."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


# --- connections ----------------------------------------------------------------------


class ConnectionClosedError(ProtocolError):
    """The connection is closed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"connection closed: {reason}")
