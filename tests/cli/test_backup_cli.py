"""``trustmesh ca backup`` and ``trustmesh node backup``: what they write, what they say,
and what they refuse (tests/deploy/test_backup.py takes them while a writer writes)."""

from __future__ import annotations

import json
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest
from catools import PASS
from click.testing import CliRunner, Result

from trustmesh.bundle.store import BundleStore
from trustmesh.cli import main as cli_main
from trustmesh.cli.backup import BackupError
from trustmesh.mesh.store import MeshStore
from trustmesh.pki.ca import CertificateAuthority


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("backup") / "ca"
    with CertificateAuthority.init(directory, PASS.encode()) as authority:
        authority.create_token("node-1")  # something in ca.db to find in the copy
    return directory


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "n1"
    directory.mkdir()
    (directory / "node.toml").write_text('node_id = "node-1"\n')  # all backup looks at
    MeshStore(directory / "mesh.db").close()
    return directory


def trustmesh(*args: str | Path) -> Result:
    """``trustmesh ARGS`` in-process, with no passphrase anywhere: backups need none."""
    return CliRunner().invoke(
        cli_main.cli, [str(a) for a in args], env={"TRUSTMESH_PASSPHRASE": ""}
    )


def refused(result: Result, *words: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, BackupError), result.exception
    message = str(result.exception)
    for word in words:
        assert word in message, message
    return message


def check_copy(path: Path, table: str) -> int:
    """A private, whole, self-contained SQLite file; the rows of ``table`` in it."""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        count: int = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return count


def test_ca_backup_prints_one_json_document_or_one_line(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ca-1.db"
    result = trustmesh("ca", "backup", "--dir", ca_dir, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "database": str(ca_dir / "ca.db"),
        "out": str(out),
        "bytes": out.stat().st_size,
    }
    assert len(result.output.splitlines()) == 1
    assert check_copy(out, "tokens") == 1

    human = trustmesh("ca", "backup", "--dir", ca_dir, "--out", tmp_path / "ca-2.db")
    assert human.exit_code == 0, human.output
    size = (tmp_path / "ca-2.db").stat().st_size
    assert (
        human.output == f"backed up {ca_dir / 'ca.db'} to {tmp_path / 'ca-2.db'} ({size} bytes)\n"
    )


def test_an_existing_out_is_kept_unless_force(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ca.db.bak"
    out.write_text("last night's backup")
    out.chmod(0o644)
    refused(trustmesh("ca", "backup", "--dir", ca_dir, "--out", out), str(out), "--force")
    assert out.read_text() == "last night's backup"

    result = trustmesh("ca", "backup", "--dir", ca_dir, "--out", out, "--force", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["bytes"] == out.stat().st_size
    assert check_copy(out, "tokens") == 1  # replaced whole, and private again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.db.bak"]  # no temporary left


def test_clear_errors(ca_dir: Path, node_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.db"
    refused(
        trustmesh("ca", "backup", "--dir", tmp_path / "nope", "--out", out), "no such directory"
    )
    refused(trustmesh("ca", "backup", "--dir", node_dir, "--out", out), "not a CA directory")
    refused(trustmesh("node", "backup", "--dir", ca_dir, "--out", out), "not a node directory")
    refused(
        trustmesh("ca", "backup", "--dir", ca_dir, "--out", tmp_path / "no" / "copy.db"),
        "not a directory",
    )
    # Never onto the live database, even with --force (nor its WAL).
    before = (ca_dir / "ca.db").read_bytes()
    for live in ("ca.db", "ca.db-wal"):
        target = ca_dir / live
        refused(
            trustmesh("ca", "backup", "--dir", ca_dir, "--out", target, "--force"),
            "live database",
        )
    assert (ca_dir / "ca.db").read_bytes() == before
    refused(
        trustmesh("node", "backup", "--dir", node_dir, "--out", out, "--database", "bundles"),
        "no bundles.db",
    )
    result = trustmesh("ca", "backup", "--dir", ca_dir, "--out", tmp_path, "--force")
    assert result.exit_code == 2, result.output  # --out is a file: click says so
    assert not out.exists()


def test_node_backup_copies_either_database(node_dir: Path, tmp_path: Path) -> None:
    BundleStore(node_dir / "bundles.db").close()
    mesh_copy, bundles_copy = tmp_path / "mesh.bak", tmp_path / "bundles.bak"
    result = trustmesh("node", "backup", "--dir", node_dir, "--out", mesh_copy, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["database"] == str(node_dir / "mesh.db")
    assert check_copy(mesh_copy, "indicators") == 0
    result = trustmesh(
        "node", "backup", "--dir", node_dir, "--database", "bundles", "--out", bundles_copy
    )
    assert result.exit_code == 0, result.output
    assert check_copy(bundles_copy, "bundles") == 0
    assert "backup" in trustmesh("node", "--help").output  # listed with the node commands
