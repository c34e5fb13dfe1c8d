"""Certificate revocation by outpoint, behind a pluggable checker.

BRC-52 revokes a certificate by spending its revocation outpoint on chain. trustmesh
needs no blockchain: :class:`LocalRevocationRegistry` is a registry of revoked outpoints
(in memory, or a SQLite file shared by the CLI and a server). Deployments that watch a
chain plug in their own :class:`RevocationChecker`.

Revocation must be able to fail: a peer with no checker refuses every revocable
certificate (``RevocationUncheckedError``). Accepting them unchecked takes an explicit
:class:`NoRevocationCheck` (``--no-revocation-check`` on the command line).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from trustmesh.brc103.certificates import Certificate, is_revocable, parse_outpoint
from trustmesh.brc103.errors import CertificateRevokedError, RevocationUncheckedError
from trustmesh.sqlitedb import open_database, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revoked (
    outpoint TEXT PRIMARY KEY,
    revoked_at_ms INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
"""


@runtime_checkable
class RevocationChecker(Protocol):
    def is_revoked(self, outpoint: str) -> bool:
        """True when the outpoint ``"<txid>.<index>"`` is spent, i.e. revoked."""


def check_revocation(certificate: Certificate, checker: RevocationChecker | None) -> None:
    """Refuse ``certificate`` if it is revoked, or if it is revocable and there is no
    ``checker`` to ask. A certificate whose outpoint is the 36 zero bytes passes."""
    outpoint = certificate.revocation_outpoint
    if not is_revocable(outpoint):
        return
    if checker is None:
        raise RevocationUncheckedError(
            f"certificate {certificate.serial_number} can be revoked ({outpoint}) and no "
            "revocation source is configured (configure one, or disable the check)"
        )
    if checker.is_revoked(outpoint):
        raise CertificateRevokedError(
            f"certificate {certificate.serial_number} is revoked ({outpoint})"
        )


class NoRevocationCheck:
    """The operator's explicit choice not to check revocation: every outpoint counts as
    unspent. Whoever configures it should say so in its log (the CLI does)."""

    def is_revoked(self, outpoint: str) -> bool:
        return False


class LocalRevocationRegistry:
    """Revoked outpoints in SQLite (``path``) or in memory (no path)."""

    def __init__(self, path: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._memory: set[str] | None = None
        self._db: sqlite3.Connection | None = None
        if path is None:
            self._memory = set()
        else:
            self._db = open_database(path, _SCHEMA, synchronous="FULL", busy_timeout=5.0)

    def revoke(self, outpoint: str, *, now_ms: int = 0, reason: str = "") -> None:
        parse_outpoint(outpoint)  # refuse what could never match
        if self._memory is not None:
            self._memory.add(outpoint)
            return
        assert self._db is not None
        with self._lock, transaction(self._db) as db:
            db.execute(
                "INSERT OR IGNORE INTO revoked(outpoint, revoked_at_ms, reason) VALUES (?, ?, ?)",
                (outpoint, now_ms, reason),
            )

    def is_revoked(self, outpoint: str) -> bool:
        if self._memory is not None:
            return outpoint in self._memory
        assert self._db is not None
        with self._lock:
            row = self._db.execute("SELECT 1 FROM revoked WHERE outpoint = ?", (outpoint,))
            return row.fetchone() is not None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
