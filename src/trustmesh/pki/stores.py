"""Where a CA keeps its records: ``ca.db`` in its directory (SQLite, the default), or a
PostgreSQL database that several ``ca serve`` replicas share (``--db postgresql://...``,
or ``$TRUSTMESH_CA_DB``; the password from ``PGPASSFILE``, never the command line)."""

from __future__ import annotations

from pathlib import Path

from trustmesh.pki.errors import PkiError
from trustmesh.pki.store import CaStore, SqliteStore

DB_ENV = "TRUSTMESH_CA_DB"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(directory: Path, db: str | None) -> CaStore:
    """The store of the CA in ``directory``: the PostgreSQL database ``db`` names, or
    ``directory/ca.db`` when ``db`` is None or empty."""
    if not db:
        return SqliteStore(directory / "ca.db")
    if not db.startswith(POSTGRES_SCHEMES):
        scheme = db.split(":", 1)[0] if ":" in db else db[:20]
        raise PkiError(f"--db takes a PostgreSQL URI (postgresql://...), not {scheme!r}")
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
    except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
        # The driver's own words (they name the host, never the password).
        raise PkiError(f"cannot open the CA database: {type(exc).__name__}: {exc}") from None
