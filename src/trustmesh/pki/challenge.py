"""Attestation challenges: nonces the CA hands out and later recognises, keeping no state.

    POST /v1/enroll/challenge  ->  {"nonce": ..., "expires": ...}

A nonce is ``expiry (8 bytes) || random (16) || tag (16)``, the tag an HMAC under the
CA's challenge key over the expiry, the random part and what the nonce is *for*: the
enrollment token's hash, or the serial of the certificate being rotated. A nonce is
refused after its expiry (5 minutes), and for any other token or certificate. Nothing
is stored per challenge, so a flood of challenge requests costs the CA no memory.

Replays need no list of spent nonces: a token is spent once and a serial rotates once,
and the quote is bound to the CSR's key, so a nonce buys at most the one request it
was issued for.

The secret for TPM2_MakeCredential is derived the same way (from the nonce, the AK's
name and the EK certificate), so the CA can check what the node recovered without
remembering what it sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from trustmesh.pki.errors import AttestationFailed

CHALLENGE_TTL = timedelta(minutes=5)
NONCE_SIZE = 40
KEY_FILE = "challenge.secret"  # raw HMAC key, 0600; not a PEM key file


@dataclass(frozen=True)
class Purpose:
    """What a challenge is for: an enrollment with a token, or a rotation of a serial."""

    binding: bytes

    @classmethod
    def enroll(cls, token_hash: str) -> Purpose:
        return cls(b"enroll:" + token_hash.encode())

    @classmethod
    def rotate(cls, serial: int) -> Purpose:
        return cls(b"rotate:" + serial.to_bytes(20, "big"))


class Challenges:
    """Issues and checks nonces under one key (kept in the CA directory, so every
    process serving that CA recognises the others' nonces)."""

    def __init__(self, key: bytes, *, ttl: timedelta = CHALLENGE_TTL) -> None:
        if len(key) < 32:
            raise ValueError("a challenge key is at least 32 bytes")
        self._key = key
        self.ttl = ttl

    @classmethod
    def for_directory(cls, directory: Path) -> Challenges:
        """The key in ``directory/challenge.secret``, created (0600) on first use."""
        path = directory / KEY_FILE
        if not path.exists():
            # Written whole under a temporary name, then linked into place: a crash
            # leaves no empty key, and of two processes starting at once, one key wins.
            fd, name = tempfile.mkstemp(dir=directory, prefix=".challenge-")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(secrets.token_bytes(32))
                    out.flush()
                    os.fsync(out.fileno())
                with contextlib.suppress(FileExistsError):
                    os.link(name, path)
            finally:
                os.unlink(name)
        return cls(path.read_bytes())

    def issue(self, purpose: Purpose, now: datetime) -> tuple[bytes, datetime]:
        expires = now + self.ttl
        head = int(expires.timestamp()).to_bytes(8, "big") + secrets.token_bytes(16)
        return head + self._tag(head, purpose), expires

    def check(self, nonce: bytes, purpose: Purpose, now: datetime) -> None:
        """Raises :class:`AttestationFailed` unless we issued ``nonce`` for ``purpose``
        and it has not expired."""
        if len(nonce) != NONCE_SIZE:
            raise AttestationFailed("the attestation's nonce is not one this CA issued")
        head, tag = nonce[:24], nonce[24:]
        if not hmac.compare_digest(tag, self._tag(head, purpose)):
            raise AttestationFailed(
                "the attestation's nonce was not issued by this CA for this request"
            )
        if int.from_bytes(head[:8], "big") <= now.timestamp():
            raise AttestationFailed("the attestation's nonce has expired: ask for a new challenge")

    def credential_secret(self, nonce: bytes, ak_name: bytes, ek_certificate: bytes) -> bytes:
        """The secret a TPM2_MakeCredential blob carries for this nonce, AK and EK."""
        message = b"credential:" + nonce + hashlib.sha256(ak_name).digest()
        return hmac.digest(self._key, message + hashlib.sha256(ek_certificate).digest(), "sha256")

    def _tag(self, head: bytes, purpose: Purpose) -> bytes:
        return hmac.digest(self._key, b"challenge:" + head + purpose.binding, "sha256")[:16]
