"""``trustmesh ca backup`` and ``trustmesh node backup``: a consistent copy of a CA's or a
node's SQLite database while the CA or the node runs (docs/operations.md section 4).

Both copy with SQLite's online backup (:func:`trustmesh.pki.store.backup_database`), so
they need no passphrase and hold no writer up: the copy is the database as of one
commit, one self-contained file, mode 0600.
"""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.cli.output import emit
from trustmesh.errors import ProtocolError
from trustmesh.pki.store import backup_database
from trustmesh.pki.stores import MOVED_MARKER

CA_DATABASE = "ca.db"
# A node's databases by the name --database takes (trustmesh.node.runtime.STORE_FILE
# and trustmesh.node.bundles.BUNDLE_STORE_FILE; not imported: they pull in the node).
NODE_DATABASES = {"mesh": "mesh.db", "bundles": "bundles.db"}
NODE_CONFIG = "node.toml"
# Files SQLite keeps beside a database: a backup written over one would corrupt it.
SIDE_FILES = ("", "-wal", "-shm", "-journal")


class BackupError(ProtocolError):
    """A backup cannot be taken: no such directory, not a CA or node directory, no
    database yet, or a target that exists (without --force) or cannot be written."""


def take_backup(source: Path, out: Path, *, force: bool, as_json: bool) -> None:
    """Copy the database ``source`` to ``out`` and say what was written."""
    if any(_same_file(out, source.with_name(source.name + side)) for side in SIDE_FILES):
        raise BackupError(f"{out} is the live database (or its journal): give another --out")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent} is not a directory: create it first")
    if (out.exists() or out.is_symlink()) and not force:
        raise BackupError(f"{out} exists; refusing to overwrite it (--force replaces it)")
    try:
        backup_database(source, out, replace=force)
    except FileExistsError:  # it appeared since the check above
        raise BackupError(f"{out} exists; refusing to overwrite it (--force replaces it)") from None
    size = out.stat().st_size
    emit(
        {"database": str(source), "out": str(out), "bytes": size},
        as_json=as_json,
        human=f"backed up {source} to {out} ({size} bytes)",
    )


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (either may not exist)."""
    try:
        return a.resolve() == b.resolve() or a.samefile(b)
    except OSError:
        return False


def _directory(directory: Path) -> None:
    if not directory.is_dir():
        raise BackupError(f"{directory}: no such directory")


OUT_OPTION = click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    metavar="FILE",
    help="The backup file to write (mode 0600); its folder must exist.",
)
FORCE_OPTION = click.option(
    "--force", is_flag=True, help="Replace --out if it exists (atomically: old or new, whole)."
)
JSON_OPTION = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON document: {"database": ..., "out": ..., "bytes": ...}.',
)


@click.command(name="backup")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The CA directory (ca.crt, ca.db).",
)
@OUT_OPTION
@FORCE_OPTION
@JSON_OPTION
def ca_backup(directory: Path, out: Path, force: bool, as_json: bool) -> None:
    """Copy D/ca.db to FILE, consistently, while `ca serve` runs.

    SQLite's online backup: the copy is the database as of one commit (every
    certificate, token and revocation up to it), one file with no -wal, mode 0600. No
    passphrase needed. Restore: docs/operations.md section 4.2.
    """
    _directory(directory)
    if not (directory / "ca.crt").is_file():
        raise BackupError(f"{directory} is not a CA directory (no ca.crt)")
    if (directory / MOVED_MARKER).exists():
        raise BackupError(
            f"the records of the CA in {directory} are in PostgreSQL: back them up with"
            " the database's own tools (pg_dump, or continuous archiving; docs/operations.md"
            " section 8). D/ca.db, if any, is only the copy they were moved from"
        )
    source = directory / CA_DATABASE
    if not source.is_file():
        raise BackupError(f"{directory} has no {CA_DATABASE}: not a CA directory `ca init` made")
    take_backup(source, out, force=force, as_json=as_json)


@click.command(name="backup")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The node directory (`trustmesh node init` wrote it).",
)
@OUT_OPTION
@click.option(
    "--database",
    type=click.Choice(sorted(NODE_DATABASES)),
    default="mesh",
    show_default=True,
    help="mesh: mesh.db (seen-cache, anomalies, CRL, peer records); bundles: bundles.db"
    " (the bundles held in custody).",
)
@FORCE_OPTION
@JSON_OPTION
def node_backup(directory: Path, out: Path, database: str, force: bool, as_json: bool) -> None:
    """Copy one of the node's databases (D/mesh.db, or D/bundles.db with --database
    bundles) to FILE, consistently, while `node run` runs.

    SQLite's online backup: the copy is the database as of one commit, one file with no
    -wal, mode 0600. No passphrase needed. Back up both databases (two commands);
    restore: docs/operations.md section 4.3.
    """
    _directory(directory)
    if not (directory / NODE_CONFIG).is_file():
        raise BackupError(
            f"{directory} is not a node directory (no {NODE_CONFIG}; `trustmesh node init`"
            " writes one)"
        )
    source = directory / NODE_DATABASES[database]
    if not source.is_file():
        raise BackupError(f"{directory} has no {source.name} yet: the node has not run")
    take_backup(source, out, force=force, as_json=as_json)
