"""The CA store's schema history, one for both stores (SQLite and PostgreSQL).

Each :class:`Migration` has a version and a name; a store gives, for each version, the
step that brings its own database there (its dialect's DDL). The versions applied are
recorded in the table ``schema_migrations``, so both kinds of database say the same
thing about where they stand, and ``ca migrate`` copies between two databases of the
same version.

:func:`migrate` runs in the store's serialized write transaction: replicas starting
together apply each step once, and a crash leaves the database at the version before.
A database recorded at a version this trustmesh does not know (made by a newer one) is
refused, so an old replica never writes to a schema it does not understand.

A step must be idempotent: a database made before this history (SQLite CA databases
of earlier releases, which have every table but no ``schema_migrations``) runs every
step from version 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from trustmesh.pki.errors import PkiError


class Executes(Protocol):
    """What a step runs on (the store's Handle: ``?`` placeholders)."""

    def execute(self, sql: str, args: Sequence[object] = (), /) -> Any: ...


Step = Callable[[Executes], None]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str


HISTORY = (
    Migration(1, "base: certificates, tokens, admin tokens, audit, meta (revocation epoch)"),
    Migration(2, "crl_number: CRL numbers given by the store, shared by CA replicas"),
)
LATEST = HISTORY[-1].version

TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
)


class SchemaTooNew(PkiError):
    """The database was brought to a schema version this trustmesh does not know."""


def migrate(db: Executes, steps: Mapping[int, Step], *, now: int) -> list[int]:
    """Bring ``db`` to :data:`LATEST` with ``steps`` (one for each version of
    :data:`HISTORY`), inside the caller's write transaction; the versions applied."""
    if sorted(steps) != [migration.version for migration in HISTORY]:
        raise ValueError("a store must give a step for every version of the history")
    db.execute(TABLE)
    applied = {int(row[0]) for row in db.execute("SELECT version FROM schema_migrations")}
    unknown = sorted(version for version in applied if version > LATEST)
    if unknown:
        raise SchemaTooNew(
            f"the CA database is at schema version {unknown[-1]}, made by a newer"
            f" trustmesh (this one knows up to {LATEST}): upgrade trustmesh"
        )
    done = []
    for migration in HISTORY:
        if migration.version in applied:
            continue
        steps[migration.version](db)
        db.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, now),
        )
        done.append(migration.version)
    return done


def schema_version(db: Executes) -> int:
    """The highest version recorded in ``db`` (0 for none)."""
    row = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def statements(script: str) -> list[str]:
    """The statements of a DDL script (no ';' inside one, comments included)."""
    return [statement for statement in script.split(";") if statement.strip()]
