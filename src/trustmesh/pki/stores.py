"""Where a CA keeps its records: ``ca.db`` in its directory (SQLite, the default), or a
PostgreSQL database that several ``ca serve`` replicas share (``--db postgresql://...``,
or ``$TRUSTMESH_CA_DB``; the password from ``PGPASSFILE``, never the command line)."""

from __future__ import annotations

from pathlib import Path

from trustmesh.keystore.filestore import write_durably
from trustmesh.pki.errors import PkiError, StoreUnavailable
from trustmesh.pki.store import CaStore, SqliteStore

DB_ENV = "TRUSTMESH_CA_DB"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# In a CA directory whose records are in PostgreSQL (`ca init --db`, `ca migrate`): a
# command without --db is refused instead of opening (or creating) D/ca.db, whose
# records would be stale or empty. It names no database: the URI may hold a password.
MOVED_MARKER = "records-in-postgresql"


def open_store(directory: Path, db: str | None) -> CaStore:
    """The store of the CA in ``directory``: the PostgreSQL database ``db`` names, or
    ``directory/ca.db`` when ``db`` is None or empty (refused when the CA's records
    moved to PostgreSQL)."""
    if not db:
        if (directory / MOVED_MARKER).exists():
            raise PkiError(
                f"the records of the CA in {directory} are in PostgreSQL: give --db URI"
                f" or ${DB_ENV} (D/ca.db, if any, is only the copy it was moved from)"
            )
        return SqliteStore(directory / "ca.db")
    if not db.startswith(POSTGRES_SCHEMES):
        raise PkiError("--db takes a PostgreSQL URI (postgresql://...)")
    try:
        import psycopg
        import psycopg_pool

        from trustmesh.pki.pgstore import PostgresStore
    except ImportError:
        raise PkiError(
            "a CA on PostgreSQL needs psycopg: pip install 'trustmesh[postgres]'"
        ) from None
    try:
        return PostgresStore(db)
    except (psycopg.Error, psycopg_pool.PoolTimeout, StoreUnavailable) as exc:
        # The driver's own words (they name the host, never the password).
        raise PkiError(f"cannot open the CA database: {type(exc).__name__}: {exc}") from None


def mark_moved_to_postgresql(directory: Path) -> None:
    """Record in the CA directory that its records are in PostgreSQL (MOVED_MARKER)."""
    # Durably: once `ca migrate` says the move is done, no crash brings back commands
    # that would use the old ca.db.
    text = (
        f"This CA keeps its records in PostgreSQL: run its commands with --db URI or ${DB_ENV}.\n"
    )
    write_durably(directory / MOVED_MARKER, text.encode())
